"""The engine under adversarial use (issue 11): bad requests refused at the door, a step that fails
for one request failing only that request, the engine owning its inputs, request-id lifecycles
through abort and stream, threads, and sizes bounded by what the model can use."""
import asyncio
import contextlib
import threading

import pytest
import torch

import blip2_fast
from blip2_fast import Engine, SamplingParams
from conftest import image_prompt


@pytest.fixture(scope="module")
def opt(ckpt):
    d, hf = ckpt("opt")
    return blip2_fast.load(d, backend="reference"), hf


def _reqs(hf, n, seed=0, text_len=6):
    pv, ids, _ = image_prompt(hf, n, seed=seed, text_len=text_len)
    return [(pv[i], ids[i]) for i in range(n)]


def _clean_run(m, reqs, params):
    eng = Engine(m, max_num_seqs=8, block_size=4, num_blocks=200)
    for i, ((pv, ids), p) in enumerate(zip(reqs, params)):
        eng.add_request(i, pixel_values=pv, prompt=ids, sampling=p)
    return {k: o.token_ids for k, o in eng.run().items()}


# ---- one bad request stops no one -----------------------------------------------------------------

@pytest.mark.parametrize("bad, exc, name", [
    (dict(do_sample=True, top_k=2.5), TypeError, "top_k"),
    (dict(do_sample=True, temperature=1e-45), ValueError, "temperature"),
    (dict(num_beams=2, stop_token_ids=[2**70]), ValueError, "stop_token_ids"),
    (dict(stop_token_ids=[2**63]), ValueError, "stop_token_ids"),
    (dict(stop_token_ids=[211]), ValueError, "stop_token_ids"),  # the vocabulary has 211 ids
    (dict(stop_token_ids="ab"), TypeError, "stop_token_ids"),
    (dict(do_sample=True, seed=1.5), TypeError, "seed"),
    (dict(do_sample=True, seed=2**64), ValueError, "seed"),
    (dict(do_sample=True, seed=-1), ValueError, "seed"),
    (dict(max_new_tokens=2.5), TypeError, "max_new_tokens"),
    (dict(max_new_tokens=True), TypeError, "max_new_tokens"),
    (dict(num_beams=2.5), TypeError, "num_beams"),
    (dict(do_sample=1), TypeError, "do_sample"),
    (dict(top_p=float("nan")), ValueError, "top_p"),
    (dict(repetition_penalty=float("inf")), ValueError, "repetition_penalty"),
    (dict(early_stopping=1), ValueError, "early_stopping"),
])
def test_bad_sampling_params_are_refused_at_add_request(opt, bad, exc, name):
    m, hf = opt
    (pv, ids), = _reqs(hf, 1)
    eng = Engine(m, block_size=4, num_blocks=64)
    with pytest.raises(exc, match=name):
        eng.add_request("bad", pixel_values=pv, prompt=ids, sampling=SamplingParams(**bad))
    assert not eng.has_unfinished() and eng.num_free_blocks == eng.num_blocks
    eng.add_request("bad", pixel_values=pv, prompt=ids, sampling=SamplingParams(max_new_tokens=2))  # the id is free
    assert eng.run()["bad"].finish_reason in ("stop", "length")


