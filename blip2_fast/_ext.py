"""The C++/CUDA extension (csrc/): built on first use, cached, loaded as `torch.ops.blip2_fast.*`.

    from blip2_fast import _ext
    _ext.build(verbose=True)                 # `python -m blip2_fast build-ext`: None, or why it failed
    _ext.unavailable_reason("cuda")          # None, or why the registry must bind the reference
    out = _ext.cross_attention(q, k, v)      # torch.ops.blip2_fast.cross_attention_fwd
    out = _ext.paged_attention(q, kc, vc, tables, lens, scale)  # CPU decode attention
    packed = _ext.linear_pack(w, torch.float32); y = _ext.linear(x, packed, b, N, "relu")  # CPU small-M linear
    y = _ext.opt_decode_block(x, ln1, qkv, out_proj, ln2, fc1, fc2, kc, vc, slots, tables, lens, H, eps)
    y, x = _ext.t5_decode_block(x, delta, ...)  # a decoder layer at decode in one call (CPU; see reference.py)

The CPU kernels are always built; the CUDA ones only when torch is a CUDA build and a CUDA toolkit is
found (for sm_80, which also runs on 8.x, and sm_90a). Builds live in
`$BLIP2_FAST_CACHE/ext-<hash>` (default `~/.cache/blip2_fast`), the hash covering the sources, the
flags, the compilers' versions, torch, CUDA and Python versions, so a changed source or toolchain
never loads a stale library. An exclusive file lock serialises processes building the same directory. A failed build is remembered
in its directory (file FAILED), warned about once per process, and reported by `unavailable_reason`;
`build()` always retries it.
"""
from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import importlib.resources
import os
import platform
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import torch

_CPU_SOURCES = ("ops.cpp", "cross_attention_cpu.cpp", "paged_attention_cpu.cpp", "linear_cpu.cpp",
                "greedy_screen_cpu.cpp", "rms_norm_cpu.cpp", "write_kv_cpu.cpp", "opt_decode_block_cpu.cpp",
                "t5_decode_block_cpu.cpp")
_CUDA_SOURCES = ("cross_attention_cuda.cpp", "cross_attention.cu")
_HEADERS = ("checks.h", "cpu_common.h", "cpu_ops.h", "cpu_vec.h", "cross_attention.h", "linear_cpu_kernels.h")
# no-trapping-math: lets GCC vectorise the fp16 -> fp32 conversion.
_CFLAGS = ("-O3", "-fno-trapping-math")
# at::parallel_for is a header template that runs serially unless the extension itself is compiled
# with OpenMP. With GCC, the libgomp.so.1 that torch already loaded serves it at run time (same
# soname), so there is one thread pool. Not with clang (its libomp would be a second runtime that
# ignores torch.set_num_threads): there, and if an OpenMP build fails, the kernels build serial.
_OPENMP_FLAGS = ("-fopenmp",)
_CUDA_ARCH_FLAGS = ("-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90a,code=sm_90a")
_CUDA_CFLAGS = ("-O3",) + _CUDA_ARCH_FLAGS

_lock = threading.Lock()
_tried = False
_loaded: str | None = None  # "cpu" or "cuda": which build is loaded into this process
_path: str | None = None
_openmp: bool | None = None  # whether the loaded CPU kernels were built with OpenMP (threaded)
_errors: dict[str, str] = {}  # config -> short reason it is unavailable
_tails: dict[str, str] = {}  # config -> tail of the compiler output of its failed build
_warned: set[str] = set()


_INTERRUPTED = "an earlier build was interrupted; run `python -m blip2_fast build-ext` to retry"


class _BuildError(RuntimeError):
    def __init__(self, text: str, build_dir: Path | None = None):
        super().__init__(text)
        self.build_dir = build_dir
        self.interrupted = text.startswith(_INTERRUPTED)  # no compiler verdict: not a reason to downgrade


