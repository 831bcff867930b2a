"""The continuous-batching engine against transformers: requests alone, joining mid-flight,
preemption under a tiny pool, aborts, beams, streaming, and a soak test."""
import asyncio
import random

import pytest
import torch

import blip2_fast
from blip2_fast import Engine, SamplingParams
from conftest import image_prompt


def hf_greedy(hf, pv, ids, n, **kw):
    with torch.no_grad():
        out = hf.generate(pixel_values=pv[None], input_ids=ids[None], max_new_tokens=n, **kw)[0]
    return out[1:].tolist() if hf.config.text_config.is_encoder_decoder else out[len(ids):].tolist()


def _requests(hf, n, seed=0):
    pv, ids, _ = image_prompt(hf, n, seed=seed)
    lens = [3 + (i * 5) % 7 for i in range(n)]
    Q = hf.config.num_query_tokens
    return [(pv[i], ids[i, : Q + lens[i]]) for i in range(n)]


def _trim_eos(toks, eos):
    return toks[: toks.index(eos) + 1] if eos in toks else toks


@pytest.mark.parametrize("lm", ["opt", "t5"])
@pytest.mark.parametrize("num_blocks", [None, 12])
def test_engine_matches_transformers_joining_and_preempting(ckpt, lm, num_blocks):
    d, hf = ckpt(lm)
    m = blip2_fast.load(d, backend="reference")
    eng = Engine(m, max_num_seqs=3, block_size=4, num_blocks=num_blocks or 200)
    reqs = _requests(hf, 5)
    eos = m.generation_defaults["eos_token_id"]
    want = {i: _trim_eos(hf_greedy(hf, pv, ids, 10 + i), eos) for i, (pv, ids) in enumerate(reqs)}
    got, order = {}, list(range(5))
    # two requests up front, the rest join while others are decoding
    for i in order[:2]:
        eng.add_request(i, pixel_values=reqs[i][0], prompt=reqs[i][1], sampling=SamplingParams(max_new_tokens=10 + i))
    steps = 0
    while eng.has_unfinished() or len(order) > 2:
        if steps in (1, 2, 4) and len(order) > 2:
            i = order.pop(2)
            eng.add_request(i, pixel_values=reqs[i][0], prompt=reqs[i][1], sampling=SamplingParams(max_new_tokens=10 + i))
        for o in eng.step():
            if o.finished:
                got[o.request_id] = o.token_ids
        steps += 1
        eng.blocks.check_invariants()
        assert steps < 500
    assert got == want
    assert eng.num_free_blocks == eng.num_blocks
    if num_blocks:
        assert eng.num_preemptions > 0


@pytest.mark.parametrize("lm", ["opt", "t5"])
def test_engine_beam_and_abort(ckpt, lm):
    d, hf = ckpt(lm)
    m = blip2_fast.load(d, backend="reference")
    eng = Engine(m, max_num_seqs=8, block_size=4, num_blocks=100)
    reqs = _requests(hf, 3, seed=2)
    eng.add_request("beam", pixel_values=reqs[0][0], prompt=reqs[0][1], sampling=SamplingParams(max_new_tokens=8, num_beams=3))
    eng.add_request("gone", pixel_values=reqs[1][0], prompt=reqs[1][1], sampling=SamplingParams(max_new_tokens=30))
    eng.add_request("ok", pixel_values=reqs[2][0], prompt=reqs[2][1], sampling=SamplingParams(max_new_tokens=6))
    final, steps = {}, 0
    while eng.has_unfinished():
        if steps == 3:
            eng.abort("gone")
        for o in eng.step():
            if o.finished:
                final[o.request_id] = o
        steps += 1
        eng.blocks.check_invariants()
    assert final["gone"].finish_reason == "abort"
    eos = m.generation_defaults["eos_token_id"]
    with torch.no_grad():
        ref = hf.generate(pixel_values=reqs[0][0][None], input_ids=reqs[0][1][None], max_new_tokens=8, num_beams=3)[0]
    ref = ref[1:] if lm == "t5" else ref[len(reqs[0][1]):]
    assert final["beam"].token_ids == ref.tolist()
    assert final["ok"].token_ids == _trim_eos(hf_greedy(hf, *reqs[2], 6), eos)
    assert eng.num_free_blocks == eng.num_blocks


