"""The interface the HTTP server builds on (ENGINE_STATS): Engine.stats(), RequestMetrics, the new
RequestOutput fields, and finish_reason "error"."""
import dataclasses

import pytest

import blip2_fast
from blip2_fast import Engine, EngineStats, RequestMetrics, RequestOutput, SamplingParams
from conftest import image_prompt


@pytest.fixture(scope="module")
def opt(ckpt):
    d, hf = ckpt("opt")
    return blip2_fast.load(d, backend="reference"), hf


def test_stats_and_metrics(opt):
    m, hf = opt
    pv, ids, _ = image_prompt(hf, 3, seed=2)
    eng = Engine(m, max_num_seqs=2, block_size=4, num_blocks=100)
    s0 = eng.stats()
    assert isinstance(s0, EngineStats)
    assert (s0.num_running, s0.num_waiting, s0.num_blocks, s0.num_free_blocks) == (0, 0, 100, 100)
    assert s0.prompt_tokens == s0.generation_tokens == s0.image_cache_hits == s0.image_cache_misses == 0
    assert s0.image_encode_seconds == ()
    for i in range(3):  # image 0 twice: one cache hit; max_num_seqs=2 keeps one waiting
        eng.add_request(i, pixel_values=pv[0 if i == 2 else i], prompt=ids[i],
                        sampling=SamplingParams(max_new_tokens=4, min_new_tokens=4))
    s = eng.stats()
    assert (s.num_running, s.num_waiting) == (0, 3)
    outs = eng.step()
    s = eng.stats()
    assert (s.num_running, s.num_waiting) == (2, 1) and s.num_free_blocks < 100
    assert s.prompt_tokens == 2 * ids.shape[1] and s.generation_tokens == 2
    assert s.image_cache_misses == 2 and len(s.image_encode_seconds) >= 1
    assert all(t >= 0 for t in s.image_encode_seconds)
    assert eng.stats().image_encode_seconds == ()  # drained
    o = outs[0]
    assert isinstance(o.metrics, RequestMetrics) and o.num_prompt_tokens == ids.shape[1] and o.error is None
    mt = o.metrics
    assert mt.arrival_time <= mt.first_scheduled_time <= mt.first_token_time == mt.last_token_time
    assert mt.finished_time is None
    final = {}
    while eng.has_unfinished():
        for o in eng.step():
            if o.finished:
                final[o.request_id] = o
    s = eng.stats()
    assert (s.num_running, s.num_waiting, s.num_free_blocks) == (0, 0, 100)
    assert s.generation_tokens == 12 and s.prompt_tokens == 3 * ids.shape[1]
    assert s.image_cache_hits == 1 and s.image_cache_misses == 2
    for o in final.values():
        mt = o.metrics
        assert mt.first_token_time < mt.last_token_time <= mt.finished_time
        assert o.finish_reason == "length"
    assert final[2].metrics.first_scheduled_time > final[0].metrics.first_scheduled_time  # it waited


def test_preemptions_are_counted(opt):
    m, hf = opt
    pv, ids, _ = image_prompt(hf, 3, seed=3, text_len=3)
    eng = Engine(m, max_num_seqs=3, block_size=4, num_blocks=9)
    for i in range(3):
        eng.add_request(i, pixel_values=pv[i], prompt=ids[i], sampling=SamplingParams(max_new_tokens=8, min_new_tokens=8))
    eng.run()
    assert eng.stats().num_preemptions == eng.num_preemptions > 0


def test_error_output_fields(opt, monkeypatch):
    m, hf = opt
    pv, ids, _ = image_prompt(hf, 1)
    eng = Engine(m, block_size=4, num_blocks=100)
    eng.add_request("e", pixel_values=pv[0], prompt=ids[0], sampling=SamplingParams(max_new_tokens=4))

    def boom(*a, **k):
        raise MemoryError("no room")

    monkeypatch.setattr(eng.runner, "prefill", boom)
    (o,) = eng.step()
    assert o.finished and o.finish_reason == "error" and o.error == "MemoryError: no room" and o.token_ids == []
    assert o.metrics.finished_time is not None
    assert not eng.has_unfinished() and eng.num_free_blocks == 100


def test_request_output_constructor_stays_compatible():
    o = RequestOutput("a", [1], [1], True, "stop")
    assert (o.metrics, o.num_prompt_tokens, o.error) == (None, None, None)
    names = [f.name for f in dataclasses.fields(RequestOutput)]
    # positional construction keeps working: fields added later (scores, logits, beam outputs) come after these
    assert names[:10] == ["request_id", "token_ids", "new_token_ids", "finished", "finish_reason", "text", "candidates",
                          "metrics", "num_prompt_tokens", "error"]
    with pytest.raises(dataclasses.FrozenInstanceError):
        RequestMetrics(0.0, None, None, None, None).arrival_time = 1.0
    assert [f.name for f in dataclasses.fields(EngineStats)] == [
        "num_running", "num_waiting", "num_blocks", "num_free_blocks", "num_preemptions", "prompt_tokens",
        "generation_tokens", "image_cache_hits", "image_cache_misses", "image_encode_seconds"]