def _csrc() -> Path:
    return Path(str(importlib.resources.files("blip2_fast.csrc")))


def _cache_root() -> Path:
    return Path(os.environ.get("BLIP2_FAST_CACHE") or Path.home() / ".cache" / "blip2_fast")


def _cuda_toolkit_reason() -> str | None:
    """Why the CUDA kernels cannot be built here, or None."""
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU-only build, so the extension's CUDA kernels are not built"
    if not torch.cuda.is_available():  # (and torch's cpp_extension, which logs a warning then, stays unimported)
        return "no CUDA device is visible (torch.cuda.is_available() is False), so the extension's CUDA kernels are not built"
    from torch.utils.cpp_extension import CUDA_HOME

    if CUDA_HOME is None:
        return "no CUDA toolkit found to build the extension's CUDA kernels (set CUDA_HOME or put nvcc on PATH)"
    return None


def _cuda_home_hint() -> str:
    """After a failed CUDA build: a hint when the toolkit torch chose has no CUDA headers (torch takes
    CUDA_HOME from nvcc's location on PATH, so a wrapper script in /usr/local/bin gives /usr/local)."""
    from torch.utils.cpp_extension import CUDA_HOME

    if CUDA_HOME and not os.path.isfile(os.path.join(CUDA_HOME, "include", "cuda_runtime.h")):
        return (f"; the CUDA toolkit torch found, {CUDA_HOME}, has no include/cuda_runtime.h: set CUDA_HOME to "
                "the toolkit's directory (the one holding bin/nvcc and include/)")
    return ""


def _config(cuda: bool, openmp: bool = True) -> tuple[str, list[str], list[str], list[str], list[str]]:
    """(name, sources, cflags, cuda_cflags, ldflags) of the CPU-only or the CPU+CUDA build."""
    names = _CPU_SOURCES + (_CUDA_SOURCES if cuda else ())
    omp = list(_OPENMP_FLAGS) if openmp else []
    # one extension name per variant: torch renames a second build of the same name in one process
    name = ("blip2_fast_ext_cuda" if cuda else "blip2_fast_ext_cpu") + ("" if openmp else "_serial")
    return name, [str(_csrc() / n) for n in names], list(_CFLAGS) + omp, list(_CUDA_CFLAGS) if cuda else [], omp


def _openmp_variants() -> list[bool]:
    """OpenMP first where it shares torch's runtime (GCC on Linux), then a serial build as the fallback."""
    gcc = sys.platform.startswith("linux") and "clang" not in _compiler_ids(False).lower()
    return [True, False] if gcc else [False]


@functools.lru_cache(maxsize=None)
def _compiler_ids(cuda: bool) -> str:
    """The C++ compiler's (and for a CUDA build nvcc's) `--version` text: an upgraded compiler must not
    load a library another one built (an ABI or codegen change would otherwise go unnoticed)."""
    cmds = [[os.environ.get("CXX") or "c++", "--version"]]
    if cuda:
        from torch.utils.cpp_extension import CUDA_HOME

        cmds.append([os.path.join(CUDA_HOME or "", "bin", "nvcc"), "--version"])
    out = []
    for cmd in cmds:
        try:
            out.append(subprocess.run(cmd, capture_output=True, text=True, timeout=60).stdout.strip())
        except (OSError, subprocess.SubprocessError) as e:  # no compiler: the build itself will say so
            out.append(f"{cmd[0]}: {type(e).__name__}")
    return "\n".join(out)


def _build_dir(name: str, sources: list[str], cflags: list[str], cuda_cflags: list[str], ldflags: list[str]) -> Path:
    h = hashlib.sha256()
    for part in (name, torch.__version__, str(torch.version.cuda), sys.version.split()[0], platform.machine(),
                 " ".join(cflags), " ".join(cuda_cflags), " ".join(ldflags), _compiler_ids(bool(cuda_cflags))):
        h.update(part.encode() + b"\0")
    for f in sorted(sources) + sorted(str(_csrc() / n) for n in _HEADERS):
        p = Path(f)
        h.update(p.name.encode() + b"\0" + (p.read_bytes() if p.exists() else b"<missing>") + b"\0")
    return _cache_root() / f"ext-{h.hexdigest()[:16]}"


