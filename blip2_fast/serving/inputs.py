"""An image + prompt + generation options -> the engine's inputs, built the way `model.caption` and
`model.answer` build them (blip2_fast/generation.py), so the server's text equals theirs exactly:
the same processor call for the pixels and prompt ids, the same SamplingParams from the same
checkpoint defaults, the same decode (`skip_special_tokens`, stripped). `prepare` runs the processor
as they do; `Preparer` (the server's) gives the same inputs faster where it can (pixels.py).
"""
from __future__ import annotations

import dataclasses
import functools

import torch

from ..engine.params import SamplingParams
from ..generation import _params as generation_params
from .errors import bad_request
from .pixels import LookupPixels
from .protocol import GenOptions


@dataclasses.dataclass(frozen=True)
class EngineInputs:
    pixel_values: torch.Tensor  # [3, H, W] in the model's dtype and device, as generate() passes them
    prompt_ids: torch.Tensor  # [L] int64, image tokens included where the processor lays them out
    num_prompt_tokens: int  # LM prompt positions with the image queries (usage.prompt_tokens)


def prepare(model, processor, image, prompt: str | None) -> EngineInputs:
    """One RGB PIL image and a prompt (None: caption) -> EngineInputs. Runs the processor: call it
    off the event loop, from one thread at a time (a fast tokenizer is not safe to share)."""
    if prompt is None:  # model.caption(image): generate()'s prompt-less start
        return _caption_inputs(model, processor.image_processor(images=[image], return_tensors="pt")["pixel_values"][0])
    # model.answer / model.caption(prompt=...): the processor lays out image tokens and text
    enc = processor(images=[image], text=[prompt], return_tensors="pt")
    return _inputs(model, enc["pixel_values"][0], enc["input_ids"][0].long())


def _caption_inputs(model, px: torch.Tensor) -> EngineInputs:
    if model.is_encoder_decoder:
        return _inputs(model, px, torch.zeros(0, dtype=torch.long))
    Q, img_tok = model.cfg.num_query_tokens, model.cfg.image_token_id
    bos = getattr(model, "generation_defaults", {}).get("bos_token_id")
    ids = ([img_tok] * Q if img_tok is not None else []) + ([bos] if bos is not None else [])
    return _inputs(model, px, torch.tensor(ids, dtype=torch.long))


def _inputs(model, px: torch.Tensor, ids: torch.Tensor) -> EngineInputs:
    """px: [3, H, W] as the processor gives it; ids: [L] int64."""
    Q, img_tok = model.cfg.num_query_tokens, model.cfg.image_token_id
    n_img = int((ids == img_tok).sum()) if img_tok is not None else 0
    n_prompt = ids.numel() + (0 if n_img else Q)  # without image tokens the engine prepends the queries
    return EngineInputs(px.to(model.device, model.dtype), ids, n_prompt)


class Preparer:
    """`prepare(model, processor, image, prompt)`, the same EngineInputs, faster: where the image
    processor is one `LookupPixels` reproduces, the pixels come from it and the prompt ids from the
    processor's text-only call behind the image-token prefix the processor puts before them (read
    off the processor itself at start-up, on two prompts); otherwise (`fast` False) `prepare`
    itself runs. Built once per server; call it from one thread at a time, as `prepare`."""

    def __init__(self, model, processor):
        self.model, self.processor = model, processor
        self.pixels = LookupPixels.of(processor.image_processor)
        self.prefix = self._image_prefix() if self.pixels is not None else None
        self.fast = self.prefix is not None

    def __call__(self, image, prompt: str | None) -> EngineInputs:
        if not self.fast:
            return prepare(self.model, self.processor, image, prompt)
        px = self.pixels(image)  # [3, H, W] float32
        if prompt is None:
            return _caption_inputs(self.model, px)
        text = self.processor(text=[prompt], return_tensors="pt")["input_ids"][0].long()
        return _inputs(self.model, px, torch.cat([self.prefix, text]))

    def _image_prefix(self) -> torch.Tensor | None:
        """The ids the processor puts before a prompt's own when it is given an image (BLIP-2's
        query tokens), the same for two prompts; None where its output is not prefix + text ids."""
        from PIL import Image

        probe = Image.new("RGB", (self.pixels.width, self.pixels.height), (90, 160, 30))
        prefix = None
        for text in ("Question: what is in the picture? Answer:", "a"):
            try:
                full = self.processor(images=[probe], text=[text], return_tensors="pt")["input_ids"][0].long()
                own = self.processor(text=[text], return_tensors="pt")["input_ids"][0].long()
            except Exception:  # a processor that cannot take the probe is left to do its own work
                return None
            n = full.numel() - own.numel()
            if n < 0 or not torch.equal(full[n:], own) or (prefix is not None and not torch.equal(full[:n], prefix)):
                return None
            prefix = full[:n]
        return prefix


def sampling(model, opts: GenOptions, n: int, prompt_len: int) -> SamplingParams:
    """GenOptions -> SamplingParams through generate()'s own defaults merge, so an omitted field
    takes the checkpoint's default exactly as model.answer / model.caption do. temperature 0 is
    greedy; temperature > 0 samples; omitted: the checkpoint's default (greedy for BLIP-2)."""
    kw = {"max_new_tokens": opts.max_tokens, "min_new_tokens": opts.min_tokens, "top_p": opts.top_p,
          "top_k": opts.top_k, "num_beams": opts.num_beams, "length_penalty": opts.length_penalty,
          "repetition_penalty": opts.repetition_penalty, "seed": opts.seed}
    if opts.temperature is not None:
        kw["do_sample"] = opts.temperature > 0
        if opts.temperature > 0:
            kw["temperature"] = opts.temperature
    p = generation_params(model, {k: v for k, v in kw.items() if v is not None}, prompt_len)
    if p.num_beams > 1:
        p.num_return_sequences = n  # several beams come back as one request's candidates
    try:
        p.validate()
    except ValueError as e:
        raise bad_request(str(e)) from None
    return p


def choice_params(p: SamplingParams, n: int) -> list[SamplingParams]:
    """The engine requests behind n choices: one beam search returning n candidates, or n requests
    (seed + i each, as generate() seeds its i-th sample)."""
    if p.num_beams > 1:
        return [p]
    out = []
    for i in range(n):
        q = dataclasses.replace(p)
        if p.seed is not None:
            q.seed = (p.seed + i) % 2**63
        out.append(q)
    return out


def decode(tokenizer, token_ids: list[int]) -> str:
    """Generated ids -> text as model.caption / model.answer return it (not yet stripped)."""
    return tokenizer.decode(token_ids, skip_special_tokens=True)


def decoder(tokenizer):
    """`ids -> decode(tokenizer, ids)`, the same text, made once per server: a stream decodes its
    whole text at every token, and transformers' wrapper around a fast tokenizer's Rust decode cost
    three times the decode itself there. Where the wrapper does no more than call it (the backend's
    own `_decode`, its clean-up step off), the Rust decode is called directly; any other tokenizer
    decodes through `decode`."""
    try:
        from tokenizers import Tokenizer
        from transformers.tokenization_utils_tokenizers import TokenizersBackend
    except ImportError:  # another transformers layout: the general path
        return functools.partial(decode, tokenizer)
    backend = getattr(tokenizer, "_tokenizer", None)
    if (isinstance(backend, Tokenizer) and type(tokenizer)._decode is TokenizersBackend._decode
            and type(tokenizer).decode is TokenizersBackend.decode and not tokenizer.clean_up_tokenization_spaces):
        return functools.partial(backend.decode, skip_special_tokens=True)
    return functools.partial(decode, tokenizer)