def test_bad_prompts_and_pixels_are_refused(opt):
    m, hf = opt
    (pv, ids), = _reqs(hf, 1)
    eng = Engine(m, block_size=4, num_blocks=64)
    with pytest.raises(TypeError, match="prompt"):
        eng.add_request(1, pixel_values=pv, prompt={"input_ids": ids})
    with pytest.raises(ValueError, match="prompt"):
        eng.add_request(1, pixel_values=pv, prompt=ids.float())
    with pytest.raises(ValueError, match=r"prompt\[0\]"):
        eng.add_request(1, pixel_values=pv, prompt=[10_000] + ids.tolist())
    with pytest.raises(ValueError, match="meta"):
        eng.add_request(1, pixel_values=torch.empty(3, 42, 42, device="meta"), prompt=ids)
    with pytest.raises(ValueError, match="NaN"):
        eng.add_request(1, pixel_values=torch.full((3, 42, 42), float("nan")), prompt=ids)
    for bad in (float("inf"), -float("inf"), float("nan")):  # one bad pixel among good ones
        px = pv.clone()
        px[1, 20, 7] = bad
        with pytest.raises(ValueError, match="NaN or infinite"):
            eng.add_request(1, pixel_values=px, prompt=ids)
    with pytest.raises(TypeError, match="SamplingParams"):
        eng.add_request(1, pixel_values=pv, prompt=ids, sampling={"max_new_tokens": 3})
    with pytest.raises(TypeError, match="hashable"):
        eng.add_request(["a"], pixel_values=pv, prompt=ids)
    eng.add_request(1, pixel_values=pv.numpy(), prompt=ids.numpy())  # numpy arrays are accepted
    assert eng.run()[1].finished


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64], ids=str)
def test_all_finite(dtype):
    """to_pixels' finiteness check: one sum, settled element by element only when the sum overflowed."""
    from blip2_fast.engine.limits import all_finite

    x = torch.randn(3, 50, 50, generator=torch.Generator().manual_seed(0)).to(dtype)
    assert all_finite(x)
    assert all_finite(torch.full((3, 50, 50), torch.finfo(dtype).max / 2, dtype=dtype))  # finite, the sum overflows
    for bad in (float("nan"), float("inf"), -float("inf")):
        y = x.clone()
        y[2, 49, 49] = bad
        assert not all_finite(y)
    y = x.clone()
    y[0, 0, 0], y[1, 1, 1] = float("inf"), -float("inf")  # their sum is NaN: still not finite
    assert not all_finite(y)


class _Poison:
    """Makes the model's forward raise whenever a batch contains a given token id at some position."""

    def __init__(self, lm, token):
        self.lm, self.token, self.real, self.calls = lm, token, lm.embed_tokens, 0

    def __enter__(self):
        def embed(ids):
            self.calls += 1
            if bool((ids == self.token).any()):
                raise RuntimeError("injected failure")
            return self.real(ids)
        self.lm.embed_tokens = embed
        return self

    def __exit__(self, *exc):
        del self.lm.embed_tokens


@pytest.mark.parametrize("when", ["prefill", "decode"])
def test_a_failing_request_fails_alone(opt, when):
    """A step that raises for one request: that request finishes with "error" and the message, every
    other request gets exactly the tokens it gets without it, and no block stays held."""
    m, hf = opt
    reqs = _reqs(hf, 4, seed=3)
    params = [SamplingParams(max_new_tokens=8, min_new_tokens=8), SamplingParams(max_new_tokens=6, num_beams=2),
              SamplingParams(max_new_tokens=7, do_sample=True, seed=4), SamplingParams(max_new_tokens=8, min_new_tokens=8)]
    want = _clean_run(m, reqs, params)
    poison = 7  # a prompt token only request 3 has (prefill), or that it is fed at its 2nd step (decode)
    pv, ids = reqs[3]
    ids = ids.clone()
    if when == "prefill":
        ids[-1] = poison
        assert all(poison not in r[1].tolist() for r in reqs[:3])
    eng = Engine(m, max_num_seqs=8, block_size=4, num_blocks=200)
    for i in range(3):
        eng.add_request(i, pixel_values=reqs[i][0], prompt=reqs[i][1], sampling=params[i])
    eng.add_request(3, pixel_values=pv, prompt=ids, sampling=params[3])
    final = {}
    with _Poison(m.lm, poison) as inj:
        if when == "decode":  # the poison is fed as request 3's first generated token
            eng.step()
            r3 = eng._live[3]
            r3.seqs[0].next_token = poison
            assert all(s.next_token != poison for r in eng.scheduler.running if r is not r3 for s in r.seqs)
        while eng.has_unfinished():
            for o in eng.step():
                if o.finished:
                    final[o.request_id] = o
            eng.blocks.check_invariants()
    assert inj.calls > 0
    assert final[3].finish_reason == "error" and "injected failure" in final[3].error
    assert {i: final[i].token_ids for i in range(3)} == {i: want[i] for i in range(3)}
    assert all(final[i].error is None for i in range(3))
    assert eng.num_free_blocks == eng.num_blocks and not eng.scheduler.running and not eng._live
    eng.add_request(9, pixel_values=reqs[0][0], prompt=reqs[0][1], sampling=params[0])  # the engine goes on
    assert eng.run()[9].token_ids == want[0]


