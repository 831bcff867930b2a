"""GPU-only: the CUDA-graph decode path gives the same tokens and logits as eager decoding; graphs
are captured when the engine is built and never while serving; a failed capture raises with its
reason; a failed replay fails the step's requests and never turns the engine eager."""
import subprocess
import sys
import textwrap

import pytest
import torch

from blip2_fast import Engine, SamplingParams

pytestmark = pytest.mark.gpu


def _pixels(model, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    S = model.cfg.vision.image_size
    return [torch.randn(3, S, S, generator=g) for _ in range(n)]


@pytest.mark.parametrize("preset", ["blip2-opt-tiny", "blip2-t5-tiny"])
def test_cuda_graphs_match_eager(preset):
    from blip2_fast.presets import load_preset

    model = load_preset(preset, device="cuda", dtype=torch.float32, backend="fast")
    pxs = _pixels(model, 5)
    outs = []
    for eager in (True, False):
        eng = Engine(model, max_num_seqs=6, num_blocks=128, enforce_eager=eager)
        captured = eng.runner.graph_captures
        for i, px in enumerate(pxs):
            eng.add_request(i, pixel_values=px, sampling=SamplingParams(max_new_tokens=6 + i, min_new_tokens=6 + i))
        outs.append({k: v.token_ids for k, v in eng.run().items()})
        if not eager:
            assert eng.runner.use_graphs and eng.runner._graphs, "decode did not run on CUDA graphs"
            assert captured == len(eng.runner.buckets) == eng.runner.graph_captures, "a graph was captured while serving"
            assert eng.runner.graph_replays > 0
        else:
            assert eng.runner.graph_captures == 0 and eng.runner.graph_replays == 0
    assert outs[0] == outs[1]


def test_failed_capture_raises_with_its_reason():
    # in a fresh process: a failed capture can leave the CUDA context unusable for later tests
    code = textwrap.dedent("""
        import torch
        from blip2_fast import Engine
        from blip2_fast.engine.runner import ModelRunner
        from blip2_fast.presets import load_preset
        model = load_preset("blip2-opt-tiny", device="cuda", dtype=torch.float32, backend="fast")
        real = ModelRunner.forward_decode
        def bad(self, inp):
            out = real(self, inp)
            if torch.cuda.is_current_stream_capturing():
                out.sum().item()  # a host sync: not allowed while capturing
            return out
        ModelRunner.forward_decode = bad
        try:
            Engine(model, max_num_seqs=4, num_blocks=64)
        except RuntimeError as e:
            print("RAISED", e)
        else:
            print("NO ERROR")
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = r.stdout.strip().splitlines()
    assert lines[0].startswith("RAISED CUDA graph capture of the decode step failed for batch size"), lines
    assert "enforce_eager=True" in lines[0] and "capturing" in lines[0].lower(), lines[0]  # the reason is named


def test_failed_replay_fails_the_requests_and_keeps_graphs(monkeypatch):
    from blip2_fast.presets import load_preset

    model = load_preset("blip2-opt-tiny", device="cuda", dtype=torch.float32, backend="fast")
    eng = Engine(model, max_num_seqs=4, num_blocks=64)
    pxs = _pixels(model, 2, seed=1)
    for i, px in enumerate(pxs):
        eng.add_request(i, pixel_values=px, sampling=SamplingParams(max_new_tokens=5, min_new_tokens=5))
    eng.step()  # prefill, eager

    class Broken:
        def replay(self):
            raise RuntimeError("replay failed")

    graphs = dict(eng.runner._graphs)
    for b, (g, inp, out) in graphs.items():  # every bucket: the one-request retries replay too
        eng.runner._graphs[b] = (Broken(), inp, out)
    outs = {o.request_id: o for o in eng.step()}
    assert len(outs) == 2
    assert all(o.finish_reason == "error" and "replay failed" in o.error for o in outs.values())
    assert eng.runner.use_graphs and not eng.has_unfinished() and eng.num_free_blocks == eng.num_blocks
    eng.runner._graphs.update(graphs)
    for i, px in enumerate(pxs):
        eng.add_request(i, pixel_values=px, sampling=SamplingParams(max_new_tokens=5, min_new_tokens=5))
    assert all(len(o.token_ids) == 5 for o in eng.run().values())
    assert eng.runner.graph_replays > 0


def test_one_copy_each_way_per_decode_step(monkeypatch):
    """A decode step sends its inputs in one host-to-device copy and reads its tokens back in one."""
    from blip2_fast.presets import load_preset

    model = load_preset("blip2-opt-tiny", device="cuda", dtype=torch.float32, backend="fast")
    eng = Engine(model, max_num_seqs=8, num_blocks=64)
    for i, px in enumerate(_pixels(model, 4, seed=2)):
        eng.add_request(i, pixel_values=px, sampling=SamplingParams(max_new_tokens=6, min_new_tokens=6,
                                                                   do_sample=i % 2 == 1, seed=i))
    eng.step()
    torch.cuda.synchronize()
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        eng.step()
        torch.cuda.synchronize()
    names = [e.name for e in prof.events() if "Memcpy" in e.name]
    assert sum("HtoD" in n for n in names) == 1, names
    assert sum("DtoH" in n for n in names) == 1, names
