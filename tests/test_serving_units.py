"""The server's pure pieces: stream deltas (text.py), BLIP-2 prompts from conversations and parameter
checks (protocol.py), and image limits checked before decoding (media.py)."""
import base64
import io
import random

import pytest

# the server's extra (pip install -e ".[serve]"): without it these tests skip, not fail collection
for _mod in ("fastapi", "uvicorn", "prometheus_client", "httpx"):
    pytest.importorskip(_mod)
from PIL import Image

from blip2_fast.serving import media
from blip2_fast.serving.errors import APIError
from blip2_fast.serving.protocol import conversation_prompt, parse_chat
from blip2_fast.serving.text import ChoiceText


def _stream(decodes, stop=()):
    t = ChoiceText(tuple(stop))
    deltas = [t.update(d, i == len(decodes) - 1) for i, d in enumerate(decodes)]
    return deltas, t


def test_deltas_add_up_to_the_stripped_final_text_with_and_without_stops():
    rng = random.Random(0)
    words = ["a", "cat", " ", "on", "the", "mat", "\n", "ü", "日本"]
    for _ in range(200):
        full = "".join(rng.choice(words) + rng.choice(["", " "]) for _ in range(rng.randint(1, 12)))
        prefixes = [full[: k] for k in sorted(rng.sample(range(len(full) + 1), min(4, len(full) + 1)))] + [full]
        deltas, t = _stream(prefixes)
        assert "".join(deltas) == full.strip() == t.text
        stop = rng.choice(["cat", "on the", "t o", " m", "日"])
        deltas, t = _stream(prefixes, stop=[stop])
        text = full.lstrip()
        want = (text[: text.index(stop)] if stop in text else text).strip()
        assert "".join(deltas) == want == t.text and t.stopped == (stop in text), (full, stop)


def test_incomplete_characters_and_trailing_space_are_held_back():
    deltas, _ = _stream(["a ", "a b\ufffd", "a bü ", "a bü c"])
    assert deltas == ["a", " b", "ü", " c"]


def test_stop_strings_cut_the_text_and_prefixes_wait():
    deltas, t = _stream(["the cat", "the cat sa", "the cat sat on", "the cat sat on the mat"], stop=["sat"])
    assert deltas == ["the cat", "", "", ""] and t.stopped and t.text == "the cat"
    deltas, t = _stream(["x Ans", "x Answer: y"], stop=["Answer:"])
    assert deltas == ["x", ""] and t.text == "x" and t.stopped  # "Ans" was held back: it might be the stop
    deltas, t = _stream(["x Ans", "x Answers"], stop=["Answer:"])
    assert "".join(deltas) == "x Answers" and not t.stopped


def test_a_decode_that_rewrites_sent_text_waits_for_agreement():
    deltas, t = _stream(["it '", "it's", "it's fine"])  # a clean-up rule merged "it '" + "s"
    assert deltas == ["it '", "", ""] and t.text == "it's fine"


def test_conversation_prompt_matches_model_answer_and_blip2_format():
    assert conversation_prompt([("user", "what is it?")]) == "Question: what is it? Answer:"
    assert conversation_prompt([("user", "Question: x? Answer:")]) == "Question: x? Answer:"  # as model.answer
    assert conversation_prompt([("user", "")]) is None  # image only: captioning
    assert conversation_prompt([("user", "q1"), ("assistant", "a1"), ("user", "q2")]) == \
        "Question: q1 Answer: a1 Question: q2 Answer:"
    assert conversation_prompt([("system", "Be brief."), ("user", "q")]) == "Be brief. Question: q Answer:"


def _msgs(*content, role="user"):
    return {"messages": [{"role": role, "content": list(content)}]}


IMG = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}


def test_parse_chat_reads_parts_and_checks_fields():
    job = parse_chat({**_msgs(IMG, {"type": "text", "text": "hi"}), "max_tokens": 5, "max_completion_tokens": 7,
                      "temperature": 0, "top_k": -1, "n": 2, "seed": 3, "stop": "x", "user": "ignored"}, max_n=4)
    assert job.prompt == "Question: hi Answer:" and job.image_url.startswith("data:")
    assert job.options.max_tokens == 7 and job.options.temperature == 0.0 and job.options.top_k == 0
    assert job.n == 2 and job.stop == ("x",) and not job.stream
    assert parse_chat({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "data:x"}]}]},
                      max_n=1).prompt is None
    for body, param in [({**_msgs(IMG), "n": 5}, "n"), ({**_msgs(IMG), "num_beams": 2, "n": 3}, "n"),
                        (_msgs(IMG, {"type": "audio"}), "messages[0].content[1].type"),
                        (_msgs(IMG, role="assistant"), "messages[0].content[0]"),
                        ({**_msgs(IMG), "temperature": float("nan")}, "temperature"),
                        ({"messages": []}, "messages")]:
        with pytest.raises(APIError) as e:
            parse_chat(body, max_n=4)
        assert e.value.status == 400 and e.value.param == param, (body, e.value.param)


def _png(w, h, mode="RGB"):
    buf = io.BytesIO()
    Image.new(mode, (w, h)).save(buf, "PNG")
    return buf.getvalue()