def test_a_sampler_failure_fails_only_its_batch_members_that_fail_alone(opt, monkeypatch):
    m, hf = opt
    reqs = _reqs(hf, 3, seed=5)
    params = [SamplingParams(max_new_tokens=5, min_new_tokens=5) for _ in range(3)]
    want = _clean_run(m, reqs, params)
    eng = Engine(m, max_num_seqs=8, block_size=4, num_blocks=200)
    for i in range(3):
        eng.add_request(i, pixel_values=reqs[i][0], prompt=reqs[i][1], sampling=params[i])
    real, real_choose = eng.sampler.__class__.__call__, eng.executor._choose
    target, current = [], []

    def choose(reqs, *a, **k):  # which requests the sampler is choosing for
        current[:] = reqs
        return real_choose(reqs, *a, **k)

    def flaky(self, logits, plan):
        if target and any(r.params is target[0] for r in current):
            raise FloatingPointError("sampler blew up")
        return real(self, logits, plan)

    monkeypatch.setattr(eng.executor, "_choose", choose)
    monkeypatch.setattr(eng.sampler.__class__, "__call__", flaky)
    eng.step()
    target.append(eng._live[1].params)
    final = eng.run()
    assert final[1].finish_reason == "error" and "FloatingPointError: sampler blew up" == final[1].error
    assert final[0].token_ids == want[0] and final[2].token_ids == want[2]
    assert eng.num_free_blocks == eng.num_blocks


# ---- the engine owns what it computes from --------------------------------------------------------

def test_a_reused_pixel_buffer_changes_nothing(opt):
    m, hf = opt
    (pa, ids), (pb, _) = _reqs(hf, 2, seed=6)
    want = _clean_run(m, [(pa, ids), (pb, ids)], [SamplingParams(max_new_tokens=6)] * 2)
    assert want[0] != want[1]  # the two images give different tokens
    eng = Engine(m, block_size=4, num_blocks=100)
    buf = pa.clone()
    eng.add_request("a", pixel_values=buf, prompt=ids, sampling=SamplingParams(max_new_tokens=6))
    buf.copy_(pb)  # the caller reuses its buffer before the engine ran a step
    eng.add_request("b", pixel_values=buf, prompt=ids, sampling=SamplingParams(max_new_tokens=6))
    out = eng.run()
    assert out["a"].token_ids == want[0] and out["b"].token_ids == want[1]
    eng.add_request("a2", pixel_values=pa.clone(), prompt=ids, sampling=SamplingParams(max_new_tokens=6))
    assert eng.run()["a2"].token_ids == want[0]  # the image cache maps the old image to the old features


# ---- ids through abort and stream -----------------------------------------------------------------

def test_abort_then_reuse_of_the_id_before_a_step(opt):
    m, hf = opt
    (pv, ids), = _reqs(hf, 1)
    eng = Engine(m, block_size=4, num_blocks=100)
    eng.add_request("x", pixel_values=pv, prompt=ids, sampling=SamplingParams(max_new_tokens=9, min_new_tokens=9))
    eng.step()
    eng.step()
    eng.abort("x")
    eng.add_request("x", pixel_values=pv, prompt=ids, sampling=SamplingParams(max_new_tokens=4, min_new_tokens=4))
    outs = eng.step()
    old = [o for o in outs if o.finish_reason == "abort"]
    assert len(old) == 1 and len(old[0].token_ids) == 2  # the old request's final output
    with pytest.raises(ValueError, match="already in use"):  # the new "x" is tracked
        eng.add_request("x", pixel_values=pv, prompt=ids)
    eng.abort("x")  # reaches the new one
    outs = eng.step()
    assert [(o.request_id, o.finish_reason) for o in outs] == [("x", "abort")]
    assert not eng.has_unfinished() and eng.num_free_blocks == eng.num_blocks