@contextlib.contextmanager
def _file_lock(path: Path):
    # fcntl, not torch's FileBaton: the kernel drops it when a build is killed, a baton file would stay.
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _tail(text: str, lines: int = 30) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def _first_error(text: str) -> str:
    for line in text.splitlines():
        if "error" in line.lower() and "Error building extension" not in line:
            return line.strip()[:300]
    return _tail(text, 1)[:300]


def _build_one(cuda: bool, force: bool, verbose: bool) -> str:
    """Build (or find cached) and load one configuration, with OpenMP if it can; returns the library's path.

    The serial variant is the fallback only for a compiler that rejected the OpenMP build (or a cache
    that cannot be used for it), never for an interrupted one, which stays an error until `build()`.
    """
    global _openmp
    variants = _openmp_variants()
    for i, openmp in enumerate(variants):
        last = i == len(variants) - 1
        note = None if i == 0 else "the OpenMP build failed; building without OpenMP (single-threaded CPU kernels)"
        try:
            path = _build_variant(cuda, openmp, force, verbose, note)
        except _BuildError as e:
            if last or e.interrupted:
                raise
            continue
        except OSError:
            if last:
                raise
            continue
        _openmp = openmp
        return path
    raise AssertionError("unreachable")


build_seconds = 0.0  # wall time this process spent building the extension (the demo reports it apart from load time)


class _Progress:
    """While a build runs: its elapsed time and the sources compiled so far (ninja's object files
    in the build directory), on stderr: one line rewritten in place on a terminal, else a line
    every 10 s."""

    def __init__(self, d: Path, n_sources: int):
        self.d, self.n, self.t0 = d, n_sources, time.perf_counter()
        self.tty = sys.stderr.isatty()
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        every = 1.0 if self.tty else 10.0
        while not self.done.wait(every):
            n = min(sum(1 for _ in self.d.glob("*.o")), self.n)
            line = f"blip2_fast:   compiling {n}/{self.n} sources, {time.perf_counter() - self.t0:.0f} s"
            print(("\r" + line) if self.tty else line, end="" if self.tty else "\n", file=sys.stderr, flush=True)

    def stop(self):
        self.done.set()
        self.thread.join()
        if self.tty and time.perf_counter() - self.t0 >= 1.0:
            print(file=sys.stderr, flush=True)


def _build_variant(cuda: bool, openmp: bool, force: bool, verbose: bool, note: str | None = None) -> str:
    name, sources, cflags, cuda_cflags, ldflags = _config(cuda, openmp)
    d = _build_dir(name, sources, cflags, cuda_cflags, ldflags)
    lib = d / f"{name}.so"
    ok, failed = d / "OK", d / "FAILED"
    if ok.exists() and lib.exists() and not force:  # built: load without the lock (the cache may be read-only)
        torch.ops.load_library(str(lib))
        return str(lib)
    d.mkdir(parents=True, exist_ok=True)
    with _file_lock(d / "build.lock"):
        if not ok.exists() or not lib.exists():
            if failed.exists() and not force:
                raise _BuildError(failed.read_text(), d)
            from torch.utils import cpp_extension

            failed.unlink(missing_ok=True)
            (d / "lock").unlink(missing_ok=True)  # torch's baton, stale if a build was killed; we hold the lock
            if note:
                print(f"blip2_fast: {note}", file=sys.stderr, flush=True)
            print(f"blip2_fast: building the {'CPU+CUDA' if cuda else 'CPU'} extension in {d} (once)...",
                  file=sys.stderr, flush=True)
            t0 = time.perf_counter()
            # marked failed until it succeeds: a build killed midway (a timeout, Ctrl-C) is then reported
            # once instead of being retried by every later process; `build-ext` retries it
            failed.write_text(_INTERRUPTED)
            ticker = _Progress(d, len(sources))
            try:
                cpp_extension.load(name, sources, extra_cflags=cflags, extra_cuda_cflags=cuda_cflags,
                                   extra_ldflags=ldflags,
                                   build_directory=str(d), verbose=verbose, with_cuda=cuda, is_python_module=False)
            except Exception as e:
                failed.write_text(f"{type(e).__name__}: {e}")
                raise _BuildError(failed.read_text(), d) from e
            finally:
                ticker.stop()
                global build_seconds
                build_seconds += time.perf_counter() - t0
            took = time.perf_counter() - t0
            ok.write_text(f"built in {took:.1f} s with torch {torch.__version__}\n")
            print(f"blip2_fast: extension built in {took:.1f} s", file=sys.stderr, flush=True)
            failed.unlink(missing_ok=True)
            return str(lib)
    torch.ops.load_library(str(lib))
    return str(lib)


