"""Reading checkpoint tensors: safetensors (single or sharded), memory-mapped, checked, cast once.

A `WeightSource` hands out tensors by their Hugging Face key. Model constructors ask for every tensor
with the shape they expect (`src.take(key, shape)`), so a missing key or a wrong shape fails at load
with both shapes named, and every tensor is cast to the target dtype and moved to the device once.
"""
from __future__ import annotations

import os
import struct
import sys
import time
import zipfile
from pathlib import Path
from typing import Callable, Iterable

import torch

from .files import CheckpointError, open_regular, parse_json, read_json

__all__ = ["CheckpointError", "WeightSource", "DtypeView", "from_directory", "from_state_dict", "random_source"]


_ST_DTYPES = {"F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL", "F8_E4M3", "F8_E5M2"}
_TORCH_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                 "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                 "BOOL": torch.bool}
_ST_ITEMSIZE = {"F64": 8, "I64": 8, "F32": 4, "I32": 4, "F16": 2, "BF16": 2, "I16": 2,
                "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
# The safetensors library allows 100 MB; parsed into Python objects that could cost gigabytes. A
# BLIP-2 header is ~200 KB and the largest single-file checkpoints' a few MB: 16 MiB refuses no real one.
_MAX_HEADER = 16 * 2**20
_MAX_NUMEL = 2**64  # safetensors multiplies shapes in u64 and refuses an overflow


def _numel(shape) -> int | None:
    n = 1
    for d in shape:  # stop early: a product of millions of huge dims would take forever to compute
        n *= d
        if n >= _MAX_NUMEL:
            return None
    return n


def _parse_header(path: Path, size: int, head: bytes, f) -> tuple[int, dict]:
    """The header of the safetensors file open as `f` (`size` bytes, first 8 in `head`), checked by
    the format's rules as the safetensors library applies them: a JSON object without duplicate keys,
    `__metadata__` a string-to-string map, every tensor a known dtype with a shape whose byte count
    matches its data_offsets, and the tensors tiling the data section exactly (no overlap, no gap, no
    trailing bytes). Nothing is allocated from what the header claims: shapes are only multiplied."""
    if size < 8 or len(head) < 8:
        raise CheckpointError(f"{path}: not a safetensors file ({size} bytes; truncated?)")
    (n,) = struct.unpack("<Q", head)
    if n > size - 8:
        raise CheckpointError(f"{path}: safetensors header claims {n} bytes but the file has {size}; truncated or corrupt")
    if n > _MAX_HEADER:
        raise CheckpointError(f"{path}: safetensors header of {n} bytes is larger than the {_MAX_HEADER} this loader "
                              "reads (a real header is well under 1 MB); corrupt or hostile")
    raw = f.read(n)
    if len(raw) != n:
        raise CheckpointError(f"{path}: truncated while reading its safetensors header")
    header = parse_json(raw, f"{path}: safetensors header", strict=True)
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: malformed safetensors header (not a JSON object)")
    meta = header.get("__metadata__")
    if meta is not None and not (isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())):
        raise CheckpointError(f"{path}: malformed safetensors header (__metadata__ must map strings to strings)")
    spans = []
    for key, info in header.items():
        if key == "__metadata__":
            continue
        bad = f"{path}: malformed safetensors entry for {key!r}"
        if not _utf8(key) or not isinstance(info, dict) or not isinstance(info.get("dtype"), str) \
                or info["dtype"] not in _ST_DTYPES:
            raise CheckpointError(f"{bad}: dtype {info.get('dtype') if isinstance(info, dict) else info!r}")
        offs, shape = info.get("data_offsets"), info.get("shape")
        if (not isinstance(offs, list) or len(offs) != 2 or not all(type(o) is int for o in offs)
                or not 0 <= offs[0] <= offs[1]):
            raise CheckpointError(f"{bad}: data_offsets {offs!r}")
        if not isinstance(shape, list) or not all(type(d) is int and 0 <= d < 2**63 for d in shape):
            raise CheckpointError(f"{bad}: shape {shape!r}")
        numel = _numel(shape)
        if numel is None:
            raise CheckpointError(f"{bad}: shape {shape[:8]}{'...' if len(shape) > 8 else ''} has more than 2**64 elements")
        nbytes = numel * _ST_ITEMSIZE[info["dtype"]]
        if offs[1] - offs[0] != nbytes:
            raise CheckpointError(f"{bad}: {offs[1] - offs[0]} bytes for shape {shape} of {info['dtype']} (needs {nbytes})")
        spans.append((offs[0], offs[1], key))
    spans.sort()
    end = 0
    for a, b, key in spans:
        if a < end:
            raise CheckpointError(f"{path}: tensor {key!r} overlaps the tensor before it in the file; corrupt header")
        if a > end:
            raise CheckpointError(f"{path}: a gap of {a - end} bytes before tensor {key!r}; corrupt header")
        end = b
    if 8 + n + end > size:
        raise CheckpointError(f"{path}: truncated: tensors need {8 + n + end} bytes, file has {size}")
    if 8 + n + end < size:
        raise CheckpointError(f"{path}: {size - 8 - n - end} bytes after the last tensor; corrupt or not a safetensors file")
    return n, header


