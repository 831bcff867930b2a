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
def test_layernorm_ref(benchmark, M, N):
    x, w, b = _rand(M, N, seed=1), 1 + 0.1 * _rand(N, seed=2), _rand(N, seed=3)
    out = benchmark.pedantic(reference.layernorm_ref, (x, w, b, 1e-6), rounds=ROUNDS, warmup_rounds=1)
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
