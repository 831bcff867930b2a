"""GPU-only: the CUDA-graph decode path gives the same tokens and logits as eager decoding."""
import pytest
import torch

from blip2_fast import Engine, SamplingParams

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("preset", ["blip2-opt-tiny", "blip2-t5-tiny"])
def test_cuda_graphs_match_eager(preset):
    from blip2_fast.presets import load_preset

    model = load_preset(preset, device="cuda", dtype=torch.float32, backend="fast")
    g = torch.Generator().manual_seed(0)
    S = model.cfg.vision.image_size
    pxs = [torch.randn(3, S, S, generator=g) for _ in range(5)]
    outs = []
    for eager in (True, False):
        eng = Engine(model, max_num_seqs=6, num_blocks=128, enforce_eager=eager)
        for i, px in enumerate(pxs):
            eng.add_request(i, pixel_values=px, sampling=SamplingParams(max_new_tokens=6 + i, min_new_tokens=6 + i))
        outs.append({k: v.token_ids for k, v in eng.run().items()})
        if not eager:
            assert eng.runner.use_graphs and eng.runner._graphs, "decode did not run on CUDA graphs"
    assert outs[0] == outs[1]
