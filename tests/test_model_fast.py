"""The whole model on the fast backend still matches transformers: logits within 1e-3 relative in
fp32 and identical greedy tokens; and no fast op silently falls back to its reference.

On a CPU, `bind` prefers the CPU-native fast implementations (torch's SDPA, the C++ extension) and
interprets Triton only for ops without one; the `triton` variant below reorders the registry so that
every op with a Triton kernel runs it (interpreted), exercising the GPU kernels inside the model."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

import blip2_fast
from blip2_fast import ops
from conftest import image_prompt


def test_every_fast_op_binds_fast():
    reasons = {n: ops.unavailable_reason(n, "cpu") for n in ops.OP_NAMES if ops.has_fast(n)}
    assert not any(reasons.values()), f"fast ops that would fall back on this machine: {reasons}"
    bound = ops.bind("fast", None, "cpu")
    assert all(v == "fast" for v in bound.impls.values()), bound.impls
    for name in ops.OP_NAMES:
        assert getattr(bound, name) is ops.get(name, "fast", "cpu")


@pytest.mark.parametrize("prefer", ["native", "triton"])
@pytest.mark.parametrize("lm", ["opt", "t5"])
def test_fast_backend_matches_transformers(ckpt, lm, prefer, monkeypatch):
    if prefer == "triton":
        candidates = ops._candidates
        monkeypatch.setattr(ops, "_candidates", lambda name, dev: sorted(candidates(name, dev), key=lambda f: f.kind != "triton"))
    d, hf = ckpt(lm)
    m = blip2_fast.load(d, backend="fast")
    assert set(m.impls.values()) == {"fast"}, m.impls
    kernel = {"native": "blip2_fast.ops_cpu", "triton": "blip2_fast.kernels.attention"}[prefer]
    assert m.ops.attention.__module__ == kernel
    assert m.ops.paged_attention.__module__ == {"native": "blip2_fast._ext", "triton": "blip2_fast.kernels.paged_attention"}[prefer]
    pv, ids, mask = image_prompt(hf, 2, pads=((1, 2),))
    kw = {"decoder_input_ids": torch.randint(2, 200, (2, 4), generator=torch.Generator().manual_seed(0))} if lm == "t5" else {}
    with torch.no_grad():
        ref = hf(pixel_values=pv, input_ids=ids, attention_mask=mask, **kw).logits
    out = m(pixel_values=pv, input_ids=ids, attention_mask=mask, **kw).logits
    valid = mask.bool() if lm == "opt" else torch.ones(ref.shape[:2], dtype=torch.bool)
    err = ((out - ref).abs()[valid].max() / ref[valid].abs().max()).item()
    assert err <= 1e-3, f"relative logits error {err:.2e}"
    with torch.no_grad():
        g_ref = hf.generate(pixel_values=pv, input_ids=ids, attention_mask=mask, max_new_tokens=6)
    g = m.generate(pv, input_ids=ids, attention_mask=mask, max_new_tokens=6)
    assert torch.equal(g, g_ref), f"\n{g}\n{g_ref}"


def test_qformer_features_with_the_extension(ckpt):
    """The C++ cross-attention in the Q-Former: features within 1e-4 of transformers in fp32."""
    d, hf = ckpt("opt")
    m = blip2_fast.load(d, backend="reference", ops={"cross_attention": "fast"})
    assert m.impls["cross_attention"] == "fast"
    pv, _, _ = image_prompt(hf, 3)
    with torch.no_grad():
        ref = hf.get_image_features(pv).qformer_outputs.last_hidden_state
    got = m.get_qformer_features(pv)
    err = ((got - ref).abs().max() / ref.abs().max()).item()
    assert err <= 1e-4, f"relative error {err:.2e}"


def test_model_traces_with_torch_compile_fullgraph(ckpt):
    """Every fast op is a torch.library custom op with a fake: the vision encoder + Q-Former and a
    paged decode step trace as one graph each (aot_eager: tracing only, no code generation)."""
    d, hf = ckpt("opt")
    m = blip2_fast.load(d, backend="fast")
    pv, ids, _ = image_prompt(hf, 2)
    want = m.get_qformer_features(pv)
    f = torch.compile(lambda x: m._qformer_queries(m.vision(x)[0]), fullgraph=True, backend="aot_eager")
    with torch.inference_mode():
        assert torch.allclose(f(pv), want, atol=1e-5)
    eng = blip2_fast.Engine(m, num_blocks=32, block_size=4)
    eng.add_request(0, pixel_values=pv[0], prompt=ids[0], sampling=blip2_fast.SamplingParams(max_new_tokens=3))
    eng.step()  # prefill
    plan = eng.scheduler.schedule()  # the next decode step's sequences, with their slots reserved
    eng.runner.staging.reset()
    ins = eng.runner.prepare_decode(plan.batch)
    eng.runner.staging.send()
    eager = eng.runner.forward_decode(ins)
    step = torch.compile(eng.runner.forward_decode, fullgraph=True, backend="aot_eager")
    with torch.inference_mode():
        assert torch.allclose(step(ins), eager, atol=1e-5)
