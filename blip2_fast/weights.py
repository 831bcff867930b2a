"""Reading checkpoint tensors: safetensors (single or sharded), memory-mapped, checked, cast once.

A `WeightSource` hands out tensors by their Hugging Face key. Model constructors ask for every tensor
with the shape they expect (`src.take(key, shape)`), so a missing key or a wrong shape fails at load
with both shapes named, and every tensor is cast to the target dtype and moved to the device once.
"""
from __future__ import annotations

import json
import struct
import sys
import time
from pathlib import Path
from typing import Callable, Iterable

import torch


class CheckpointError(ValueError):
    """A checkpoint is missing, malformed, or does not match the model's config."""


_ST_DTYPES = {"F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL", "F8_E4M3", "F8_E5M2"}


def _validate_safetensors(path: Path) -> tuple[int, dict]:
    """Check the header and total size before handing the file to safetensors (which would crash or
    give an opaque error on a truncated file)."""
    size = path.stat().st_size
    if size < 8:
        raise CheckpointError(f"{path}: not a safetensors file ({size} bytes; truncated?)")
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > size - 8 or n > 100 * 1024 * 1024:
            raise CheckpointError(f"{path}: safetensors header claims {n} bytes but the file has {size}; truncated or corrupt")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path}: unreadable safetensors header ({e}); truncated or corrupt") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: malformed safetensors header (not a JSON object)")
    spans = []
    for key, info in header.items():
        if key == "__metadata__":
            continue
        bad = f"{path}: malformed safetensors entry for {key!r}"
        if not isinstance(info, dict) or info.get("dtype") not in _ST_DTYPES:
            raise CheckpointError(bad)
        offs, shape = info.get("data_offsets"), info.get("shape")
        if (not isinstance(offs, list) or len(offs) != 2 or not all(type(o) is int for o in offs)
                or not 0 <= offs[0] <= offs[1]):
            raise CheckpointError(f"{bad}: data_offsets {offs!r}")
        if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
            raise CheckpointError(f"{bad}: shape {shape!r}")
        if info["dtype"] in _TORCH_DTYPES:
            numel = 1
            for d in shape:
                numel *= d
            nbytes = numel * torch.tensor([], dtype=_TORCH_DTYPES[info["dtype"]]).element_size()
            if offs[1] - offs[0] != nbytes:
                raise CheckpointError(f"{bad}: {offs[1] - offs[0]} bytes for shape {shape} of {info['dtype']} (needs {nbytes})")
        spans.append((offs[0], offs[1], key))
    spans.sort()
    for (a0, a1, ka), (b0, b1, kb) in zip(spans, spans[1:]):
        if b0 < a1:
            raise CheckpointError(f"{path}: tensors {ka!r} and {kb!r} overlap in the file; corrupt header")
    end = spans[-1][1] if spans else 0
    if 8 + n + end > size:
        raise CheckpointError(f"{path}: truncated: tensors need {8 + n + end} bytes, file has {size}")
    return n, header


_TORCH_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                 "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                 "BOOL": torch.bool}


class _MappedFile:
    """A safetensors file memory-mapped once; tensors are zero-copy views into the mapping.

    The mapping is private (copy-on-write), so views are writable without touching the file, and
    the kernel is told up front that every page will be read (MADV_WILLNEED): reading weights then
    streams sequentially instead of faulting page by page.
    """

    def __init__(self, path: Path, header_len: int, header: dict):
        import mmap

        self.path, self.header = path, header
        with open(path, "rb") as f:
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
        return raw.view(dtype).view(info["shape"])  # byte count vs shape checked by _validate_safetensors


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
    """A WeightSource over `path`'s model.safetensors, a sharded index, or (safely) pytorch_model.bin."""
    path = Path(path)
    single = path / "model.safetensors"
    index = path / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: malformed shard index ({type(e).__name__}: {e})") from None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise CheckpointError(f"{index}: malformed shard index (weight_map must map tensor names to file names)")
        shard_files = {}
        for fname in sorted(set(weight_map.values())):
            # the index may only name files in the directory; the files themselves may be symlinks
            # (the Hugging Face cache links snapshots/<rev>/<file> to ../../blobs/<sha>)
            rel = Path(fname)
            if rel.is_absolute() or ".." in rel.parts or not rel.parts:
                raise CheckpointError(f"{index}: shard {fname!r} points outside the checkpoint directory {path}")
            f = path / rel
            if not f.exists():
                raise CheckpointError(f"{index}: shard {fname!r} is missing")
            shard_files[fname] = f
        return _safetensors_source(shard_files, weight_map, device=device, dtype=dtype, describe=str(path), progress=progress)
    if single.exists():
        return _safetensors_source({"model.safetensors": single}, None, device=device, dtype=dtype, describe=str(path), progress=progress)
    bins = sorted(path.glob("pytorch_model*.bin"))
    if bins:
        return _torch_bin_source(path, bins, device=device, dtype=dtype)
    raise CheckpointError(f"{path}: no weights found (expected model.safetensors, model.safetensors.index.json or pytorch_model.bin)")


def _safetensors_source(files: dict, weight_map, *, device, dtype, describe, progress) -> WeightSource:
    handles, key_file = {}, {}
    total = 0
    for fname, f in files.items():
        n, header = _validate_safetensors(f)
        h = _MappedFile(f, n, header)
        handles[fname] = h
        for k in h.keys():
            if weight_map is None or weight_map.get(k) == fname:
                key_file[k] = fname
        total += f.stat().st_size
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
    state = {}
    for b in bins:
        try:
            part = torch.load(b, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:
            raise CheckpointError(f"{b}: refused to load: not a plain tensor checkpoint ({type(e).__name__}: {str(e)[:300]})") from None
        if not isinstance(part, dict) or not all(isinstance(v, torch.Tensor) for v in part.values()):
            raise CheckpointError(f"{b}: expected a dict of tensors")
        state.update(part)
    return from_state_dict(state, device=device, dtype=dtype, describe=str(path))


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
