"""generate() as transformers code calls it (issue 14): generation_config, model.generation_config,
streamers, return_dict_in_generate with scores / logits / beam outputs, the ban processors, the
caller's logits_processor / stopping_criteria, unsupported arguments; transformers on the same
random-weight checkpoint is the oracle, for OPT and Flan-T5."""
import math
import threading

import numpy as np
import pytest
import torch
from transformers import GenerationConfig, LogitsProcessor, StoppingCriteria
from transformers.generation import (GenerateBeamDecoderOnlyOutput, GenerateBeamEncoderDecoderOutput,
                                     GenerateDecoderOnlyOutput, GenerateEncoderDecoderOutput)
from transformers.generation.streamers import BaseStreamer

import blip2_fast
from blip2_fast.engine.engine import Engine
from conftest import image_prompt

LMS = ["opt", "t5"]


@pytest.fixture(scope="module", params=LMS)
def pair(request, ckpt):
    d, hf = ckpt(request.param)
    return request.param, blip2_fast.load(d, backend="reference"), hf


def _inputs(hf, B=2):
    return image_prompt(hf, B, pads=((1, 2),) if B > 1 else ())


def _hf(hf, pv, ids, mask, **kw):
    with torch.no_grad():
        return hf.generate(pixel_values=pv, input_ids=ids, attention_mask=mask, **kw)


def _close(a, b, tol=1e-3):
    """Equal within tol where finite, -inf exactly where the other has it."""
    assert a.shape == b.shape, (a.shape, b.shape)
    assert torch.equal(torch.isneginf(a), torch.isneginf(b)), "-inf in different places"
    fin = torch.isfinite(b)
    err = (a[fin] - b[fin]).abs().max().item() if fin.any() else 0.0
    assert err <= tol, f"max error {err}"


def test_generation_config_merges_like_transformers(pair):
    lm, m, hf = pair
    pv, ids, mask = _inputs(hf)
    gc = GenerationConfig(max_new_tokens=5, num_beams=3, length_penalty=0.7)
    for kw in (dict(generation_config=gc), dict(generation_config=gc, max_new_tokens=7),
               dict(generation_config=GenerationConfig(num_beams=2), max_new_tokens=6, num_beams=1)):
        ref = _hf(hf, pv, ids, mask, **kw)
        out = m.generate(pv, input_ids=ids, attention_mask=mask, **kw)
        assert torch.equal(out, ref), kw
    assert out.shape[1] == ref.shape[1] and gc.max_new_tokens == 5  # the caller's config is not changed


def test_model_generation_config(pair, monkeypatch):
    lm, m, hf = pair
    g = m.generation_config
    assert isinstance(g, GenerationConfig)
    assert g.eos_token_id == hf.generation_config.eos_token_id and g.pad_token_id == hf.generation_config.pad_token_id
    pv, ids, mask = _inputs(hf)
    # edits apply to later calls (transformers' BLIP-2 reads its language model's generation_config
    # instead, so the oracle gets the value as an argument)
    monkeypatch.setattr(g, "max_new_tokens", 4)
    monkeypatch.setattr(g, "num_beams", 2)
    ref = _hf(hf, pv, ids, mask, max_new_tokens=4, num_beams=2)
    out = m.generate(pv, input_ids=ids, attention_mask=mask)
    assert torch.equal(out, ref) and out.shape[1] == ids.shape[1] * (lm == "opt") + (lm == "t5") + 4


def test_model_object_attributes(pair):
    lm, m, hf = pair
    assert type(m.config).__name__ == "Blip2Config"
    assert m.config.num_query_tokens == hf.config.num_query_tokens
    assert m.config.text_config.vocab_size == hf.config.text_config.vocab_size
    assert m.eval() is m and m.device == torch.device("cpu") and m.dtype == torch.float32
    with pytest.raises(TypeError, match="inference only"):
        m.train()


class _Collect(BaseStreamer):
    """Records every put() and how many engine steps had run by then."""

    def __init__(self, steps):
        self.puts, self.at, self.ended, self.steps = [], [], False, steps

    def put(self, value):
        self.puts.append(value.clone())
        self.at.append(self.steps[0])

    def end(self):
        self.ended = True