def _utf8(s: str) -> bool:
    try:  # a JSON escape can spell a lone surrogate, which is not UTF-8
        s.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


class _MappedFile:
    """A safetensors file memory-mapped once; tensors are zero-copy views into the mapping.

    The header is read and checked from the same open descriptor that is mapped, so the file cannot
    be swapped between the check and the mapping. The mapping is private (copy-on-write), so views
    are writable without touching the file, and the kernel is told up front that every page will be
    read (MADV_WILLNEED): reading weights then streams sequentially instead of faulting page by page.
    """

    def __init__(self, path: Path):
        import mmap

        self.path = path
        with open_regular(path, "safetensors file") as f:
            self.size = os.fstat(f.fileno()).st_size
            header_len, self.header = _parse_header(path, self.size, f.read(8), f)
            self.mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        if hasattr(mmap, "MADV_WILLNEED"):
            self.mm.madvise(mmap.MADV_WILLNEED)
        self.base = torch.frombuffer(self.mm, dtype=torch.uint8)
        self.data_start = 8 + header_len

    def keys(self):
        return [k for k in self.header if k != "__metadata__"]

    def shape(self, key):
        return self.header[key]["shape"]

    def get(self, key) -> torch.Tensor:
        info = self.header[key]
        dtype = _TORCH_DTYPES.get(info["dtype"])
        if dtype is None:
            raise CheckpointError(f"{self.path}: tensor {key!r} has dtype {info['dtype']}, which blip2_fast cannot load")
        a, b = info["data_offsets"]
        raw = self.base[self.data_start + a: self.data_start + b]
        itemsize = torch.tensor([], dtype=dtype).element_size()
        if (self.data_start + a) % itemsize:
            raw = raw.clone()  # misaligned for a zero-copy view; rare (safetensors aligns its data)
        return raw.view(dtype).view(info["shape"])  # byte count vs shape checked by _parse_header


class DtypeView:
    """A weight source seen with another default dtype: what the Q-Former of an fp16 model loads through
    (transformers keeps it in fp32). Takes are recorded on the underlying source as usual."""

    def __init__(self, src, dtype: torch.dtype):
        self._src, self.dtype, self.device = src, dtype, src.device

    def has(self, key: str) -> bool:
        return self._src.has(key)

    def take(self, key: str, shape, dtype: torch.dtype | None = None) -> torch.Tensor:
        return self._src.take(key, shape, dtype or self.dtype)


