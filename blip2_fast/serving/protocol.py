"""OpenAI request bodies -> one typed `Job`, validated at the door with exact types and ranges.

A chat conversation becomes BLIP-2's prompt format: user turns `Question: {text}`, assistant turns
`Answer: {text}`, joined by spaces and ending in `Answer:` (system text, if any, leads as it is). A
single user turn with an image and text gives the prompt `model.answer(image, text)` builds; a
single user turn with only an image is captioning (`prompt=None`, as `model.caption(image)`).
Unknown fields are ignored, as OpenAI's clients send extras; known features this server cannot
honour (logprobs, tools, logit_bias, non-zero presence/frequency penalties, vLLM's structured-output
and ignore_eos extras) are refused rather than ignored. Every string must be valid Unicode.
"""
from __future__ import annotations

import dataclasses
import math

from .errors import bad_request


@dataclasses.dataclass(frozen=True)
class GenOptions:
    """Generation fields as the client gave them (None: the checkpoint's default)."""

    max_tokens: int | None = None
    min_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    num_beams: int | None = None
    length_penalty: float | None = None
    repetition_penalty: float | None = None


@dataclasses.dataclass(frozen=True)
class Job:
    """One chat or completions request, ready for the engine side of the server."""

    kind: str  # "chat" or "completion"
    model: str | None
    prompt: str | None  # None: caption the image (model.caption's prompt-less path)
    image_url: str
    image_param: str  # the request field naming the image, for error messages
    options: GenOptions
    n: int = 1
    stream: bool = False
    include_usage: bool = False
    stop: tuple[str, ...] = ()


def _int(body, key, lo, hi=None):
    v = body.get(key)
    if v is None:
        return None
    if not isinstance(v, int) or isinstance(v, bool):
        raise bad_request(f"{key} must be an integer, got {type(v).__name__}", key)
    if v < lo or (hi is not None and v > hi):
        raise bad_request(f"{key} must be in [{lo}, {hi if hi is not None else 'inf'}], got {v}", key)
    return v


def _num(body, key, lo, hi, *, lo_open=False):
    v = body.get(key)
    if v is None:
        return None
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
        raise bad_request(f"{key} must be a finite number, got {v!r}", key)
    if v < lo or v > hi or (lo_open and v == lo):
        raise bad_request(f"{key} must be in {'(' if lo_open else '['}{lo}, {hi}], got {v}", key)
    return float(v)


def _bool(body, key):
    v = body.get(key)
    if v is None:
        return False
    if not isinstance(v, bool):
        raise bad_request(f"{key} must be a boolean, got {type(v).__name__}", key)
    return v


def _text(v, param: str) -> str:
    """A client's string, refused (400) unless it is one and is valid Unicode: JSON's \\uXXXX escapes
    can spell a lone UTF-16 surrogate, which no tokenizer or UTF-8 writer takes."""
    if not isinstance(v, str):
        raise bad_request(f"{param} must be a string", param)
    if not v.isascii():
        try:
            v.encode("utf-8")
        except UnicodeEncodeError as e:
            raise bad_request(f"{param} is not valid Unicode: a lone surrogate {v[e.start]!r} at {e.start} "
                              "(a \\uD800-\\uDFFF escape without its pair)", param) from None
    return v


def _refuse_unsupported(body):
    for key in ("logprobs", "echo"):
        if body.get(key) not in (None, False, 0):
            raise bad_request(f"{key} is not supported by this server", key)
    if body.get("top_logprobs") is not None:
        raise bad_request("top_logprobs is not supported by this server", "top_logprobs")
    for key in ("tools", "functions"):
        if body.get(key):
            raise bad_request(f"{key} (function calling) is not supported by BLIP-2", key)
    for key in ("presence_penalty", "frequency_penalty"):
        if _num(body, key, -2.0, 2.0) not in (None, 0.0):
            raise bad_request(f"{key} is not supported; use repetition_penalty", key)
    fmt = body.get("response_format")
    if fmt is not None and fmt != {"type": "text"}:
        raise bad_request("response_format other than {'type': 'text'} is not supported", "response_format")
    if body.get("suffix") is not None:
        raise bad_request("suffix is not supported by this server", "suffix")
    if body.get("best_of") not in (None, 1):
        raise bad_request("best_of is not supported; use num_beams", "best_of")
    if body.get("logit_bias"):
        raise bad_request("logit_bias is not supported by this server", "logit_bias")
    # vLLM's extras that would change the output (structured output, eos handling): refused, not ignored
    for key in ("guided_json", "guided_regex", "guided_choice", "guided_grammar", "structured_outputs"):
        if body.get(key) is not None:
            raise bad_request(f"{key} (structured output) is not supported by this server", key)
    if body.get("ignore_eos") not in (None, False):
        raise bad_request("ignore_eos is not supported; set min_tokens (as many as max_tokens) instead", "ignore_eos")