def test_streamer_gets_tokens_as_the_engine_makes_them(pair, monkeypatch):
    lm, m, hf = pair
    pv, ids, mask = _inputs(hf, B=1)
    steps = [0]
    step = Engine.step

    def counting(self):
        steps[0] += 1
        return step(self)

    monkeypatch.setattr(Engine, "step", counting)
    ref_s, ours = _Collect([0]), _Collect(steps)
    ref = _hf(hf, pv, ids, mask, max_new_tokens=6, streamer=ref_s)
    out = m.generate(pv, input_ids=ids, attention_mask=mask, max_new_tokens=6, streamer=ours)
    assert torch.equal(out, ref) and ours.ended
    assert len(ours.puts) == len(ref_s.puts) == 7
    for a, b in zip(ours.puts, ref_s.puts):
        assert torch.equal(a, b)
    # one token per engine step, handed over while the engine runs (not replayed at the end)
    assert ours.at[1:] == list(range(1, 7)), ours.at
    with pytest.raises(ValueError, match="beam search"):
        m.generate(pv, input_ids=ids, max_new_tokens=3, num_beams=2, streamer=_Collect([0]))
    pv2, ids2, _ = _inputs(hf, B=2)
    with pytest.raises(ValueError, match="batch of one"):
        m.generate(pv2, input_ids=ids2, max_new_tokens=3, streamer=_Collect([0]))


def test_text_streamers(tmp_path_factory):
    from transformers import Blip2ForConditionalGeneration, TextIteratorStreamer, TextStreamer

    from blip2_fast.demo import build_processor_checkpoint, sample_image

    d = build_processor_checkpoint(tmp_path_factory.mktemp("proc") / "opt", "opt")
    m = blip2_fast.load(d, backend="reference")
    proc = m.processor()
    inputs = proc(images=sample_image(), text="a photo of", return_tensors="pt")
    it = TextIteratorStreamer(proc.tokenizer, skip_prompt=True, skip_special_tokens=True)
    box = {}
    t = threading.Thread(target=lambda: box.update(out=m.generate(**inputs, max_new_tokens=8, min_new_tokens=8,
                                                                  streamer=it)))
    t.start()
    chunks = list(it)
    t.join()
    new = box["out"][0, inputs["input_ids"].shape[1]:]
    assert "".join(chunks).strip() == proc.tokenizer.decode(new, skip_special_tokens=True).strip()
    printed = []
    ts = TextStreamer(proc.tokenizer, skip_prompt=True)
    ts.on_finalized_text = lambda text, stream_end=False: printed.append(text)
    m.generate(**inputs, max_new_tokens=8, min_new_tokens=8, streamer=ts)
    hf = Blip2ForConditionalGeneration.from_pretrained(str(d)).eval()
    ref_printed = []
    ts2 = TextStreamer(proc.tokenizer, skip_prompt=True)
    ts2.on_finalized_text = lambda text, stream_end=False: ref_printed.append(text)
    with torch.no_grad():
        hf.generate(**inputs, max_new_tokens=8, min_new_tokens=8, streamer=ts2)
    assert "".join(printed) == "".join(ref_printed)


@pytest.mark.parametrize("kw", [dict(), dict(num_beams=3), dict(num_beams=2, num_return_sequences=2, length_penalty=0.6),
                                dict(repetition_penalty=1.4, min_new_tokens=3)])
def test_scores_and_logits_match_transformers(pair, kw):
    lm, m, hf = pair
    pv, ids, mask = _inputs(hf)
    kw = dict(max_new_tokens=6, return_dict_in_generate=True, output_scores=True, output_logits=True, **kw)
    ref = _hf(hf, pv, ids, mask, **kw)
    out = m.generate(pv, input_ids=ids, attention_mask=mask, **kw)
    beam = kw.get("num_beams", 1) > 1
    want = {(True, "opt"): GenerateBeamDecoderOnlyOutput, (True, "t5"): GenerateBeamEncoderDecoderOutput,
            (False, "opt"): GenerateDecoderOnlyOutput, (False, "t5"): GenerateEncoderDecoderOutput}[(beam, lm)]
    assert type(out) is want and type(ref) is want
    assert torch.equal(out.sequences, ref.sequences)
    assert len(out.scores) == len(ref.scores) and len(out.logits) == len(ref.logits)
    # rows that finished early are filler here (transformers keeps computing them): compare the live steps
    live = _live_rows(ref, hf, ids.shape[1] if lm == "opt" else 1, beam)
    cols = slice(None)
    if "repetition_penalty" in kw and lm == "opt" and _penalizes_left_padding():
        # that transformers penalizes the pad token of a left-padded row as if the row had generated it;
        # blip2_fast's rows are never padded, as transformers' are not since it skips the padding
        pad = hf.config.text_config.pad_token_id
        cols = torch.arange(out.scores[0].shape[-1]) != pad
    for t, (a, b) in enumerate(zip(out.scores, ref.scores)):
        _close(a[live[t]][:, cols], b[live[t]][:, cols])
    for t, (a, b) in enumerate(zip(out.logits, ref.logits)):
        _close(a[live[t]], b[live[t]])
    if beam:
        _close(out.sequences_scores, ref.sequences_scores, 1e-4)
        assert torch.equal(out.beam_indices.long(), ref.beam_indices.long())


