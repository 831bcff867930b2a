"""The sm_90 compile report: every kernel config compiled for an H100/H200, no GPU needed.

    python -m bench.sm90_compile [--kernels attention,paged_attention,...] [--defaults-only] [--out FILE]

Compiles each Triton kernel exactly as its host function would launch it (the arguments come from
the kernel module's own `launch_args`, so strides, alignment and constexprs are those of a real
call on representative BLIP-2 shapes), for every config the host would launch: the untuned default
(`BLIP2_FAST_AUTOTUNE=0`, what tests run) and every autotune candidate its pruning keeps. Triton's
bundled ptxas compiles for sm_90 and its cuobjdump reads the cubin: registers, the stack frame
(spills), shared memory, and instruction counts that say whether the code is on the fast path
(wgmma / cp.async / 16-byte global loads / TMA; local loads and stores are spills). The CUDA
kernels (csrc/*.cu) are compiled with nvcc for sm_90a and read the same way.

Writes bench/results/sm90-compile-<date>.json (or --out), merging with what is there: one section
per Triton version, so the CI lane's Triton and the GPU machine's (3.6) sit side by side; a run of
some --kernels replaces only their rows. Exit
status 1 if a default config spills or fails to compile. Runs in its own process: the kernels must
be imported with TRITON_INTERPRET off.
"""
from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "0"  # before any kernel module is imported: compile, not interpret

import argparse  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import BaseBackend, GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.jit import native_specialize_impl  # noqa: E402

TOOLS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
RESULTS = Path(__file__).parent / "results"


def _cuobjdump() -> str:
    return str(TOOLS / "cuobjdump")


def _count(text: str, *needles: str) -> int:
    return sum(text.count(n) for n in needles)