def test_media_pixel_limit_is_checked_from_the_header_before_decoding(monkeypatch):
    data = _png(5000, 5000)  # 25 M pixels that compress to a few kB
    assert len(data) < 200_000
    loaded = []
    monkeypatch.setattr(Image.Image, "load", lambda self: loaded.append(1))
    with pytest.raises(APIError) as e:
        media.decode(data, media.MediaPolicy(max_image_pixels=1000 * 1000), "image")
    assert e.value.status == 413 and not loaded


def test_media_byte_limits_and_schemes(tmp_path):
    p = media.MediaPolicy(max_image_bytes=1000)
    small = "data:image/png;base64," + base64.b64encode(_png(4, 4)).decode()
    assert media.read_bytes(*media.read_source(small, p, "image"), p, "image") == _png(4, 4)
    with pytest.raises(APIError) as e:
        media.read_bytes(*media.read_source("data:image/png;base64,@@@@", p, "image"), p, "image")
    assert e.value.status == 400
    big = "data:image/png;base64," + base64.b64encode(b"\0" * 2000).decode()
    with pytest.raises(APIError) as e:
        media.read_source(big, p, "image")
    assert e.value.status == 413
    for url in ("data:image/png,notbase64", "data:text/plain;base64,AAAA", "gopher://x", "no-scheme",
                "http://example.com/a.png", f"file://{tmp_path}/a.png"):
        with pytest.raises(APIError) as e:
            media.read_source(url, p, "image")
        assert e.value.status == 400, url
    (tmp_path / "big.png").write_bytes(b"\0" * 2000)
    with pytest.raises(APIError) as e:
        media.read_source(f"file://{tmp_path}/big.png", media.MediaPolicy(max_image_bytes=1000,
                                                                           allowed_local_media_path=tmp_path), "image")
    assert e.value.status == 413
    im = media.decode(_png(3, 2, "L"), media.MediaPolicy(), "image")
    assert im.mode == "RGB" and im.size == (3, 2)
    buf = io.BytesIO()
    Image.new("I;16", (4, 4)).save(buf, "PNG")
    with pytest.raises(APIError, match="8-bit"):
        media.decode(buf.getvalue(), media.MediaPolicy(), "image")
    with pytest.raises(ValueError, match="max_image_pixels"):
        media.MediaPolicy(max_image_pixels=0)


def _bpe_tokenizer(**kw):
    """A byte-level BPE tokenizer (as OPT's) trained here on a small corpus with multi-byte text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = ["a cat sat on the mat .", "Über den Wolken , 日本語 text !", "what is in the picture ? a dog"] * 20
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>", "<pad>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", **kw)


@pytest.mark.parametrize("kind", ["demo", "bpe", "bpe-clean-up"])
def test_the_servers_decoder_gives_the_tokenizers_decode(kind, tmp_path):
    """inputs.decoder (the Rust decode called directly where that is the same) against
    tokenizer.decode(skip_special_tokens=True), on random ids with special tokens and cut
    multi-byte characters; with clean-up on it must fall back to the tokenizer's own decode."""
    from blip2_fast.demo import build_demo_checkpoint
    from blip2_fast.generation import load_processor
    from blip2_fast.serving import inputs

    if kind == "demo":
        tok = load_processor(build_demo_checkpoint(tmp_path / "ckpt")).tokenizer
    else:
        tok = _bpe_tokenizer(clean_up_tokenization_spaces=kind == "bpe-clean-up",
                             clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output=True)
    fast = inputs.decoder(tok)
    assert (fast.func == tok._tokenizer.decode) == (kind != "bpe-clean-up")  # the path under test
    rng = random.Random(3)
    n = len(tok)
    for _ in range(300):
        ids = [rng.randrange(n) for _ in range(rng.randint(0, 30))]
        assert fast(ids) == inputs.decode(tok, ids), ids


def test_stream_chunks_are_the_whole_object_serialized():
    """Run._chunk builds each chunk from a head and tail made once per request: the bytes must be
    those of the chunk object serialized whole, for both kinds, with and without usage."""
    import json
    from types import SimpleNamespace

    from blip2_fast.serving.protocol import parse_completion
    from blip2_fast.serving.response import Run

    server = SimpleNamespace(model_name='m"ü\\n')
    rng = random.Random(5)
    for kind in ("chat", "completion"):
        for usage in (False, True):
            body = {"stream": True, "stream_options": {"include_usage": usage}}
            if kind == "chat":
                parts = [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AA=="}}]
                job = parse_chat({**body, "messages": [{"role": "user", "content": parts}]}, max_n=4)
            else:
                job = parse_completion({**body, "prompt": "hi", "image": "data:image/png;base64,AA=="}, max_n=4)
            run = Run(server, f"id-{kind}", job, 1, 7, 0.0)
            for _ in range(20):
                delta = "".join(rng.choice(['"', "\\", "ü", "日", "\n", "a", " ", "\u2028"]) for _ in range(5))
                pieces = [{"index": i, "delta": {"content": delta}, "logprobs": None, "finish_reason": None}
                          for i in range(rng.randint(0, 2))]
                obj = {"id": run.rid, "object": "chat.completion.chunk" if kind == "chat" else "text_completion",
                       "created": run.created, "model": server.model_name, "choices": pieces}
                if usage:
                    obj["usage"] = None
                want = f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"
                assert run._chunk(pieces) == want
                assert json.loads(run._chunk(pieces)[6:]) == obj