def _penalizes_left_padding() -> bool:
    """Whether this transformers applies repetition_penalty to the padding of a left-padded prompt
    too (5.17 does; later versions pass the padding lengths as the processor's prompt_ignore_length)."""
    import inspect

    from transformers.generation.utils import GenerationMixin

    return "prompt_ignore_length" not in inspect.getsource(GenerationMixin._get_logits_processor)


def _live_rows(ref, hf, P, beam):
    """Per step, the rows of transformers' scores that belong to a still-running sequence."""
    T = len(ref.scores)
    n = ref.scores[0].shape[0]
    if beam:  # every beam row runs until its batch item is done; the tests' cases keep all running
        return [torch.ones(n, dtype=torch.bool)] * T
    eos = hf.generation_config.eos_token_id
    gen = ref.sequences[:, P:]
    alive = torch.ones(n, dtype=torch.bool)
    out = []
    for t in range(T):
        out.append(alive.clone())
        alive &= gen[:, t] != eos
    return out


def test_sampled_scores_are_transformers_warped_scores(pair):
    """Sampling draws differ from transformers' (another RNG), so the oracle is transformers' own
    processors applied to transformers' logits along our sampled sequence."""
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    lm, m, hf = pair
    pv, ids, _ = _inputs(hf, B=1)
    kw = dict(max_new_tokens=5, min_new_tokens=5, do_sample=True, temperature=0.8, top_k=7, top_p=0.9, seed=3)
    out = m.generate(pv, input_ids=ids, return_dict_in_generate=True, output_scores=True, **kw)
    seq = out.sequences
    for t, s in enumerate(out.scores):
        with torch.no_grad():
            if lm == "opt":
                logits = hf(pixel_values=pv, input_ids=seq[:, : ids.shape[1] + t]).logits[:, -1]
                prefix = seq[:, : ids.shape[1] + t]
            else:
                logits = hf(pixel_values=pv, input_ids=ids, decoder_input_ids=seq[:, : 1 + t]).logits[:, -1]
                prefix = seq[:, : 1 + t]
        x = logits.float()
        x[:, hf.generation_config.eos_token_id] = -math.inf  # min_new_tokens
        for w in (TemperatureLogitsWarper(0.8), TopKLogitsWarper(7), TopPLogitsWarper(0.9)):
            x = w(prefix, x)
        _close(s, x)
        assert bool(torch.isfinite(s[0, seq[0, -len(out.scores) + t]]))  # the token drawn was allowed


def _greedy(m, pv, ids, mask, n=10):
    return m.generate(pv, input_ids=ids, attention_mask=mask, max_new_tokens=n)


@pytest.mark.parametrize("backend", ["reference", "fast"])
def test_ban_processors_match_transformers(ckpt, backend):
    for lm in LMS:
        d, hf = ckpt(lm)
        m = blip2_fast.load(d, backend=backend)
        pv, ids, mask = _inputs(hf)
        P = ids.shape[1] if lm == "opt" else 1
        plain = _greedy(m, pv, ids, mask)
        gen = plain[0, P:].tolist()
        cases = [dict(suppress_tokens=[gen[1], gen[2]]), dict(bad_words_ids=[[gen[1]], [gen[2], gen[3]]]),
                 dict(no_repeat_ngram_size=2), dict(no_repeat_ngram_size=1, num_beams=2),
                 dict(bad_words_ids=[[gen[0], gen[1]]], num_beams=3)]
        for kw in cases:
            ref = _hf(hf, pv, ids, mask, max_new_tokens=10, **kw)
            out = m.generate(pv, input_ids=ids, attention_mask=mask, max_new_tokens=10, **kw)
            assert torch.equal(out, ref), (lm, kw, out, ref)
        # the bans bite: suppressed tokens never appear, and the output changed
        out = m.generate(pv, input_ids=ids, attention_mask=mask, max_new_tokens=10, suppress_tokens=[gen[1]])
        assert gen[1] not in out[:, P:].tolist()[0] and not torch.equal(out, plain)


