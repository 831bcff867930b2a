"""GPU-only: the whole model on the compiled fast path (Triton + CUDA extension + CUDA graphs)
against the CPU reference: fp32 token-identical, bf16 within bf16 tolerance."""
import pytest
import torch

import blip2_fast
from conftest import image_prompt

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("lm", ["opt", "t5"])
def test_fast_gpu_fp32_matches_cpu_reference(ckpt, lm):
    d, hf = ckpt(lm)
    ref = blip2_fast.load(d, device="cpu", dtype=torch.float32, backend="reference")
    fast = blip2_fast.load(d, device="cuda", dtype=torch.float32, backend="fast")
    assert set(fast.impls.values()) == {"fast"}, fast.impls
    pv, ids, mask = image_prompt(hf, 3, pads=((1, 2), (2, 4)))
    kw = {"decoder_input_ids": torch.zeros(3, 2, dtype=torch.long)} if lm == "t5" else {}
    a = ref(pixel_values=pv, input_ids=ids, attention_mask=mask, **kw).logits
    b = fast(pixel_values=pv.cuda(), input_ids=ids.cuda(), attention_mask=mask.cuda(),
             **{k: v.cuda() for k, v in kw.items()}).logits.cpu()
    valid = mask.bool() if lm == "opt" else torch.ones(a.shape[:2], dtype=torch.bool)
    assert ((a - b).abs()[valid].max() / a[valid].abs().max()).item() < 1e-3
    for gen in (dict(max_new_tokens=8), dict(max_new_tokens=6, num_beams=3)):
        want = ref.generate(pv, input_ids=ids, attention_mask=mask, **gen)
        got = fast.generate(pv.cuda(), input_ids=ids.cuda(), attention_mask=mask.cuda(), **gen).cpu()
        assert torch.equal(got, want), f"{gen}\n{got}\n{want}"


@pytest.mark.parametrize("lm", ["opt", "t5"])
def test_fast_gpu_bf16_close_to_reference(ckpt, lm):
    d, hf = ckpt(lm)
    ref = blip2_fast.load(d, device="cpu", dtype=torch.float32, backend="reference")
    fast = blip2_fast.load(d, device="cuda", dtype=torch.bfloat16, backend="fast")
    pv, ids, mask = image_prompt(hf, 2, pads=((1, 2),))
    kw = {"decoder_input_ids": torch.zeros(2, 2, dtype=torch.long)} if lm == "t5" else {}
    a = ref(pixel_values=pv, input_ids=ids, attention_mask=mask, **kw).logits
    b = fast(pixel_values=pv.cuda(), input_ids=ids.cuda(), attention_mask=mask.cuda(),
             **{k: v.cuda() for k, v in kw.items()}).logits.float().cpu()
    valid = mask.bool() if lm == "opt" else torch.ones(a.shape[:2], dtype=torch.bool)
    err = ((a - b).abs()[valid].max() / a[valid].abs().max()).item()
    assert err < 5e-2, f"bf16 relative logits error {err:.3e}"
    out = fast.generate(pv.cuda(), input_ids=ids.cuda(), attention_mask=mask.cuda(), max_new_tokens=5)
    assert out.shape[0] == 2 and out.device.type == "cuda"