def test_stream_retry_and_duplicate_ids(opt):
    m, hf = opt
    (pv, ids), (pv2, ids2) = _reqs(hf, 2, seed=7)
    eng = Engine(m, block_size=4, num_blocks=100)
    p = SamplingParams(max_new_tokens=5, min_new_tokens=5)

    async def cancel_after(n):
        got = 0
        async with contextlib.aclosing(eng.stream("r", pixel_values=pv, prompt=ids, sampling=p)) as s:
            async for _ in s:
                got += 1
                if got == n:
                    break  # the client goes away: closing the stream aborts its request

    async def full(rid, px, pr):
        outs = [o async for o in eng.stream(rid, pixel_values=px, prompt=pr, sampling=p)]
        return outs

    async def scenario():
        await cancel_after(3)
        retry = await full("r", pv, ids)  # right after the cancel: only the new request's outputs
        first = asyncio.ensure_future(full("s", pv2, ids2))
        await asyncio.sleep(0)
        with pytest.raises(ValueError, match="already in use"):
            await full("s", pv, ids)  # a duplicate live id: refused, and its cleanup aborts nothing
        return retry, await first

    retry, first = asyncio.run(scenario())
    assert [o.finish_reason for o in retry] == [None] * 4 + ["length"] and len(retry[-1].token_ids) == 5
    assert first[-1].finish_reason == "length" and len(first[-1].token_ids) == 5
    assert eng.num_free_blocks == eng.num_blocks and not eng.has_unfinished()


# ---- threads ------------------------------------------------------------------------------------

def test_generate_from_many_threads(opt):
    m, hf = opt
    jobs = []
    for j in range(6):
        pv, ids, mask = image_prompt(hf, 2, seed=10 + j, pads=((1, j % 3),) if j % 3 else ())
        kw = dict(max_new_tokens=5 + j % 3, num_beams=2) if j % 2 else dict(max_new_tokens=6, do_sample=True, seed=j)
        jobs.append((pv, ids, mask, kw))
    want = [m.generate(pv, input_ids=ids, attention_mask=mask, **kw) for pv, ids, mask, kw in jobs]
    errors, got = [], {}

    def worker(t):
        try:
            for rep in range(4):
                j = (t + rep) % len(jobs)
                pv, ids, mask, kw = jobs[j]
                out = m.generate(pv, input_ids=ids, attention_mask=mask, **kw)
                got.setdefault(j, []).append(out)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for j, outs in got.items():
        for o in outs:
            assert torch.equal(o, want[j]), j


def test_engine_steps_from_two_threads_serialize(opt):
    m, hf = opt
    reqs = _reqs(hf, 6, seed=8)
    params = [SamplingParams(max_new_tokens=6 + i % 3, min_new_tokens=4) for i in range(6)]
    want = _clean_run(m, reqs, params)
    eng = Engine(m, max_num_seqs=8, block_size=4, num_blocks=200)
    for i, ((pv, ids), p) in enumerate(zip(reqs, params)):
        eng.add_request(i, pixel_values=pv, prompt=ids, sampling=p)
    final, errors = {}, []

    def drive():
        try:
            while eng.has_unfinished():
                for o in eng.step():
                    if o.finished:
                        final[o.request_id] = o.token_ids
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=drive) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert final == want
    eng.blocks.check_invariants()
    assert eng.num_free_blocks == eng.num_blocks


# ---- sizes --------------------------------------------------------------------------------------

def test_generate_sizes_the_engine_to_the_request_for_t5(ckpt):
    """A T5 request for more new tokens than the engine's default 2048: all of them, as transformers."""
    d, hf = ckpt("t5")
    m = blip2_fast.load(d, backend="reference")
    pv, ids, _ = image_prompt(hf, 1, seed=9)
    out = m.generate(pv, input_ids=ids, max_new_tokens=2100, min_new_tokens=2100)
    assert out.shape == (1, 2101)
    with torch.no_grad():
        ref = hf.generate(pixel_values=pv, input_ids=ids, max_new_tokens=40)
    assert torch.equal(out[:, :41], ref[:, :41]) or int(ref[0, -1]) == hf.config.text_config.eos_token_id