def test_repeated_images_reuse_qformer_output(ckpt):
    d, hf = ckpt("opt")
    m = blip2_fast.load(d, backend="reference")
    eng = Engine(m, num_blocks=100, block_size=4)
    (pv, ids), = _requests(hf, 1)
    for i in range(4):
        eng.add_request(i, pixel_values=pv.clone(), prompt=ids, sampling=SamplingParams(max_new_tokens=4))
    out = eng.run()
    assert eng.runner.images_encoded == 1
    assert len({tuple(o.token_ids) for o in out.values()}) == 1
    assert eng.num_free_blocks == eng.num_blocks


def test_stream(ckpt):
    d, hf = ckpt("opt")
    m = blip2_fast.load(d, backend="reference")
    eng = Engine(m, num_blocks=100, block_size=4)
    (pv, ids), (pv2, ids2) = _requests(hf, 2)

    async def go(rid, pv, ids):
        toks = []
        async for o in eng.stream(rid, pixel_values=pv, prompt=ids, sampling=SamplingParams(max_new_tokens=5, min_new_tokens=5)):
            toks += o.new_token_ids
            last = o
        assert last.finished and toks == last.token_ids
        return toks

    async def both():
        return await asyncio.gather(go("a", pv, ids), go("b", pv2, ids2))

    a, b = asyncio.run(both())
    assert len(a) == 5 and len(b) == 5
    assert a == hf_greedy(hf, pv, ids, 5, min_new_tokens=5)


def test_engine_rejects_bad_requests(ckpt):
    d, hf = ckpt("opt")
    m = blip2_fast.load(d, backend="reference")
    eng = Engine(m, num_blocks=20, block_size=4)
    (pv, ids), = _requests(hf, 1)
    with pytest.raises(ValueError, match="exactly one"):
        eng.add_request(1, prompt=ids)
    with pytest.raises(ValueError, match="image tokens"):
        eng.add_request(1, pixel_values=pv, prompt=ids[2:])
    with pytest.raises(ValueError, match="KV blocks"):
        eng.add_request(1, pixel_values=pv, prompt=ids, sampling=SamplingParams(max_new_tokens=100))
    eng.add_request(1, pixel_values=pv, prompt=ids, sampling=SamplingParams(max_new_tokens=2))
    with pytest.raises(ValueError, match="already in use"):
        eng.add_request(1, pixel_values=pv, prompt=ids)
    with pytest.raises(ValueError, match="top_p"):
        eng.add_request(2, pixel_values=pv, prompt=ids, sampling=SamplingParams(do_sample=True, top_p=0))
    with pytest.raises(TypeError, match="decode"):
        Engine(m, num_blocks=20, tokenizer="gpt2")  # a name, not a tokenizer

    class DecodeOnly:
        def decode(self, ids, **kw):
            return ""

    eng = Engine(m, num_blocks=20, block_size=4, tokenizer=DecodeOnly())
    with pytest.raises(TypeError, match="callable tokenizer"):
        eng.add_request(3, pixel_values=pv, prompt="a text prompt")


