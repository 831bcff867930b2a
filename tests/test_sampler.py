"""The batched sampler: the distributions of transformers' processors and warpers, and per-request
seeded draws that do not depend on which other requests share the batch."""
import math

import pytest
import torch

import blip2_fast
from blip2_fast import Engine, SamplingParams
from blip2_fast.engine.sampler import BeamGroup, Row, Sampler
from blip2_fast.engine.staging import Staging
from conftest import image_prompt


def _sample(rows, logits, beams=()):
    st = Staging("cpu")
    st.reset()
    s = Sampler(torch.device("cpu"))
    plan = s.prepare(rows, list(beams), logits.shape[1], st)
    st.send()
    return s(logits.clone(), plan)


def _row(i, seed=None, banned=(), history=None, **kw):
    p = SamplingParams(**kw)
    p.validate()
    g = torch.Generator().manual_seed(seed) if seed is not None else None
    return Row(i, p, g, history, banned)


def _logits(n, V=97, seed=0):
    return torch.randn(n, V, generator=torch.Generator().manual_seed(seed)) * 3


def test_seeded_draws_do_not_depend_on_the_batch():
    """Request A's tokens over 20 steps: alone, and with neighbours (other params, other top_k,
    greedy and beam rows) joining in different positions, its draws are the same."""
    V = 97
    A = dict(do_sample=True, temperature=0.8, top_k=40, top_p=0.9)
    logit_rows = [_logits(1, V, seed=s)[0] for s in range(20)]

    def run(layout):
        g = torch.Generator().manual_seed(1234)
        toks = []
        for step, la in enumerate(logit_rows):
            rows, data = [], []
            for kind in layout:
                i = len(data)
                if kind == "A":
                    rows.append(Row(i, _p(A), g, None, ()))
                    data.append(la)
                elif kind == "S":  # another sampled request, its own generator and no top-k
                    rows.append(_row(i, seed=step, do_sample=True, top_k=0, temperature=1.3))
                    data.append(_logits(1, V, seed=100 + step)[0])
                else:  # greedy with a banned id
                    rows.append(_row(i, banned=(3,)))
                    data.append(_logits(1, V, seed=200 + step)[0])
            out = _sample(rows, torch.stack(data))
            toks.append(out.tokens[layout.index("A")])
        return toks

    alone = run("A")
    assert len(set(alone)) > 3  # it really samples
    assert run("SAG") == alone and run("GSA") == alone and run("AS") == alone


def _p(kw):
    p = SamplingParams(**kw)
    p.validate()
    return p


@pytest.mark.parametrize("kw", [dict(temperature=0.7, top_k=12), dict(temperature=1.0, top_k=0, top_p=0.6),
                                dict(temperature=1.4, top_k=30, top_p=0.8, repetition_penalty=1.3)])
def test_sampled_distribution_matches_transformers_warpers(kw):
    """Empirical frequencies of 40000 draws against the distribution transformers' processors give."""
    from transformers import RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    V = 41
    logits = _logits(1, V, seed=5)
    history = [1, 4, 9, 16]
    n = 40000
    g = torch.Generator().manual_seed(0)
    p = _p(dict(do_sample=True, **kw))
    counts = torch.zeros(V)
    batch = 500
    for _ in range(n // batch):  # many rows of the same logits, one generator: 40000 independent draws
        rows = [Row(i, p, g, history, ()) for i in range(batch)]
        out = _sample(rows, logits.expand(batch, V).contiguous())
        counts += torch.bincount(torch.tensor(out.tokens), minlength=V).float()
    ids = torch.tensor([history])
    s = logits.clone()
    if p.repetition_penalty != 1.0:
        s = RepetitionPenaltyLogitsProcessor(p.repetition_penalty)(ids, s)
    s = TemperatureLogitsWarper(p.temperature)(ids, s)
    if p.top_k:
        s = TopKLogitsWarper(p.top_k)(ids, s)
    if p.top_p < 1:
        s = TopPLogitsWarper(p.top_p)(ids, s)
    want = torch.softmax(s, -1)[0]
    assert counts[want == 0].sum() == 0, "drew a token the warpers remove"
    freq = counts / n
    tol = 4 * torch.sqrt(want * (1 - want) / n) + 1e-4  # 4 standard errors
    assert ((freq - want).abs() <= tol).all(), f"{(freq - want).abs().max():.4f}"


def test_greedy_ban_and_penalty_match_transformers():
    from transformers import MinNewTokensLengthLogitsProcessor, RepetitionPenaltyLogitsProcessor

    V = 50
    logits = _logits(3, V, seed=7)
    eos = int(logits[0].argmax())
    rows = [_row(0, banned=(eos,)), _row(1, history=[int(logits[1].argmax()), 2], repetition_penalty=2.0), _row(2)]
    out = _sample(rows, logits)
    ids = torch.tensor([[0]])
    r0 = MinNewTokensLengthLogitsProcessor(1, 2, eos)(ids, logits[:1].clone())
    r1 = RepetitionPenaltyLogitsProcessor(2.0)(torch.tensor([[int(logits[1].argmax()), 2]]), logits[1:2].clone())
    assert out.tokens == [int(r0.argmax()), int(r1.argmax()), int(logits[2].argmax())]
    assert out.tokens[0] != eos and out.tokens[1] != int(logits[1].argmax())


def test_a_row_without_finite_scores_is_flagged():
    logits = _logits(2, 20)
    logits[1] = float("nan")
    out = _sample([_row(0, seed=0, do_sample=True), _row(1, seed=1, do_sample=True)], logits)
    assert out.tokens[0] >= 0 and out.tokens[1] == -1


def test_beam_candidates_are_the_top_continuations():
    V, k = 30, 3
    logits = _logits(k, V, seed=9)
    scores = [0.0, -1.0, -2.5]
    p = _p(dict(num_beams=k))
    out = _sample([], logits, [BeamGroup(list(range(k)), p, None, None, (), scores, 2 * k)])
    acc = (torch.log_softmax(logits, -1) + torch.tensor(scores)[:, None]).reshape(-1)
    lp, idx = torch.topk(acc, 2 * k)
    (got_lp, got_i), = out.beams
    assert torch.equal(got_i, idx) and torch.allclose(got_lp, lp)


def test_engine_samples_do_not_change_when_others_join(ckpt):
    d, hf = ckpt("opt")
    m = blip2_fast.load(d, backend="reference")
    pv, ids, _ = image_prompt(hf, 4, seed=11)
    p = SamplingParams(max_new_tokens=12, min_new_tokens=12, do_sample=True, temperature=1.5, top_k=0, seed=77)
    eng = Engine(m, max_num_seqs=8, block_size=4, num_blocks=200)
    eng.add_request("a", pixel_values=pv[0], prompt=ids[0], sampling=p)
    alone = eng.run()["a"].token_ids
    eng = Engine(m, max_num_seqs=8, block_size=4, num_blocks=200)
    eng.add_request("b", pixel_values=pv[1], prompt=ids[1], sampling=SamplingParams(max_new_tokens=9, do_sample=True, seed=1))
    eng.step()
    eng.add_request("a", pixel_values=pv[0], prompt=ids[0], sampling=p)
    for i, step in ((2, 2), (3, 4)):
        for _ in range(step):
            eng.step()
        eng.add_request(i, pixel_values=pv[i], prompt=ids[i], sampling=SamplingParams(max_new_tokens=6, num_beams=2))
    assert eng.run()["a"].token_ids == alone
    assert len(set(alone)) > 3
    assert not math.isnan(sum(alone))