class WeightSource:
    """Tensors by key from a checkpoint directory or a state dict.

    take(key, shape) -> tensor of `shape` on `device` in `dtype` (or `keep_dtype`), raising
    CheckpointError naming the key (and both shapes) when it is missing or has the wrong shape.
    """

    def __init__(self, getter: Callable[[str], torch.Tensor], keys: Iterable[str], *, device, dtype,
                 describe: str, shape_of: Callable[[str], tuple] | None = None, progress=None, copy: bool = False):
        self._get = getter
        self.keys = set(keys)
        self.device = torch.device(device)
        self.dtype = dtype
        self.describe = describe
        self._shape_of = shape_of
        self.used: set[str] = set()
        self.progress = progress
        self.copy = copy  # a caller's live tensors: never alias them (in-place edits would half-propagate)

    def has(self, key: str) -> bool:
        return key in self.keys

    def shape(self, key: str) -> tuple:
        if key not in self.keys:
            raise CheckpointError(f"{self.describe}: tensor {key!r} is missing")
        if self._shape_of is not None:
            return tuple(self._shape_of(key))
        return tuple(self._get(key).shape)

    def take(self, key: str, shape, dtype: torch.dtype | None = None) -> torch.Tensor:
        if key not in self.keys:
            raise CheckpointError(f"{self.describe}: tensor {key!r} is missing")
        shape = tuple(int(s) for s in shape)
        got = self.shape(key)
        if got != shape:
            raise CheckpointError(f"{self.describe}: tensor {key!r} has shape {list(got)}, expected {list(shape)} from the config")
        t = self._get(key)
        if t.layout != torch.strided or not (t.is_floating_point() or not (dtype or self.dtype).is_floating_point):
            # an integer / bool / complex / sparse tensor cast to a float weight is garbage, not a weight
            raise CheckpointError(f"{self.describe}: tensor {key!r} is a {t.dtype} ({t.layout}) tensor; "
                                  "expected a dense floating-point one")
        self.used.add(key)
        if self.progress is not None:
            self.progress.add(t.numel() * t.element_size())
        out = t.to(device=self.device, dtype=dtype or self.dtype, non_blocking=True).contiguous()
        return out.clone() if self.copy and out.data_ptr() == t.data_ptr() else out

    def unused(self) -> list[str]:
        """Checkpoint tensors that no module asked for."""
        return sorted(self.keys - self.used)