def test_engine_refuses_requests_it_cannot_serve(ckpt):
    d, hf = ckpt("t5")
    m = blip2_fast.load(d, backend="reference")
    (pv, ids), = _reqs(hf, 1)
    eng = Engine(m, block_size=4, num_blocks=30)
    with pytest.raises(ValueError, match="KV blocks"):
        eng.add_request(1, pixel_values=pv, prompt=ids, sampling=SamplingParams(max_new_tokens=200))
    with pytest.raises(ValueError, match="num_beams=300 exceeds max_num_seqs"):
        eng.add_request(1, pixel_values=pv, prompt=ids, sampling=SamplingParams(num_beams=300))


def test_reused_step_inputs_match_rebuilt_ones(opt, monkeypatch):
    """The runner and sampler rewrite an unchanged batch's inputs in place (no new views); with that
    turned off every step rebuilds them. Joins, prefills between decodes, copy-on-write (beams) and
    preemption give the same tokens both ways, and the reuse did happen."""
    m, hf = opt
    reqs = _reqs(hf, 5, seed=12)
    params = [SamplingParams(max_new_tokens=9, min_new_tokens=3), SamplingParams(max_new_tokens=7, num_beams=2),
              SamplingParams(max_new_tokens=1), SamplingParams(max_new_tokens=8, do_sample=True, seed=3),
              SamplingParams(max_new_tokens=10, min_new_tokens=10)]

    def run(reuse):
        eng = Engine(m, max_num_seqs=8, block_size=4, num_blocks=16)
        hits = [0]
        real = eng.runner.staging.skip

        def skip(words):
            hits[0] += 1
            return real(words)

        monkeypatch.setattr(eng.runner.staging, "skip", skip)
        final, step = {}, 0
        while step < 3 or eng.has_unfinished():
            if step < len(reqs):
                eng.add_request(step, pixel_values=reqs[step][0], prompt=reqs[step][1], sampling=params[step])
            if not reuse:  # forget the last step's layouts: everything is laid out anew
                eng.runner._decode_memo = eng.sampler._greedy_memo = None
            for o in eng.step():
                if o.finished:
                    final[o.request_id] = o.token_ids
            step += 1
        return final, hits[0], eng.num_preemptions

    with_reuse, hits, pre = run(True)
    assert hits > 0 and pre > 0
    rebuilt, no_hits, _ = run(False)
    assert no_hits == 0 and with_reuse == rebuilt


def test_one_staging_send_per_decode_step(opt, monkeypatch):
    """A decode step's inputs (the model's and the sampler's, copy-on-write indices included) go to
    the device in one transfer: one Staging.send per decode step, whatever the batch holds."""
    from blip2_fast.engine.staging import Staging

    m, hf = opt
    reqs = _reqs(hf, 3, seed=13)
    eng = Engine(m, max_num_seqs=8, block_size=4, num_blocks=100)
    params = [SamplingParams(max_new_tokens=6, min_new_tokens=6), SamplingParams(max_new_tokens=6, num_beams=2),
              SamplingParams(max_new_tokens=6, min_new_tokens=6, do_sample=True, seed=1, repetition_penalty=1.2)]
    for i, ((pv, ids), p) in enumerate(zip(reqs, params)):
        eng.add_request(i, pixel_values=pv, prompt=ids, sampling=p)
    eng.step()  # prefill
    sends = []
    real = Staging.send
    monkeypatch.setattr(Staging, "send", lambda self: sends.append(1) or real(self))
    steps = 0
    while eng.has_unfinished():
        eng.step()
        steps += 1
    assert steps >= 4 and len(sends) == steps


def test_auto_pool_holds_an_explicit_max_num_seqs(opt):
    """On a CPU the default pool holds 16 sequences of max_model_len; an explicit larger max_num_seqs
    (the server's --max-num-seqs 256) still gets a block per sequence, while an explicit pool that is
    too small is refused, naming both numbers."""
    m, _ = opt
    eng = Engine(m, max_num_seqs=300, block_size=128, max_model_len=128)
    assert eng.max_num_seqs == 300 and eng.num_blocks >= 300
    with pytest.raises(ValueError, match="max_num_seqs=300 exceeds num_blocks=20"):
        Engine(m, max_num_seqs=300, block_size=128, max_model_len=128, num_blocks=20)