def _sass_stats(cubin: bytes) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        usage = subprocess.run([_cuobjdump(), "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([_cuobjdump(), "-sass", f.name], capture_output=True, text=True, check=True).stdout
    regs, stack = map(int, re.search(r"REG:(\d+) STACK:(\d+)", usage).groups())
    return {"regs": regs, "stack_bytes": stack, "local_ld_st": len(re.findall(r"\b(?:LDL|STL)\b", sass)),
            "hgmma": len(re.findall(r"\bHGMMA\b", sass)), "hmma": len(re.findall(r"\bHMMA\b", sass)),
            "ldgsts": len(re.findall(r"\bLDGSTS\b", sass)), "utmaldg": len(re.findall(r"\bUTMALDG\b", sass))}


def compile_launch(fn, args: tuple, meta: dict, num_warps: int, num_stages: int) -> dict:
    """Compile `fn` for sm_90 as a launch with these runtime `args` (positional, in order, without
    the constexprs) and constexprs `meta` would; returns its resource report."""
    names = [n for n in fn.arg_names if n not in meta]
    if len(names) != len(args):
        raise ValueError(f"{fn.__name__}: {len(args)} runtime arguments for {len(names)} parameters {names}")
    sig, consts, attrs = {}, dict(meta), {}
    for n, a in zip(names, args):
        ty, key = native_specialize_impl(BaseBackend, a, False, True, True)  # what a launch specializes on
        if ty == "constexpr":
            consts[n] = key
        elif key == "D":
            attrs[(fn.arg_names.index(n),)] = [["tt.divisibility", 16]]
        sig[n] = ty
    sig = {n: "constexpr" if n in consts else sig[n] for n in fn.arg_names}
    t0 = time.perf_counter()
    k = triton.compile(ASTSource(fn, sig, constexprs=consts, attrs=attrs), target=GPUTarget("cuda", 90, 32),
                       options={"num_warps": num_warps, "num_stages": num_stages})
    ptx = k.asm["ptx"]
    out = {"smem_bytes": k.metadata.shared, **_sass_stats(k.asm["cubin"]),
           "cp_async": _count(ptx, "cp.async.cg.shared.global", "cp.async.ca.shared.global"),
           "ld_global_v4": _count(ptx, "ld.global.v4", "ld.global.nc.v4"),
           "tma": _count(ptx, "cp.async.bulk.tensor"), "wgmma": _count(ptx, "wgmma.mma_async"),
           "compile_s": round(time.perf_counter() - t0, 1)}
    return out


def _cfg(c) -> dict:
    return {**c.kwargs, "num_warps": c.num_warps, "num_stages": c.num_stages}


def _key(c: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in c.items())


# ----------------------------------------------------------------------------------- the cases
# Each yields (case, shape-class description, fn, args, meta, config dict, is_default).


def attention_cases(defaults_only: bool):
    from blip2_fast.kernels import attention as A

    def fused(B, H, S, D, dt):
        qkv = torch.empty(B, S, 3, H, D, dtype=dt)  # (B, S, 3, H, D): one projection, as the models have it
        return tuple(qkv[:, :, i].transpose(1, 2) for i in range(3))

    bf = torch.bfloat16
    cases = []
    q, k, v = fused(2, 16, 257, 88, bf)
    cases.append(("vitg 257x257 D88", (q, k, v, None, None, False)))
    q, k, v = fused(2, 32, 512, 80, bf)
    cases.append(("opt prefill 512 D80 causal+kpm", (q, k, v, torch.ones(2, 512, dtype=torch.bool), None, True)))
    q, k, v = fused(2, 32, 512, 128, bf)
    cases.append(("opt-6.7b prefill 512 D128 causal", (q, k, v, None, None, True)))
    q, k, v = fused(2, 12, 32, 64, bf)
    cases.append(("qformer self 32 D64 kpm", (q, k, v, torch.ones(2, 32, dtype=torch.bool), None, False)))
    q = torch.empty(2, 32, 12, 64, dtype=bf).transpose(1, 2)
    kv = torch.empty(2, 257, 6, 2, 12, 64, dtype=bf)  # the Q-Former's batched image K/V projection
    cases.append(("qformer cross 32x257 D64", (q, kv[:, :, 0, 0].transpose(1, 2), kv[:, :, 0, 1].transpose(1, 2),
                                                None, None, False)))
    q, k, v = fused(2, 32, 512, 64, bf)
    bias = torch.empty(1, 32, 512, 512, dtype=bf)
    cases.append(("t5 encoder 512 D64 bias+kpm", (q, k, v, torch.ones(2, 512, dtype=torch.bool), bias, False)))
    cases.append(("t5 decoder 512 D64 causal+bias+kpm", (q, k, v, torch.ones(2, 512, dtype=torch.bool), bias, True)))
    q, k, v = fused(1, 2, 111, 256, bf)
    cases.append(("D256 111", (q, k, v, None, None, False)))
    q, k, v = fused(2, 16, 257, 88, torch.float32)
    cases.append(("vitg 257x257 D88 fp32", (q, k, v, None, None, False)))
    for name, (q, k, v, kpm, bias, causal) in cases:
        _, args, meta = A.launch_args(q, k, v, kpm, bias, causal, 0.1)
        Sq, D, Sk = q.shape[2], q.shape[3], k.shape[2]
        default = A.untuned_config(q.dtype, Sq, D, causal, kpm is not None, bias is not None)
        pruned = A._prune_configs(A._CONFIGS, {**meta, "q_bucket": args[-2], "k_bucket": args[-1], "Sk": Sk,
                                               "dtype": q.dtype})
        for c in ([default] if defaults_only else pruned):
            m = {**meta, "EVEN_N": Sk % c.kwargs["BLOCK_N"] == 0, **c.kwargs}
            # the dot width the head dim runs at, against the next power of two it was padded to before
            cfg = {**_cfg(c), "head_dim": D, "dot_width": meta["BLOCK_D1"] + meta["BLOCK_D2"] * meta["SPLIT_D"],
                   "padded_width": max(16, triton.next_power_of_2(D))}
            yield name, A._attn_fwd_kernel, args, m, cfg, c is default


def _launch_opts(meta: dict) -> tuple[dict, dict]:
    """meta without the launch options, and {num_warps, num_stages} (Triton's default 3 stages)."""
    m = dict(meta)
    return m, {"num_warps": m.pop("num_warps", 4), "num_stages": m.pop("num_stages", 3)}


def paged_attention_cases(defaults_only: bool):
    from blip2_fast.kernels import paged_attention as P

    bs = 16
    for D, H, single, bias, dt in ((80, 32, True, False, torch.bfloat16), (80, 32, False, False, torch.bfloat16),
                                   (88, 16, False, True, torch.bfloat16), (64, 32, True, True, torch.bfloat16),
                                   (128, 32, True, False, torch.bfloat16), (256, 8, False, False, torch.bfloat16),
                                   (80, 32, True, False, torch.float32)):
        kc = torch.empty(64, bs, H, D, dtype=dt)
        q = torch.empty(4, 3, H, D, dtype=dt)[:, 0]  # a view of a fused qkv projection
        bt = torch.zeros(4, 64, dtype=torch.int32)
        lens = torch.ones(4, dtype=torch.int32)
        rel = torch.empty(H, 2048, dtype=dt) if bias else None
        _, grid, args, meta, merge = P.launch_args(q, kc, kc, bt, lens, 0.1, rel, 1 if single else 4, 1024)
        meta, opts = _launch_opts(meta)
        name = (f"decode H{H} D{D}{' split' if not single else ''}{' rel_bias' if bias else ''}"
                f"{' fp32' if dt == torch.float32 else ''}")
        yield name, P._paged_attention_split_kernel, args, meta, {"BLOCK_N": meta["BLOCK_N"], **opts}, True
        if merge is not None and D == 80:
            mmeta, mopts = _launch_opts(merge[2])
            yield f"merge D{D}", P._paged_attention_merge_kernel, merge[1], mmeta, mopts, True


def write_kv_cases(defaults_only: bool):
    from blip2_fast.kernels import write_kv as W

    for D, H in ((80, 32), (88, 16), (64, 32), (128, 32)):
        kv = torch.empty(64, 3, H, D, dtype=torch.bfloat16)  # k, v as views of a fused projection
        cache = torch.empty(128, 16, H, D, dtype=torch.bfloat16)
        _, args, meta = W.launch_args(kv[:, 1], kv[:, 2], cache, cache, torch.zeros(64, dtype=torch.int64))
        meta, opts = _launch_opts(meta)
        yield f"H{H} D{D}", W._write_kv_kernel, args, meta, {"BLOCK_H": meta["BLOCK_H"], **opts}, True


def norm_cases(defaults_only: bool):
    from blip2_fast.kernels import layer_norm as LN, ln_linear_gelu as LLG, rms_norm as RN

    for rows, n, name in ((16448, 1408, "vitg"), (2048, 768, "qformer"), (8192, 2560, "opt-2.7b"),
                          (8192, 2048, "t5-xl"), (4096, 4096, "t5-xxl")):
        x = torch.empty(rows, n, dtype=torch.bfloat16)
        w = torch.empty(n, dtype=torch.bfloat16)
        for res in (False, True):
            *_, args, meta = LN.launch_args(x, w, w, x if res else None, 1e-5)
            meta, opts = _launch_opts(meta)
            cfg = {"ROWS": meta["ROWS"], "BLOCK_N": meta["BLOCK_N"], **opts}
            yield f"layer_norm {name} {rows}x{n}{' +residual' if res else ''}", LN._layer_norm_fwd_kernel, args, meta, cfg, True
            if name.startswith("t5"):
                *_, args, meta = RN.launch_args(x, w, x if res else None, 1e-6)
                meta, opts = _launch_opts(meta)
                yield f"rms_norm {name} {rows}x{n}{' +residual' if res else ''}", RN._rms_norm_fwd_kernel, args, meta, cfg, True
        if name == "vitg":
            *_, args, meta = LLG.row_stats_launch(x, 1e-6)
            meta, opts = _launch_opts(meta)
            yield f"ln_linear_gelu row stats {rows}x{n}", LLG._row_stats_kernel, args, meta, {**meta, **opts}, True


def gemm_cases(defaults_only: bool):
    from blip2_fast.kernels import linear_gelu as LG

    bf = torch.bfloat16
    for name, M, K, N, norm, approx, dt in (("vitg fc1 (ln_linear_gelu)", 16448, 1408, 6144, True, "none", bf),
                                             ("qformer fc1 (linear_gelu)", 2048, 768, 3072, False, "none", bf),
                                             ("t5-xl wi_0 (linear_gelu tanh)", 4096, 2048, 5120, False, "tanh", bf),
                                             ("vitg fc1 (ln_linear_gelu) fp32", 4096, 1408, 6144, True, "none", torch.float32),
                                             ("qformer fc1 (linear_gelu) fp32", 2048, 768, 3072, False, "none", torch.float32)):
        x = torch.empty(M, K, dtype=dt)
        w = torch.empty(N, K, dtype=dt)
        b = torch.empty(N, dtype=dt) if name.startswith(("vitg", "qformer")) else None
        stats = torch.empty(M, dtype=torch.float32)
        kw = dict(mean=stats, rstd=stats, ln_weight=w[0], ln_bias=w[0]) if norm else {}
        _, args, meta = LG.launch_args(x, w, b, approx, tma=True, **kw)
        default = LG._prune_configs(LG._CONFIGS, {"m_bucket": args[-2], "N": N, "tma_ok": 0, **meta})[0]  # untuned launch
        configs = [default] if defaults_only else LG._prune_configs(LG._CONFIGS, {"m_bucket": args[-2], "N": N,
                                                                                 **meta, "tma_ok": 1})
        for c in configs:
            m = {**meta, **c.kwargs}
            if c.kwargs["USE_TMA"]:
                LG._set_tma_blocks({"X_DESC": args[8], "W_DESC": args[9], **m})
            yield name, LG._linear_gelu_kernel, args, m, _cfg(c), c is default


def dropped_cases():
    """Configs taken out of the candidate lists, compiled again so the report shows why: each yields
    (kernel, case, fn, args, meta, config, reason)."""
    import triton as _t

    from blip2_fast.kernels import attention as A, linear_gelu as LG, paged_attention as P

    bf = torch.bfloat16
    qkv = torch.empty(2, 257, 3, 16, 88, dtype=bf)
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
    _, args, meta = A.launch_args(q, k, v, None, None, False, 0.1)
    yield ("attention", "vitg 257x257 D88", A._attn_fwd_kernel, args, {**meta, "EVEN_N": False, "BLOCK_M": 128, "BLOCK_N": 64},
           {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3}, "128x64 with 4 warps: spills (dropped before)")
    qkv = torch.empty(2, 512, 3, 32, 80, dtype=bf)
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
    _, args, meta = A.launch_args(q, k, v, torch.ones(2, 512, dtype=torch.bool), None, True, 0.1)
    yield ("attention", "opt prefill 512 D80 causal+kpm", A._attn_fwd_kernel, args,
           {**meta, "EVEN_N": True, "BLOCK_M": 32, "BLOCK_N": 64}, {"BLOCK_M": 32, "BLOCK_N": 64, "num_warps": 4, "num_stages": 2},
           "32x64 with 4 warps past 64-wide heads: at the register limit, spills at D=80 causal (32x32 is used there)")
    qkv = torch.empty(1, 111, 3, 2, 256, dtype=bf)
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
    _, args, meta = A.launch_args(q, k, v, None, None, False, 0.1)
    yield ("attention", "D256 111", A._attn_fwd_kernel, args, {**meta, "EVEN_N": False, "BLOCK_M": 64, "BLOCK_N": 64},
           {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3}, "64x64 with 4 warps past 128-wide heads: spills")
    x, w = torch.empty(16448, 1408, dtype=bf), torch.empty(6144, 1408, dtype=bf)
    st = torch.empty(16448, dtype=torch.float32)
    _, args, meta = LG.launch_args(x, w, w[0], "none", mean=st, rstd=st, ln_weight=x[0], ln_bias=x[0], tma=False)
    for bm, bn, warps, stages in ((128, 256, 8, 3), (256, 128, 8, 3), (128, 128, 4, 4)):
        c = {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": 64, "GROUP_M": 8, "USE_TMA": False, "NUM_PROGS": 0}
        yield ("gemm_gelu", "vitg fc1 (ln_linear_gelu)", LG._linear_gelu_kernel, args, {**meta, **c},
               {**c, "num_warps": warps, "num_stages": stages}, f"{bm}x{bn} with {warps} warps: spills in the GELU epilogue")
    _, args, meta = LG.launch_args(x, w, w[0], "none", mean=st, rstd=st, ln_weight=x[0], ln_bias=x[0], tma=True)
    for stages in (4, 3):
        c = {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8, "USE_TMA": True, "NUM_PROGS": 132}
        LG._set_tma_blocks({"X_DESC": args[8], "W_DESC": args[9], **c})
        yield ("gemm_gelu", "vitg fc1 (ln_linear_gelu)", LG._linear_gelu_kernel, args, {**meta, **c},
               {**c, "num_warps": 8, "num_stages": stages},
               "persistent TMA with the LayerNorm prologue: at the register limit (spills under Triton 3.9)")
    kc = torch.empty(64, 16, 32, 80, dtype=bf)
    qd = torch.empty(4, 3, 32, 80, dtype=bf)[:, 0]
    _, _, args, meta, _ = P.launch_args(qd, kc, kc, torch.zeros(4, 64, dtype=torch.int32), torch.ones(4, dtype=torch.int32),
                                        0.1, None, 1, 1024)
    meta.pop("num_warps")
    for bn, warps, why in ((64, 4, "double-buffered 64-token tiles with 4 warps: 170-215 registers a thread (8 warps: "
                                   "about 128), so half the programs per SM"),
                           (32, 4, "32-token tiles with 4 warps: spilled 16 bytes at D=80 under Triton 3.6")):
        yield ("paged_attention", "decode H32 D80", P._paged_attention_split_kernel, args, {**meta, "BLOCK_N": bn},
               {"BLOCK_N": bn, "num_warps": warps, "num_stages": 3}, why)
    del _t


KERNELS = {"attention": attention_cases, "paged_attention": paged_attention_cases, "write_kv": write_kv_cases,
           "norms": norm_cases, "gemm_gelu": gemm_cases}


# ------------------------------------------------------------------------------------ the CUDA


def cuda_cases() -> list[dict]:
    """csrc/*.cu for sm_90a (as the extension builds them): each kernel instantiation's resources."""
    nvcc = shutil.which("nvcc") or os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc")
    if not os.path.exists(nvcc):
        return [{"kernel": "csrc", "error": "nvcc not found"}]
    csrc = Path(__file__).resolve().parents[1] / "csrc"
    out = []
    for cu in sorted(csrc.glob("*.cu")):
        with tempfile.TemporaryDirectory() as d:
            cubin = Path(d) / "k.cubin"
            r = subprocess.run([nvcc, "-cubin", "-std=c++17", "-O3", "-gencode=arch=compute_90a,code=sm_90a",
                                f"-I{csrc}", str(cu), "-o", str(cubin)], capture_output=True, text=True)
            if r.returncode != 0:
                out.append({"kernel": cu.name, "error": r.stderr[-2000:]})
                continue
            usage = subprocess.run([_cuobjdump(), "-res-usage", str(cubin)], capture_output=True, text=True).stdout
            sass = subprocess.run([_cuobjdump(), "-sass", str(cubin)], capture_output=True, text=True).stdout
        funcs = re.findall(r"Function (\S+):\s*\n\s*REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", usage)
        # split the SASS per function to count its instructions
        bodies = dict(re.findall(r"Function : (\S+)\n(.*?)(?=\n\s*Function : |\Z)", sass, flags=re.S))
        for name, regs, stack, shared, local in funcs:
            body = bodies.get(name, "")
            demangled = subprocess.run(["c++filt", name], capture_output=True, text=True).stdout.strip() or name
            out.append({"kernel": cu.name, "function": demangled, "regs": int(regs), "stack_bytes": int(stack),
                        "static_smem_bytes": int(shared), "local_bytes": int(local),
                        "local_ld_st": len(re.findall(r"\b(?:LDL|STL)\b", body)),
                        "hmma": len(re.findall(r"\bHMMA\b", body)), "ffma": len(re.findall(r"\bFFMA\b", body)),
                        "ldgsts": len(re.findall(r"\bLDGSTS\b", body))})
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kernels", default=",".join(KERNELS), help=f"comma-separated, of {','.join(KERNELS)},cuda")
    ap.add_argument("--defaults-only", action="store_true", help="only the untuned default configs (what tests launch)")
    ap.add_argument("--no-cuda", action="store_true", help="skip csrc/*.cu")
    ap.add_argument("--out", default=None, help="JSON to write (merged); default bench/results/sm90-compile-<date>.json")
    ap.add_argument("--no-write", action="store_true", help="do not write the results file")
    ap.add_argument("--no-dropped", action="store_true", help="skip the configs taken out of the candidate lists")
    ap.add_argument("--json", default=None, help="also write this run's rows here (tests read it)")
    a = ap.parse_args(argv)
    if not (TOOLS / "ptxas").exists():
        print(f"SKIP: Triton's bundled ptxas is not installed ({TOOLS})")
        return 0
    wanted = [k.strip() for k in a.kernels.split(",") if k.strip()]
    rows, bad = [], []
    for kname in wanted:
        if kname == "cuda":
            continue
        for case, fn, args, meta, cfg, default in KERNELS[kname](a.defaults_only):
            row = {"kernel": kname, "case": case, "config": cfg, "default": default}
            try:
                row.update(compile_launch(fn, args, meta, cfg["num_warps"], cfg["num_stages"]))
            except Exception as e:  # a config that does not compile is a finding, not a crash
                row["error"] = f"{type(e).__name__}: {str(e)[:500]}"
            rows.append(row)
            spill = row.get("stack_bytes", 0) or row.get("local_ld_st", 0)
            flag = "ERROR" if "error" in row else ("SPILL" if spill else "ok")
            if default and flag != "ok":
                bad.append(row)
            print(f"{flag:5s} {kname:16s} {case:36s} {_key(cfg):58s} regs={row.get('regs')} stack={row.get('stack_bytes')} "
                  f"smem={row.get('smem_bytes')} wgmma={row.get('wgmma')} cp.async={row.get('cp_async')} "
                  f"v4={row.get('ld_global_v4')} tma={row.get('tma')}{' DEFAULT' if default else ''}", flush=True)
    if not a.defaults_only and not a.no_dropped:
        for kname, case, fn, args, meta, cfg, reason in dropped_cases():
            if kname not in wanted:
                continue
            row = {"kernel": kname, "case": case, "config": cfg, "default": False, "dropped": reason}
            try:
                row.update(compile_launch(fn, args, meta, cfg["num_warps"], cfg["num_stages"]))
            except Exception as e:
                row["error"] = f"{type(e).__name__}: {str(e)[:500]}"
            rows.append(row)
            print(f"DROP  {kname:16s} {case:36s} {_key(cfg):58s} regs={row.get('regs')} stack={row.get('stack_bytes')} "
                  f"smem={row.get('smem_bytes')}: {reason}", flush=True)
    cuda = [] if a.no_cuda or ("cuda" not in wanted and a.kernels != ",".join(KERNELS)) else cuda_cases()
    for r in cuda:
        print(f"{'ERROR' if 'error' in r else ('SPILL' if r.get('stack_bytes') else 'ok'):5s} cuda {r.get('function', r['kernel'])[:110]} "
              f"regs={r.get('regs')} stack={r.get('stack_bytes')} hmma={r.get('hmma')} ldgsts={r.get('ldgsts')}")
    if not a.no_write:
        path = Path(a.out) if a.out else RESULTS / f"sm90-compile-{datetime.date.today().isoformat()}.json"
        data = json.loads(path.read_text()) if path.exists() else {}
        section = f"triton {triton.__version__}"
        old = data.get("runs", {}).get(section, {})
        if old and old.get("defaults_only") == a.defaults_only:  # a partial rerun replaces its kernels' rows only
            rows = [r for r in old.get("triton_kernels", []) if r["kernel"] not in wanted] + rows
            if not cuda:
                cuda = old.get("cuda_kernels", [])
        data.setdefault("runs", {})[section] = {
            "triton": triton.__version__, "torch": torch.__version__, "python": sys.version.split()[0],
            "target": "cuda sm_90 (Triton) / sm_90a (nvcc)", "defaults_only": a.defaults_only,
            "when": datetime.datetime.now().isoformat(timespec="seconds"), "triton_kernels": rows,
            **({"cuda_kernels": cuda} if cuda else {})}
        data["about"] = ("bench/sm90_compile.py: every kernel config compiled for sm_90 without a GPU; stack_bytes / "
                         "local_ld_st > 0 means register spills. One section per Triton version.")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data, indent=1) + "\n")
        print(f"wrote {path}")
    if a.json:
        Path(a.json).write_text(json.dumps({"triton": triton.__version__, "triton_kernels": rows, "cuda_kernels": cuda}))
    kept_spills = [r for r in rows if not r["default"] and not r.get("dropped") and r.get("stack_bytes")]
    print(f"{len(rows)} Triton configs compiled with Triton {triton.__version__}; defaults spilling or failing: {len(bad)}; "
          f"kept autotune candidates spilling: {len(kept_spills)}; CUDA kernels: {len(cuda)}", flush=True)
    for r in bad:
        print(f"DEFAULT CONFIG {'FAILED' if 'error' in r else 'SPILLS'}: {r['kernel']} {r['case']} {_key(r['config'])} "
              f"{r.get('error', '')}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