class _Progress:
    """Bytes-read progress on stderr, shown only once a load has taken more than `after` seconds."""

    def __init__(self, total: int, nshards: int, enabled: bool, after: float = 2.0):
        self.total, self.nshards, self.enabled, self.after = total, nshards, enabled, after
        self.done, self.shards_done = 0, 0
        self.t0 = time.perf_counter()
        self.last = 0.0
        self.shown = False

    def add(self, nbytes: int) -> None:
        self.done += nbytes
        self._show()

    def shard_done(self) -> None:
        self.shards_done += 1
        self._show(force=self.shown)

    def _show(self, force=False) -> None:
        if not self.enabled:
            return
        now = time.perf_counter() - self.t0
        if (now > self.after and now - self.last > 0.5) or force:
            self.last, self.shown = now, True
            pct = 100.0 * self.done / max(self.total, 1)
            print(f"\rblip2_fast: loading weights: shard {min(self.shards_done + 1, self.nshards)}/{self.nshards}, "
                  f"{self.done / 2**30:.2f}/{self.total / 2**30:.2f} GiB ({pct:.0f}%), {now:.1f}s", end="", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.shown:
            print(f"\rblip2_fast: loaded {self.done / 2**30:.2f} GiB in {time.perf_counter() - self.t0:.1f}s" + " " * 20, file=sys.stderr)


def from_directory(path: Path, *, device, dtype, progress: bool = True) -> WeightSource:
    """A WeightSource over `path`'s model.safetensors, a sharded index, or (safely) pytorch_model.bin.

    A name that is there in any form (a directory, a FIFO, a dangling symlink) counts as there, so
    the error names what is wrong with it instead of falling through to another format."""
    path = Path(path)
    single = path / "model.safetensors"
    index = path / "model.safetensors.index.json"
    if os.path.lexists(index):
        idx = read_json(index, "shard index")
        weight_map = idx.get("weight_map") if isinstance(idx, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise CheckpointError(f"{index}: malformed shard index (weight_map must map tensor names to file names)")
        shard_files = {}
        for fname in sorted(set(weight_map.values())):
            # the index may only name files in the directory; the files themselves may be symlinks
            # (the Hugging Face cache links snapshots/<rev>/<file> to ../../blobs/<sha>)
            rel = Path(fname)
            if "\0" in fname or rel.is_absolute() or ".." in rel.parts or not rel.parts:
                raise CheckpointError(f"{index}: shard {fname!r} points outside the checkpoint directory {path}")
            f = path / rel
            if not os.path.lexists(f):
                raise CheckpointError(f"{index}: shard {fname!r} is missing")
            shard_files[fname] = f
        return _safetensors_source(shard_files, weight_map, device=device, dtype=dtype, describe=str(path), progress=progress)
    if os.path.lexists(single):
        return _safetensors_source({"model.safetensors": single}, None, device=device, dtype=dtype, describe=str(path), progress=progress)
    bins = sorted(path.glob("pytorch_model*.bin"))
    if bins:
        return _torch_bin_source(path, bins, device=device, dtype=dtype)
    raise CheckpointError(f"{path}: no weights found (expected model.safetensors, model.safetensors.index.json or pytorch_model.bin)")


def _safetensors_source(files: dict, weight_map, *, device, dtype, describe, progress) -> WeightSource:
    handles, key_file = {}, {}
    total = 0
    for fname, f in files.items():
        h = _MappedFile(f)
        handles[fname] = h
        for k in h.keys():
            if weight_map is None or weight_map.get(k) == fname:
                key_file[k] = fname
        total += h.size
    if weight_map is not None:
        missing = [k for k, fn in weight_map.items() if k not in key_file]
        if missing:
            raise CheckpointError(f"{describe}: shard index lists {len(missing)} tensors that are not in their shards, e.g. {missing[0]!r} in {weight_map[missing[0]]!r}")
    prog = _Progress(total, len(files), enabled=progress)

    def get(key):
        return handles[key_file[key]].get(key)

    def shape_of(key):
        return handles[key_file[key]].shape(key)

    return WeightSource(get, key_file.keys(), device=device, dtype=dtype, describe=describe, shape_of=shape_of, progress=prog)


def _torch_bin_source(path: Path, bins, *, device, dtype) -> WeightSource:
    # Never unpickle arbitrary objects: weights_only=True only rebuilds tensors and plain containers.
    # A zip-format file (torch >= 1.6) is memory-mapped; a legacy one (pre-zip) cannot be, so it is
    # read from the descriptor that was checked to be a regular file.
    state = {}
    for b in bins:
        with open_regular(b, "PyTorch checkpoint") as f:
            legacy = not zipfile.is_zipfile(f)
            f.seek(0)
            if legacy:
                declared, size = _legacy_declared_bytes(f), os.fstat(f.fileno()).st_size
                if declared is not None and declared > size:
                    raise CheckpointError(f"{b}: declares {declared} bytes of tensor storage but the file has {size}; "
                                          "truncated or corrupt (refused before allocating it)")
                f.seek(0)
            try:
                if legacy:
                    part = torch.load(f, map_location="cpu", weights_only=True)
                else:
                    part = torch.load(b, map_location="cpu", weights_only=True, mmap=True)
            except Exception as e:  # weights_only refusals, corrupt zips and pickles, lying storage sizes
                what = "legacy-format " if legacy else ""
                raise CheckpointError(f"{b}: refused to load this {what}PyTorch checkpoint: not a plain tensor checkpoint "
                                      f"or corrupt ({type(e).__name__}: {_first_line(e)})") from None
        if not isinstance(part, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in part.items()):
            raise CheckpointError(f"{b}: expected a dict of tensors by name, got {type(part).__name__}")
        state.update(part)
    return from_state_dict(state, device=device, dtype=dtype, describe=str(path))


_STORAGE_ITEMSIZE = {"DoubleStorage": 8, "LongStorage": 8, "ComplexFloatStorage": 8, "FloatStorage": 4,
                     "IntStorage": 4, "HalfStorage": 2, "BFloat16Storage": 2, "ShortStorage": 2}


def _legacy_declared_bytes(f) -> int | None:
    """Bytes of storage a legacy (pre-zip) torch.save file declares, read without unpickling.

    torch allocates each storage at the size its persistent id declares, ('storage', <type>, key,
    location, numel, ...), before reading the data that follows the pickle, so a lying numel would
    allocate first and fail later. The object pickle is run through an abstract stack machine that
    knows only each opcode's stack effect (pickletools' tables) and tracks the plain values that
    persistent ids are built from. None if the file does not have the expected shape."""
    import pickletools

    mark, unknown = object(), object()
    try:
        for _ in range(3):  # magic number, protocol version, system info
            for _op in pickletools.genops(f):
                pass
        stack, memo, sizes = [], {}, {}
        for op, arg, _pos in pickletools.genops(f):
            name = op.name
            if name == "MARK":
                stack.append(mark)
            elif name in ("PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE"):
                memo[len(memo) if name == "MEMOIZE" else arg] = stack[-1] if stack else unknown
            elif name in ("GET", "BINGET", "LONG_BINGET"):
                stack.append(memo.get(arg, unknown))
            elif name in ("GLOBAL",):
                stack.append(("global", arg))
            elif name == "TUPLE":
                i = len(stack) - 1 - stack[::-1].index(mark)
                stack[i:] = [tuple(stack[i + 1:])]
            elif name in ("TUPLE1", "TUPLE2", "TUPLE3"):
                n = int(name[-1])
                stack[-n:] = [tuple(stack[-n:])]
            elif name == "BINPERSID":
                pid = stack.pop()
                if isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage" and type(pid[4]) is int:
                    kind = pid[1][1].split()[-1] if isinstance(pid[1], tuple) else ""
                    sizes[pid[2]] = pid[4] * _STORAGE_ITEMSIZE.get(kind, 1)
                stack.append(unknown)
            elif op.arg is not None and not op.stack_before and len(op.stack_after) == 1 and name != "STOP":
                stack.append(arg)  # a constant: ints, strings, None-free literals
            elif name in ("NONE", "NEWTRUE", "NEWFALSE"):
                stack.append({"NONE": None, "NEWTRUE": True, "NEWFALSE": False}[name])
            else:  # any other opcode: its stack effect only
                if pickletools.markobject in op.stack_before:
                    del stack[len(stack) - 1 - stack[::-1].index(mark):]
                else:
                    del stack[len(stack) - len(op.stack_before):]
                stack += [unknown] * len(op.stack_after)
        return sum(sizes.values())
    except Exception:  # not the shape torch writes: torch.load gets to say what is wrong
        return None


def _first_line(e: BaseException, limit: int = 400) -> str:
    line = (str(e).strip().splitlines() or [""])[0]
    return line if len(line) <= limit else line[:limit] + " ..."


def from_state_dict(state: dict, *, device, dtype, describe="state dict") -> WeightSource:
    meta = [k for k, t in state.items() if isinstance(t, torch.Tensor) and t.is_meta]
    if meta:
        raise CheckpointError(f"{describe}: tensor {meta[0]!r} is on the meta device (weights not materialised); "
                              "load the model's weights before passing it to blip2_fast.load")
    return WeightSource(state.__getitem__, state.keys(), device=device, dtype=dtype, describe=describe, copy=True)


def random_source(*, device, dtype, seed: int = 0, std: float = 0.02) -> WeightSource:
    """A WeightSource that invents every tensor it is asked for (random presets for benchmarks).

    Norm weights (keys ending in 'layer_norm.weight', 'LayerNorm.weight', 'layernorm.weight') are ones
    so activations stay in range through deep stacks; everything else is N(0, std²).
    """
    gen = torch.Generator(device="cpu").manual_seed(seed)

    class _Random(WeightSource):
        def __init__(self):
            super().__init__(lambda k: None, (), device=device, dtype=dtype, describe="random weights")

        def has(self, key):
            return not key.endswith("lm_head.weight")  # tie the LM head to the embeddings

        def take(self, key, shape, dtype=None):
            dt = dtype or self.dtype
            shape = tuple(int(s) for s in shape)
            lower = key.lower()
            if lower.endswith(("norm.weight", "norm1.weight", "norm2.weight")):
                return torch.ones(shape, device=self.device, dtype=dt)
            if lower.endswith("bias") or "norm" in lower:
                return torch.zeros(shape, device=self.device, dtype=dt)
            if self.device.type == "cuda":
                return torch.randn(shape, device=self.device, dtype=dt) * std
            return (torch.randn(shape, generator=gen) * std).to(dt)

    return _Random()