def _register_fake() -> None:
    @torch.library.register_fake("blip2_fast::cross_attention_fwd")
    def _(q, k, v, key_padding_mask, scale):
        torch._check(q.dim() == 4, lambda: f"cross_attention: q must have shape [B, H, Nq, D], got {tuple(q.shape)}")
        return q.new_empty(q.shape)  # contiguous [B, H, Nq, D], like the kernels' output

    @torch.library.register_fake("blip2_fast::paged_attention_cpu_fwd")
    def _(q, k_cache, v_cache, block_tables, seq_lens, scale, rel_bias):
        torch._check(q.dim() == 3, lambda: f"paged_attention: q must have shape [N, H, D], got {tuple(q.shape)}")
        return q.new_empty(q.shape)

    @torch.library.register_fake("blip2_fast::linear_pack_cpu")
    def _(weight, dtype):
        torch._check(weight.dim() == 2, lambda: f"linear_pack: weight must have shape [N, K], got {tuple(weight.shape)}")
        N, K = weight.shape
        nb = (N + 31) // 32
        shape = (nb, K, 32) if dtype == torch.float32 else (nb, (K + 1) // 2, 32, 2)
        return weight.new_empty(shape, dtype=dtype)

    @torch.library.register_fake("blip2_fast::linear_cpu")
    def _(x, packed, bias, out_features, activation, isa):
        torch._check(x.dim() >= 1, lambda: "linear: x must have shape [..., K], got a 0-d tensor")
        return x.new_empty((*x.shape[:-1], out_features))

    @torch.library.register_fake("blip2_fast::linear_cpu_out")
    def _(x, packed, bias, out_features, activation, isa, out):
        return None

    @torch.library.register_fake("blip2_fast::rms_norm_cpu_fwd")
    def _(x, weight, residual, eps):
        return x.new_empty(x.shape), x.new_empty(x.shape if residual is not None else (0,))

    @torch.library.register_fake("blip2_fast::write_kv_cpu_fwd")
    def _(k, v, k_cache, v_cache, slot_mapping):
        return None

    @torch.library.register_fake("blip2_fast::opt_decode_block_cpu")
    def _(x, ln1_weight, ln1_bias, qkv, qkv_bias, out_proj, out_bias, ln2_weight, ln2_bias, fc1, fc1_bias, fc2, fc2_bias,
          k_cache, v_cache, slot_mapping, block_tables, seq_lens, heads, ffn, eps, activation, isa):
        torch._check(x.dim() == 2, lambda: f"opt_decode_block: x must have shape [N, E], got {tuple(x.shape)}")
        return x.new_empty(x.shape)

    @torch.library.register_fake("blip2_fast::t5_decode_block_cpu")
    def _(x, delta, ln_sa, qkv, o, ln_ca, q, o_cross, ln_ff, wi0, wi1, wo, k_cache, v_cache, slot_mapping, block_tables,
          seq_lens, rel_bias, cross_k, cross_v, cross_block_tables, cross_seq_lens, heads, d_kv, d_ff, eps, activation, isa):
        torch._check(x.dim() == 2, lambda: f"t5_decode_block: x must have shape [N, d], got {tuple(x.shape)}")
        return x.new_empty(x.shape), x.new_empty(x.shape)

    @torch.library.register_fake("blip2_fast::greedy_pick_cpu")
    def _(a, h, weight, w_max, r_max, safety, rel, ban_ptr, ban_ids, max_candidates):
        return a.new_empty((a.shape[0],), dtype=torch.long)

    @torch.library.register_fake("blip2_fast::greedy_screen_cpu")
    def _(a, base, rel, ban_ptr, ban_ids, max_candidates):
        n = a.shape[0]
        return a.new_empty((n, max_candidates), dtype=torch.long), a.new_empty((n,), dtype=torch.long)


def _load(force: bool = False, verbose: bool = False) -> None:
    global _tried, _loaded, _path
    with _lock:
        if _loaded is not None or (_tried and not force):
            return
        _tried = True
        _errors.clear()
        _tails.clear()
        cuda_reason = _cuda_toolkit_reason()
        if cuda_reason is not None:
            _errors["cuda"] = cuda_reason
        for cuda in ([True] if cuda_reason is None else []) + [False]:
            config = "cuda" if cuda else "cpu"
            try:
                _path = _build_one(cuda, force, verbose)
            except Exception as e:
                text = str(e)
                d = getattr(e, "build_dir", None) or _build_dir(*_config(cuda, openmp=False))
                _errors[config] = f"the {config.upper()} extension failed to build: {_first_error(text)} (log: {d / 'FAILED'})"
                _tails[config] = _tail(text)
                if cuda:
                    _errors[config] += _cuda_home_hint()
                    _errors["cuda"] = _errors[config]
                if force:
                    continue  # build() returns the reason with the output's tail
                if config not in _warned:
                    _warned.add(config)
                    warnings.warn(f"blip2_fast: building the {config.upper()} extension in {d} failed; its ops fall back "
                                  f"to the reference. Retry with `python -m blip2_fast build-ext`. Compiler output "
                                  f"(tail):\n{_tail(text)}", RuntimeWarning, stacklevel=4)
                continue
            _loaded = config
            _register_fake()
            return


def build(verbose: bool = False) -> str | None:
    """Build (or find in the cache) and load the extension now; None on success, else why it failed.

    Retries a build remembered as failed. The reason carries the compiler output's tail. On a CUDA
    build of torch with a toolkit, a failed CUDA part is a failure even though the CPU kernels load.
    """
    _load(force=True, verbose=verbose)
    if _loaded is None:
        return "blip2_fast: the extension failed to build:\n" + "\n".join(_errors.values()) + "\n" + _tails.get("cpu", "")
    if verbose:
        threads = "OpenMP-threaded" if _openmp else "single-threaded: built without OpenMP"
        print(f"blip2_fast: loaded {_path} ({_loaded.upper()} build; CPU kernels {threads})", file=sys.stderr)
    if _loaded == "cpu" and _cuda_toolkit_reason() is None:
        return f"only the CPU kernels loaded: {_errors.get('cuda')}\n{_tails.get('cuda', '')}"
    return None


def unavailable_reason(device: torch.device | str) -> str | None:
    """Why the extension's kernels cannot run on `device`, or None if they can (builds on first call)."""
    device = torch.device(device)
    if device.type == "cuda":
        reason = _cuda_toolkit_reason()  # (no CUDA device visible is one of its reasons)
        if reason is not None:
            return reason
        major, minor = torch.cuda.get_device_capability(device)
        if major != 8 and (major, minor) != (9, 0):
            return (f"the extension's CUDA kernels are compiled for sm_80 (runs on 8.x) and sm_90a; "
                    f"{torch.cuda.get_device_name(device)} is sm_{major}{minor}")
        _load()
        return None if _loaded == "cuda" else _errors.get("cuda", "the CUDA extension did not load")
    if device.type == "cpu":
        _load()
        return None if _loaded is not None else _errors.get("cpu", "the CPU extension did not load")
    return f"the C++/CUDA extension has no kernels for device type {device.type!r}"


def cross_attention(q, k, v, *, key_padding_mask=None, scale=None):
    """Q-Former cross-attention, `torch.ops.blip2_fast.cross_attention_fwd`; spec: `reference.cross_attention_ref`.

    q: [B, H, Nq, D]; k, v: [B, H, Nk, D] (any strides; float32, float16 or bfloat16; D <= 128 on
    CUDA). key_padding_mask: [B, Nk], nonzero/True = keep. scale defaults to D ** -0.5. Returns a
    contiguous [B, H, Nq, D] in q's dtype; a query whose keys are all masked gets zeros.
    """
    if _loaded is None:
        _load()
        if _loaded is None:
            raise RuntimeError(f"blip2_fast: the C++ extension is unavailable: {_errors.get('cpu')}")
    return torch.ops.blip2_fast.cross_attention_fwd(q, k, v, key_padding_mask, scale)


def _require_loaded() -> None:
    if _loaded is None:
        _load()
        if _loaded is None:
            raise RuntimeError(f"blip2_fast: the C++ extension is unavailable: {_errors.get('cpu')}")


def linear_pack(weight, dtype=torch.float32):
    """weight [N, K] packed once for `linear`, `torch.ops.blip2_fast.linear_pack_cpu`: float32
    [ceil(N/32), K, 32] or bfloat16 [ceil(N/32), ceil(K/2), 32, 2] (k pairs). Columns past N and an odd
    K's last pair are zero. Use `blip2_fast.linear_cpu.PackedLinear`, which keeps N and K with it."""
    _require_loaded()
    return torch.ops.blip2_fast.linear_pack_cpu(weight, dtype)


def linear(x, packed, bias, out_features, activation="none", isa="auto", out=None):
    """act(x @ Wᵀ + bias) on the CPU with W packed by `linear_pack`, `torch.ops.blip2_fast.linear_cpu`;
    spec: `reference.linear_ref`.

    x: [..., K], float32 (bf16 weights also take bfloat16); bias: [N] or None; activation: "none",
    "relu" or "gelu" (erf); isa: "auto" or a cap ("avx512_bf16", "avx512", "avx2", "scalar"). Returns
    [..., N] in x's dtype; with `out` (contiguous, that shape and dtype) writes it there and returns it.
    """
    _require_loaded()
    if out is None:
        return torch.ops.blip2_fast.linear_cpu(x, packed, bias, out_features, activation, isa)
    torch.ops.blip2_fast.linear_cpu_out(x, packed, bias, out_features, activation, isa, out)
    return out


def linear_isa(isa="auto") -> str:
    """The kernel `linear` runs for `isa` on this CPU: the cap, lowered to what the CPU has (cpuid)."""
    _require_loaded()
    return torch.ops.blip2_fast.linear_cpu_isa(isa)


def paged_attention(q, k_cache, v_cache, block_tables, seq_lens, scale, rel_bias=None):
    """Decode attention over the paged KV cache on the CPU, `torch.ops.blip2_fast.paged_attention_cpu_fwd`;
    spec: `reference.paged_attention_ref` (same arguments). The GPU runs the Triton kernel instead.

    q: [N, H, D]; k_cache, v_cache: [num_blocks, block_size, H, D] (contiguous along D); block_tables:
    int32 [N, max_blocks]; seq_lens: int32 [N], each in [1, max_blocks * block_size]; rel_bias: [H,
    max_len] or None. Reads only each sequence's own blocks. Returns a contiguous [N, H, D].
    """
    if _loaded is None:
        _load()
        if _loaded is None:
            raise RuntimeError(f"blip2_fast: the C++ extension is unavailable: {_errors.get('cpu')}")
    return torch.ops.blip2_fast.paged_attention_cpu_fwd(q, k_cache, v_cache, block_tables, seq_lens, scale, rel_bias)


def rms_norm(x, weight, eps, residual=None):
    """T5's RMSNorm on the CPU, `torch.ops.blip2_fast.rms_norm_cpu_fwd`; spec: `reference.rms_norm_ref`
    (same arguments and results). x: [..., N] float32, float16 or bfloat16; weight: [N] in any of
    those (its dtype sets T5's rounding step); residual: x's shape, or None. Returns y [..., N] in
    x's dtype, or (y, x + residual) with a residual. A residual of another dtype is added as the
    reference adds it (the promoted dtype), then normalised."""
    _require_loaded()
    if residual is not None and residual.dtype != x.dtype:  # promotion, as `x + residual` promotes
        s = x + residual
        return torch.ops.blip2_fast.rms_norm_cpu_fwd(s, weight, None, float(eps))[0], s
    y, s = torch.ops.blip2_fast.rms_norm_cpu_fwd(x, weight, residual, float(eps))
    return (y, s) if residual is not None else y


def write_kv(k, v, k_cache, v_cache, slot_mapping) -> None:
    """New K/V rows into the paged caches on the CPU, in place, `torch.ops.blip2_fast.write_kv_cpu_fwd`;
    spec: `reference.write_kv_ref` (same arguments). k, v: [T, H, D] (any strides); k_cache, v_cache:
    [num_blocks, block_size, H, D]; slot_mapping: int [T], the flat slot of each row, negative = skip.
    Every slot is checked before anything is written. Caches that are not contiguous go through the
    reference."""
    _require_loaded()
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        from .reference import write_kv_ref

        return write_kv_ref(k, v, k_cache, v_cache, slot_mapping)
    torch.ops.blip2_fast.write_kv_cpu_fwd(k, v, k_cache, v_cache, slot_mapping)


def opt_decode_block(x, ln1, qkv, out_proj, ln2, fc1, fc2, k_cache, v_cache, slot_mapping, block_tables, seq_lens,
                     heads, eps, activation="relu"):
    """One pre-LayerNorm OPT decoder layer at decode on the CPU, in one call,
    `torch.ops.blip2_fast.opt_decode_block_cpu`; spec: `reference.opt_decode_block_ref` (same
    arguments). The four linears must be `PackedLinear`s holding float32 packed weights (the model's
    packed CPU layers); x [N, E] float32. Returns [N, E]."""
    _require_loaded()
    E = x.shape[-1]
    _check_packed_linears("opt_decode_block", [("qkv", qkv, E), ("out_proj", out_proj, E), ("fc1", fc1, E),
                                               ("fc2", fc2, fc1.out_features)], bias=True)
    if qkv.out_features != 3 * E or out_proj.out_features != E or fc2.out_features != E:
        raise ValueError(f"opt_decode_block: for E = {E} the linears must map E -> 3E (qkv), E -> E (out_proj), "
                         f"ffn -> E (fc2); got {qkv.out_features}, {out_proj.out_features}, {fc2.out_features}")
    return torch.ops.blip2_fast.opt_decode_block_cpu(
        x, ln1[0], ln1[1], qkv.packed, qkv.bias, out_proj.packed, out_proj.bias, ln2[0], ln2[1], fc1.packed, fc1.bias,
        fc2.packed, fc2.bias, k_cache, v_cache, slot_mapping, block_tables, seq_lens, heads, fc1.out_features,
        float(eps), activation, qkv.isa)


def t5_decode_block(x, delta, ln_sa, qkv, o, ln_ca, q, o_cross, ln_ff, wi0, wi1, wo, k_cache, v_cache, slot_mapping,
                    block_tables, seq_lens, rel_bias, cross_k, cross_v, cross_block_tables, cross_seq_lens, heads, eps,
                    activation="gelu_tanh"):
    """One T5 decoder layer at decode on the CPU, in one call, `torch.ops.blip2_fast.t5_decode_block_cpu`;
    spec: `reference.t5_decode_block_ref` (same arguments). The linears must be `PackedLinear`s holding
    float32 packed weights and no bias; x (and delta) [N, d] float32. Returns (output, residual stream)."""
    _require_loaded()
    d, inner = x.shape[-1], qkv.out_features // 3
    lins = [("qkv", qkv, d), ("o", o, inner), ("q", q, d), ("o_cross", o_cross, inner), ("wi0", wi0, d),
            ("wo", wo, wi0.out_features)] + ([("wi1", wi1, d)] if wi1 is not None else [])
    _check_packed_linears("t5_decode_block", lins, bias=False)
    if inner % heads or q.out_features != inner or o.out_features != d or o_cross.out_features != d or wo.out_features != d:
        raise ValueError(f"t5_decode_block: for d_model = {d} and {heads} heads the linears must map d -> 3 inner (qkv, "
                         f"inner divisible by heads), d -> inner (q), inner -> d (o, o_cross), d_ff -> d (wo); got "
                         f"{qkv.out_features}, {q.out_features}, {o.out_features}, {o_cross.out_features}, {wo.out_features}")
    return torch.ops.blip2_fast.t5_decode_block_cpu(
        x, delta, ln_sa, qkv.packed, o.packed, ln_ca, q.packed, o_cross.packed, ln_ff, wi0.packed,
        None if wi1 is None else wi1.packed, wo.packed, k_cache, v_cache, slot_mapping, block_tables, seq_lens, rel_bias,
        cross_k, cross_v, cross_block_tables, cross_seq_lens, heads, inner // heads, wi0.out_features, float(eps),
        activation, qkv.isa)


def _check_packed_linears(op: str, lins, bias: bool) -> None:
    """The decoder-layer ops' linears, (name, lin, in_features) each: PackedLinears holding float32
    packed weights (a bf16 packing would round x), all with the first's isa, without a bias unless `bias`."""
    isa = getattr(lins[0][1], "isa", None)
    for name, lin, n_in in lins:
        if (getattr(lin, "packed", None) is None or lin.packed.dtype != torch.float32 or lin.in_features != n_in
                or (lin.bias is not None and not bias) or lin.isa != isa):
            raise ValueError(f"{op}: {name} must be a PackedLinear with a float32 packed weight"
                             f"{'' if bias else ', no bias'}, in_features = {n_in} and the other linears' isa, "
                             f"got {lin!r}")


def greedy_screen(a, base, rel, ban_ptr, ban_ids, max_candidates):
    """The greedy head's candidate screen on the CPU, `torch.ops.blip2_fast.greedy_screen_cpu`; spec:
    `models.greedy_head.screen_candidates_ref` (same arguments and results; `a` is modified in place:
    its banned ids become -inf)."""
    _require_loaded()
    return torch.ops.blip2_fast.greedy_screen_cpu(a, base, rel, ban_ptr, ban_ids, max_candidates)


def greedy_pick(a, h, weight, w_max, r_max, safety, rel, ban_ptr, ban_ids, max_candidates):
    """The greedy head's whole host side after its bf16 GEMM, `torch.ops.blip2_fast.greedy_pick_cpu`;
    spec: `models.greedy_head.ScreenedArgmax.__call__` (the bound's base as `_bound_base`, the screen
    as `screen_candidates_ref`, the candidates rechecked in float64). Returns int64 [n]: each row's
    greedy id, or -1 where the row must be scored in full. `a` is modified in place (the bans)."""
    _require_loaded()
    return torch.ops.blip2_fast.greedy_pick_cpu(a, h, weight, w_max, r_max, safety, rel, ban_ptr, ban_ids,
                                               max_candidates)