def _options(body, max_n: int) -> tuple[GenOptions, int]:
    max_tokens = _int(body, "max_tokens", 1)
    mct = _int(body, "max_completion_tokens", 1)
    if mct is not None:
        max_tokens = mct  # the newer name wins when a client sends both
    min_tokens = _int(body, "min_tokens", 0)
    if min_tokens is not None and max_tokens is not None and min_tokens > max_tokens:
        raise bad_request(f"min_tokens={min_tokens} exceeds max_tokens={max_tokens}", "min_tokens")
    top_k = _int(body, "top_k", -1)
    seed = _int(body, "seed", 0, 2**63 - 1)
    num_beams = _int(body, "num_beams", 1, max_n)
    n = _int(body, "n", 1, max_n) or 1
    if num_beams is not None and num_beams > 1 and n > num_beams:
        raise bad_request(f"n={n} exceeds num_beams={num_beams}: beam search returns at most num_beams sequences", "n")
    opts = GenOptions(
        max_tokens=max_tokens, min_tokens=min_tokens,
        temperature=_num(body, "temperature", 0.0, 2.0), top_p=_num(body, "top_p", 0.0, 1.0, lo_open=True),
        top_k=None if top_k is None else max(top_k, 0),  # vLLM's -1 and transformers' 0 both mean off
        seed=seed, num_beams=num_beams, length_penalty=_num(body, "length_penalty", -1e6, 1e6),
        repetition_penalty=_num(body, "repetition_penalty", 0.0, 1e6, lo_open=True))
    return opts, n


def _stop(body) -> tuple[str, ...]:
    v = body.get("stop")
    if v is None:
        return ()
    stops = [v] if isinstance(v, str) else v
    if not isinstance(stops, list) or len(stops) > 4 or not all(isinstance(s, str) and s for s in stops):
        raise bad_request("stop must be a non-empty string or a list of at most 4 non-empty strings", "stop")
    return tuple(_text(t, "stop") for t in stops)


def _stream(body) -> tuple[bool, bool]:
    stream = _bool(body, "stream")
    so = body.get("stream_options")
    if so is None:
        return stream, False
    if not stream:
        raise bad_request("stream_options is only allowed with stream=true", "stream_options")
    if not isinstance(so, dict):
        raise bad_request("stream_options must be an object", "stream_options")
    return stream, _bool(so, "include_usage")


def _model(body):
    m = body.get("model")
    return None if m is None else _text(m, "model")


def parse_chat(body: dict, *, max_n: int) -> Job:
    """A /v1/chat/completions body -> Job; raises APIError(400) naming the field at fault."""
    _refuse_unsupported(body)
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise bad_request("messages must be a non-empty list", "messages")
    turns, images = [], []
    for i, m in enumerate(msgs):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise bad_request(f"{where} must be an object", where)
        role = m.get("role")
        if role not in ("system", "developer", "user", "assistant"):
            raise bad_request(f"{where}.role must be 'system', 'user' or 'assistant', got {role!r}", f"{where}.role")
        texts = _content(m.get("content"), role, where, images)
        turns.append((role, " ".join(texts)))
    if turns[-1][0] != "user":
        raise bad_request("the last message must be from the user (the model answers it)", "messages")
    if not images:
        raise bad_request("BLIP-2 needs exactly one image in the conversation; none was given", "messages")
    if len(images) > 1:
        raise bad_request(f"BLIP-2 takes exactly one image per conversation; {len(images)} were given", images[1][1])
    opts, n = _options(body, max_n)
    stream, include_usage = _stream(body)
    return Job("chat", _model(body), conversation_prompt(turns), images[0][0], images[0][1], opts, n, stream,
               include_usage, _stop(body))


def _content(content, role, where, images) -> list[str]:
    if content is None:
        if role != "assistant":
            raise bad_request(f"{where}.content is missing", f"{where}.content")
        return []
    if isinstance(content, str):
        return [_text(content, f"{where}.content")]
    if not isinstance(content, list):
        raise bad_request(f"{where}.content must be a string or a list of content parts", f"{where}.content")
    texts = []
    for j, part in enumerate(content):
        pw = f"{where}.content[{j}]"
        if not isinstance(part, dict):
            raise bad_request(f"{pw} must be an object", pw)
        kind = part.get("type")
        if kind == "text":
            texts.append(_text(part.get("text"), f"{pw}.text"))
        elif kind == "image_url":
            if role != "user":
                raise bad_request(f"{pw}: only user messages may carry images", pw)
            iu = part.get("image_url")
            url = iu.get("url") if isinstance(iu, dict) else iu
            if not isinstance(url, str):
                raise bad_request(f"{pw}.image_url.url must be a string", f"{pw}.image_url")
            images.append((url, f"{pw}.image_url"))
        else:
            raise bad_request(f"{pw}.type {kind!r} is not supported (use 'text' or 'image_url')", f"{pw}.type")
    return texts


def conversation_prompt(turns: list[tuple[str, str]]) -> str | None:
    """[(role, text)] -> BLIP-2's prompt, or None when no turn has text (captioning)."""
    if not any(t.strip() for _, t in turns):
        return None
    if len(turns) == 1:
        q = turns[0][1]
        # exactly model.answer's rule, so a lone question gives model.answer's text
        return q if q.strip().startswith("Question:") else f"Question: {q} Answer:"
    parts = []
    for role, text in turns:
        if role == "user":
            if text.strip():
                parts.append(f"Question: {text}")
        elif role == "assistant":
            parts.append(f"Answer: {text}" if text.strip() else "Answer:")
        elif text.strip():
            parts.append(text)
    return " ".join(parts + ["Answer:"])


def parse_completion(body: dict, *, max_n: int) -> Job:
    """A /v1/completions body (a plain prompt plus one image in the extra field `image`) -> Job."""
    _refuse_unsupported(body)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise bad_request("prompt must be a string (one prompt per request)", "prompt")
    _text(prompt, "prompt")
    image = body.get("image")
    if image is None:
        raise bad_request("BLIP-2 needs an image: give it as the field 'image' (a data: URL)", "image")
    if not isinstance(image, str):
        raise bad_request("image must be a string (a data: URL)", "image")
    opts, n = _options(body, max_n)
    stream, include_usage = _stream(body)
    return Job("completion", _model(body), prompt, image, "image", opts, n, stream, include_usage, _stop(body))
