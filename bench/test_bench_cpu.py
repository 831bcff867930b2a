"""CPU benchmark suites (pytest-benchmark): `pytest bench/ --benchmark-only`.

Small shapes, so the whole file also passes as plain tests in well under 30 s. They live in bench/,
outside the `testpaths = ["tests"]` of pyproject.toml, so `pytest` / `pytest tests/` never collect them.
"""
import pytest
import torch

from blip2_fast import reference

pytest.importorskip("pytest_benchmark")

# fixed rounds (benchmark.pedantic) rather than pytest-benchmark's calibration: bounded run time on busy machines
ROUNDS = 20

# (B, H, Nq, Nk, D): Q-Former queries on ViT patches (50 tokens: 42 px / patch 6 + CLS), an OPT prefill
ATTN_SHAPES = [(2, 4, 32, 50, 16), (1, 2, 37, 37, 40)]


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("shape", ATTN_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_attention_ref(benchmark, shape):
    B, H, Nq, Nk, D = shape
    q, k, v = _rand(B, H, Nq, D, seed=1), _rand(B, H, Nk, D, seed=2), _rand(B, H, Nk, D, seed=3)
    out = benchmark.pedantic(reference.attention_ref, (q, k, v), rounds=ROUNDS, warmup_rounds=1)
    assert out.shape == (B, H, Nq, D) and torch.isfinite(out).all()


@pytest.mark.parametrize("M,N", [(257, 384), (33, 1408)])
def test_layer_norm_ref(benchmark, M, N):
    x, w, b = _rand(M, N, seed=1), 1 + 0.1 * _rand(N, seed=2), _rand(N, seed=3)
    out = benchmark.pedantic(reference.layer_norm_ref, (x, w, b, 1e-6), rounds=ROUNDS, warmup_rounds=1)
    y = out[0] if isinstance(out, tuple) else out
    torch.testing.assert_close(y, torch.nn.functional.layer_norm(x, (N,), w, b, 1e-6), atol=1e-5, rtol=1e-5)


def _ext_or_skip():
    from blip2_fast import _ext

    reason = _ext.unavailable_reason("cpu")
    if reason is not None:
        pytest.skip(f"C++ CPU extension unavailable: {reason[:200]}")
    return _ext


@pytest.mark.parametrize("shape", [(2, 12, 32, 257, 64), (8, 4, 32, 257, 64)], ids=lambda s: "x".join(map(str, s)))
def test_cross_attention_cpp(benchmark, shape):
    _ext = _ext_or_skip()
    B, H, Nq, Nk, D = shape
    q, k, v = _rand(B, H, Nq, D, seed=1), _rand(B, H, Nk, D, seed=2), _rand(B, H, Nk, D, seed=3)
    out = benchmark.pedantic(_ext.cross_attention, (q, k, v), rounds=ROUNDS, warmup_rounds=1)
    ref = reference.cross_attention_ref(q, k, v)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("shape", [(2, 12, 32, 257, 64)], ids=lambda s: "x".join(map(str, s)))
def test_cross_attention_ref(benchmark, shape):
    B, H, Nq, Nk, D = shape
    q, k, v = _rand(B, H, Nq, D, seed=1), _rand(B, H, Nk, D, seed=2), _rand(B, H, Nk, D, seed=3)
    out = benchmark.pedantic(reference.cross_attention_ref, (q, k, v), rounds=ROUNDS, warmup_rounds=1)
    assert out.shape == (B, H, Nq, D)


@pytest.fixture(scope="module")
def tiny_model():
    import warnings

    from blip2_fast.presets import load_preset

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return load_preset("blip2-opt-tiny", device="cpu", dtype=torch.float32, seed=0)


def test_generate_tiny(benchmark, tiny_model):
    S = tiny_model.cfg.vision.image_size
    pxs = iter([_rand(4, 3, S, S, seed=s) for s in range(1000)])  # fresh images: features are cached by digest

    def gen():
        return tiny_model.generate(next(pxs), max_new_tokens=8, min_new_tokens=8)

    out = benchmark.pedantic(gen, rounds=5, warmup_rounds=1)
    assert out.shape == (4, tiny_model.cfg.num_query_tokens + 1 + 8)


# (B, H, S, D): the CPU benchmark's 6-head encoder over 257 tokens, ViT-g's 16 heads of 88 (batch 1)
@pytest.mark.parametrize("impl", ["sdpa", "ref"])
@pytest.mark.parametrize("shape", [(8, 6, 257, 64), (1, 16, 257, 88)], ids=lambda s: "x".join(map(str, s)))
def test_vision_attention_cpu(benchmark, shape, impl):
    from blip2_fast import ops_cpu

    B, H, S, D = shape
    q, k, v = _rand(B, H, S, D, seed=1), _rand(B, H, S, D, seed=2), _rand(B, H, S, D, seed=3)
    fn = ops_cpu.attention if impl == "sdpa" else reference.attention_ref
    out = benchmark.pedantic(fn, (q, k, v), rounds=ROUNDS, warmup_rounds=1)
    torch.testing.assert_close(out, reference.attention_ref(q, k, v), atol=1e-4, rtol=1e-4)


def _paged(N, H, D, L, bs=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = -(-L // bs)
    nb = N * W + 1
    kc, vc = torch.randn(nb, bs, H, D, generator=g), torch.randn(nb, bs, H, D, generator=g)
    tables = torch.randperm(nb, generator=g)[: N * W].view(N, W).to(torch.int32)
    return torch.randn(N, H, D, generator=g), kc, vc, tables, torch.full((N,), L, dtype=torch.int32)


# (N, H, D, context): batch-8 decode of the CPU benchmark's LM, one OPT-2.7B-shaped sequence
@pytest.mark.parametrize("impl", ["cpp", "ref"])
@pytest.mark.parametrize("shape", [(8, 8, 64, 60), (1, 32, 80, 300)], ids=lambda s: "x".join(map(str, s)))
def test_paged_attention_cpu(benchmark, shape, impl):
    args = _paged(*shape)
    fn = _ext_or_skip().paged_attention if impl == "cpp" else reference.paged_attention_ref
    out = benchmark.pedantic(fn, (*args, 0.125), rounds=ROUNDS, warmup_rounds=1)
    torch.testing.assert_close(out, reference.paged_attention_ref(*args, 0.125), atol=1e-5, rtol=1e-5)


# greedy choice over a 50304-way fp32 head at batch 8: the bf16 screen against the full fp32 logits
@pytest.mark.parametrize("impl", ["screened", "fp32"])
def test_greedy_head(benchmark, impl):
    from blip2_fast.models.greedy_head import ScreenedArgmax, argmax_ref

    w, h = _rand(50304, 512, seed=1) / 512 ** 0.5, _rand(8, 512, seed=2)
    fn = ScreenedArgmax(w) if impl == "screened" else (lambda x: argmax_ref(x, w).tolist())
    out = benchmark.pedantic(fn, (h,), rounds=ROUNDS, warmup_rounds=1)
    assert out == argmax_ref(h, w).tolist()