class _Bias(LogitsProcessor):
    """Adds +5 to one token (row-independent, as processors usually are)."""

    def __init__(self, tok):
        self.tok = tok

    def __call__(self, input_ids, scores):
        scores = scores.clone()
        scores[:, self.tok] += 5.0
        return scores


class _StopAfter(StoppingCriteria):
    """Stops a row once it holds `tok` after the prompt length `P`."""

    def __init__(self, tok, P):
        self.tok, self.P = tok, P

    def __call__(self, input_ids, scores, **kwargs):
        return (input_ids[:, self.P:] == self.tok).any(-1)


def test_custom_logits_processor_and_stopping_criteria(pair):
    from transformers import LogitsProcessorList, StoppingCriteriaList

    lm, m, hf = pair
    pv, ids, mask = _inputs(hf)
    P = ids.shape[1] if lm == "opt" else 1
    plain = _greedy(m, pv, ids, mask)
    tok = int(plain[0, P + 2])
    for kw in (dict(logits_processor=LogitsProcessorList([_Bias(7)])),
               dict(stopping_criteria=StoppingCriteriaList([_StopAfter(tok, P)])),
               dict(logits_processor=[_Bias(7)], num_beams=2),
               dict(stopping_criteria=[_StopAfter(tok, P)], num_beams=2)):
        ref = _hf(hf, pv, ids, mask, max_new_tokens=10, **kw)
        out = m.generate(pv, input_ids=ids, attention_mask=mask, max_new_tokens=10, **kw)
        assert torch.equal(out, ref), (kw, out, ref)
    out = m.generate(pv, input_ids=ids, attention_mask=mask, max_new_tokens=10,
                     stopping_criteria=[_StopAfter(tok, P)])
    assert not torch.equal(out, plain)  # it stopped early


@pytest.mark.parametrize("kw, exc, name", [
    (dict(num_beam_groups=2, diversity_penalty=0.5), ValueError, "num_beam_groups|diversity_penalty"),
    (dict(typical_p=0.5), ValueError, "typical_p"),
    (dict(forced_eos_token_id=3), ValueError, "forced_eos_token_id"),
    (dict(output_attentions=True), ValueError, "output_attentions"),
    (dict(generation_config=GenerationConfig(min_p=0.1)), ValueError, "min_p"),
    (dict(not_an_argument=1), TypeError, "not_an_argument"),
    (dict(generation_config={"max_new_tokens": 3}), TypeError, "generation_config"),
    (dict(logits_processor=[5]), TypeError, "logits_processors"),
    (dict(bad_words_ids=[[1000]]), ValueError, "bad_words_ids"),
    (dict(suppress_tokens=[-1]), ValueError, "suppress_tokens"),
    (dict(no_repeat_ngram_size=1.5), TypeError, "no_repeat_ngram_size"),
])
def test_unsupported_arguments_are_named(pair, kw, exc, name):
    lm, m, hf = pair
    pv, ids, _ = _inputs(hf, B=1)
    with pytest.raises(exc, match=name):
        m.generate(pv, input_ids=ids, max_new_tokens=2, **kw)


def test_neutral_transformers_arguments_are_accepted(pair):
    lm, m, hf = pair
    pv, ids, _ = _inputs(hf, B=1)
    kw = dict(max_new_tokens=3, output_attentions=False, num_beam_groups=1, typical_p=1.0, use_cache=True,
              output_hidden_states=False, return_dict_in_generate=False)
    assert torch.equal(m.generate(pv, input_ids=ids, **kw), _hf(hf, pv, ids, None, **kw))


def test_pixel_values_numpy_other_dtype(pair):
    lm, m, hf = pair
    pv, ids, mask = _inputs(hf)
    ref = m.generate(pv, input_ids=ids, attention_mask=mask, max_new_tokens=4)
    assert torch.equal(m.generate(pv.numpy(), input_ids=ids.numpy(), attention_mask=mask.numpy(), max_new_tokens=4), ref)
    assert torch.equal(m.generate(pv.double(), input_ids=ids, attention_mask=mask, max_new_tokens=4), ref)
    assert m.generate(pv.half(), input_ids=ids, attention_mask=mask, max_new_tokens=4).shape == ref.shape
    assert np.array_equal(pv.numpy(), pv.numpy())  # the caller's array is not changed