def test_kv_bytes_fit_the_tokens(ckpt):
    """Paged reservation never exceeds the tokens rounded up to blocks (vs a padded contiguous cache)."""
    d, hf = ckpt("opt")
    m = blip2_fast.load(d, backend="reference")
    eng = Engine(m, num_blocks=200, block_size=4)
    reqs = _requests(hf, 4)
    for i, (pv, ids) in enumerate(reqs):
        eng.add_request(i, pixel_values=pv, prompt=ids, sampling=SamplingParams(max_new_tokens=3 + 4 * i, min_new_tokens=3 + 4 * i))
    while eng.has_unfinished():
        eng.step()
        used = eng.num_blocks - eng.num_free_blocks
        need = sum(-(-eng.blocks.num_tokens(s) // 4) for r in eng.scheduler.running for s in r.seqs)
        assert used <= need


@pytest.mark.slow
def test_soak_random_requests_and_aborts(ckpt):
    d, hf = ckpt("opt")
    m = blip2_fast.load(d, backend="reference")
    eng = Engine(m, max_num_seqs=16, block_size=4, num_blocks=60)
    rng = random.Random(0)
    reqs = _requests(hf, 6)
    live, done, aborted, n = set(), {}, set(), 0
    for step in range(400):
        if n < 200 and rng.random() < 0.7:
            pv, ids = reqs[rng.randrange(6)]
            p = SamplingParams(max_new_tokens=rng.randint(1, 8), num_beams=rng.choice([1, 1, 1, 2]),
                               do_sample=rng.random() < 0.3, seed=rng.randint(0, 99))
            eng.add_request(n, pixel_values=pv, prompt=ids, sampling=p)
            live.add(n)
            n += 1
        if live and rng.random() < 0.1:
            victim = rng.choice(sorted(live))
            eng.abort(victim)
            aborted.add(victim)
        for o in eng.step():
            if o.finished:
                assert o.request_id not in done
                done[o.request_id] = o
                live.discard(o.request_id)
        eng.blocks.check_invariants()
    while eng.has_unfinished():
        for o in eng.step():
            if o.finished:
                done[o.request_id] = o
                live.discard(o.request_id)
    assert set(done) == set(range(n))
    for rid, o in done.items():
        assert (o.finish_reason == "abort") == (rid in aborted and o.finish_reason == "abort")
        if o.finish_reason != "abort":
            assert len(o.token_ids) >= 1
    assert eng.num_free_blocks == eng.num_blocks


@pytest.mark.parametrize("backend", ["reference", "fast"])
def test_prefix_cache_hits_reuse_kv_and_match_transformers(ckpt, backend):
    """Requests with the same image and prompt prefix share its blocks and skip its prefill; their
    outputs still equal transformers' (same step, later steps, and different suffixes)."""
    d, hf = ckpt("opt")
    m = blip2_fast.load(d, backend=backend)
    eng = Engine(m, max_num_seqs=8, block_size=4, num_blocks=120)
    (pv, ids), = _requests(hf, 1, seed=4)
    prompts = [ids, ids, torch.cat([ids, torch.tensor([7, 9])]), ids[:-1]]
    eos = m.generation_defaults["eos_token_id"]
    want = {i: _trim_eos(hf_greedy(hf, pv, p, 6), eos) for i, p in enumerate(prompts)}
    eng.add_request(0, pixel_values=pv, prompt=prompts[0], sampling=SamplingParams(max_new_tokens=6))
    eng.add_request(1, pixel_values=pv, prompt=prompts[1], sampling=SamplingParams(max_new_tokens=6))
    got = {}
    for step in range(100):
        if step == 2:
            for i in (2, 3):
                eng.add_request(i, pixel_values=pv, prompt=prompts[i], sampling=SamplingParams(max_new_tokens=6))
        for o in eng.step():
            if o.finished:
                got[o.request_id] = o.token_ids
        eng.blocks.check_invariants()
        if not eng.has_unfinished() and step > 2:
            break
    assert eng.prefix_hit_tokens > 0
    assert got == want


# ---- regressions found by adversarial testing ------------------------------------------------------

def test_t5_encoder_blocks_are_shared_only_for_the_whole_prompt(ckpt):
    """T5's encoder is bidirectional: a prompt's prefix must not reuse a longer prompt's encoder K/V."""
    d, hf = ckpt("t5")
    m = blip2_fast.load(d, backend="reference")
    pv, ids, _ = image_prompt(hf, 1, text_len=30)
    m.generate(pv, input_ids=ids, max_new_tokens=6)  # caches the long prompt's blocks
    with torch.no_grad():
        ref = hf.generate(pixel_values=pv, input_ids=ids[:, :-12], max_new_tokens=6)
    assert torch.equal(m.generate(pv, input_ids=ids[:, :-12], max_new_tokens=6), ref)


def test_beams_stop_at_max_model_len(ckpt):
    d, hf = ckpt("opt")
    m = blip2_fast.load(d, backend="reference")
    pv, ids, _ = image_prompt(hf, 2, text_len=115, seed=5)  # 120 of OPT's 128 positions
    eng = Engine(m, block_size=4, num_blocks=400)
    eng.add_request("greedy", pixel_values=pv[1], prompt=ids[1, :10], sampling=SamplingParams(max_new_tokens=12))
    eng.add_request("beam", pixel_values=pv[0], prompt=ids[0], sampling=SamplingParams(max_new_tokens=30, num_beams=2))
    out = eng.run()
    assert len(out["beam"].token_ids) <= 8 and out["greedy"].finished
    eng = Engine(m, block_size=4, num_blocks=400, max_model_len=20)
    eng.add_request("b", pixel_values=pv[1], prompt=ids[1, :10], sampling=SamplingParams(max_new_tokens=30, num_beams=2))
    assert 10 + len(eng.run()["b"].token_ids) <= 20


def test_request_finished_in_prefill_is_never_preempted(ckpt):
    d, hf = ckpt("opt")
    m = blip2_fast.load(d, backend="reference")
    pv, ids, _ = image_prompt(hf, 5, text_len=3, seed=2)  # 8-position prompts = 2 blocks of 4
    eng = Engine(m, block_size=4, num_blocks=11)
    for i in range(4):
        eng.add_request(f"A{i}", pixel_values=pv[i], prompt=ids[i], sampling=SamplingParams(max_new_tokens=6, stop_token_ids=[]))
    eng.step()
    eng.add_request("B", pixel_values=pv[4], prompt=ids[4], sampling=SamplingParams(max_new_tokens=1, stop_token_ids=[]))
    outs = []
    while eng.has_unfinished():
        outs += [o for o in eng.step() if o.request_id == "B"]
    assert len(outs) == 1 and outs[0].finished and len(outs[0].token_ids) == 1


def test_abort_frees_the_id_and_is_delivered(ckpt):
    d, hf = ckpt("opt")
    m = blip2_fast.load(d, backend="reference")
    (pv, ids), = _requests(hf, 1)
    eng = Engine(m, num_blocks=64, block_size=4)
    eng.add_request("a", pixel_values=pv, prompt=ids, sampling=SamplingParams(max_new_tokens=5))
    eng.step()
    eng.abort("a")
    eng.add_request("a", pixel_values=pv, prompt=ids, sampling=SamplingParams(max_new_tokens=2))  # id reusable
    reasons = [o.finish_reason for o in eng.step() if o.finished]
    assert "abort" in reasons
    assert eng.run()["a"].finish_reason in ("stop", "length")


def test_request_that_can_never_be_admitted_is_refused(ckpt):
    d, hf = ckpt("opt")
    m = blip2_fast.load(d, backend="reference")
    (pv, ids), = _requests(hf, 1)
    eng = Engine(m, num_blocks=2, block_size=4)
    with pytest.raises(ValueError, match="KV blocks"):
        eng.add_request("r", pixel_values=pv, prompt=ids, sampling=SamplingParams(max_new_tokens=1))


def test_generate_rejects_bad_inputs(ckpt):
    d, hf = ckpt("opt")
    m = blip2_fast.load(d, backend="reference")
    pv, ids, mask = image_prompt(hf, 2)
    with pytest.raises(ValueError, match="NaN"):
        m.generate(pv.clone().fill_(float("nan")), input_ids=ids, max_new_tokens=2)
    with pytest.raises(ValueError, match="integer"):
        m.generate(pv, input_ids=ids.float(), max_new_tokens=2)
    mask[1] = 0
    with pytest.raises(ValueError, match="row 1"):
        m.generate(pv, input_ids=ids, attention_mask=mask, max_new_tokens=2)
    with pytest.raises(ValueError, match="batch size 0"):
        m.generate(pv[:0], max_new_tokens=2)
    with pytest.raises(ValueError, match="num_beams"):
        m.generate(pv, input_ids=ids, max_new_tokens=2, num_beams=0)
    with pytest.raises(ValueError, match="early_stopping"):
        m.generate(pv, input_ids=ids, max_new_tokens=2, num_beams=2, early_stopping="sometimes")
