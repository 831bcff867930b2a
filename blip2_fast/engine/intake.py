"""The door: `add_request`'s arguments checked (exact types and ranges) and turned into a Request
the engine owns (its own copy of the pixels, the prompt laid out over the cache's positions, the
eos ids, a generator). A request that passes cannot fail a step on its arguments; one the engine
could never serve is refused here, with the limit named."""
from __future__ import annotations

import dataclasses
import itertools
import math
import time

import torch

from ..images import check_image
from .limits import to_pixels
from .params import SamplingParams, check_bool, check_ids
from .processors import BanRules
from .runner import image_digest
from .sequence import Request


class PreparedPixels:
    """Pixels that `Engine.prepare_pixels` checked, copied and digested (for the image cache) on
    its caller's thread; `add_request(pixel_values=...)` takes them without redoing that work.
    Opaque: made only by engine code, from the very copy the engine keeps (the caller's tensor can
    change afterwards; no caller-supplied digest can name other pixels in the image cache)."""

    __slots__ = ("_pixels", "_digest", "_model", "_interp")

    def __init__(self, *args, **kwargs):
        raise TypeError("PreparedPixels are made by Engine.prepare_pixels(pixel_values)")

    def __setattr__(self, name, value):
        raise AttributeError("PreparedPixels are read-only")

    @property
    def shape(self) -> torch.Size:
        return self._pixels.shape

    @property
    def interpolate_pos_encoding(self) -> bool:
        return self._interp

    def __repr__(self) -> str:
        return f"PreparedPixels(shape={list(self.shape)}, dtype={self._pixels.dtype}, digest={self._digest[:12]}...)"


def prepare_pixels(model, pixel_values, interp) -> PreparedPixels:
    """`Engine.prepare_pixels`: the checks and copy `add_request` makes, and the digest of that copy."""
    interp = check_bool("interpolate_pos_encoding", interp)
    if isinstance(pixel_values, PreparedPixels):
        raise TypeError("pixel_values are already PreparedPixels")
    px = to_pixels(model, pixel_values, batched=False, device=None, interpolate=interp)  # our own copy
    p = object.__new__(PreparedPixels)
    for name, value in (("_pixels", px), ("_digest", image_digest(px) + ("/i" if interp else "")), ("_model", model),
                        ("_interp", interp)):
        object.__setattr__(p, name, value)
    return p


def new_request(eng, request_id, pixel_values, image, prompt, sampling, interp, order: int) -> Request:
    """Check add_request's arguments against `eng` (an Engine) and build the Request."""
    try:
        hash(request_id)
    except TypeError:
        raise TypeError(f"request_id must be hashable, got {type(request_id).__name__}") from None
    if request_id in eng._live:
        raise ValueError(f"request id {request_id!r} is already in use")
    if sampling is not None and not isinstance(sampling, SamplingParams):
        raise TypeError(f"sampling must be a SamplingParams, got {type(sampling).__name__}")
    p = dataclasses.replace(sampling) if sampling is not None else SamplingParams()
    p.validate(eng._vocab)
    interp = check_bool("interpolate_pos_encoding", interp)
    model = eng.model
    if (pixel_values is None) == (image is None):
        raise ValueError("give exactly one of pixel_values (a [3, H, W] tensor) or image (a PIL image)")
    if isinstance(pixel_values, PreparedPixels):  # checked, copied and digested by prepare_pixels
        if pixel_values._model is not model:
            raise ValueError("pixel_values were prepared by an engine over another model")
        if pixel_values._interp != interp:
            raise ValueError(f"pixel_values were prepared with interpolate_pos_encoding={pixel_values._interp}, "
                             f"but the request has {interp}")
        px, digest = pixel_values._pixels, pixel_values._digest
    else:
        if image is not None:
            check_image(image)  # over the pixel limit, empty, or not 8-bit: refused before it is decoded
            pixel_values = model.processor().image_processor(images=[image], return_tensors="pt")["pixel_values"][0]
        px = to_pixels(model, pixel_values, batched=False, device=None, interpolate=interp)  # our own copy
        digest = image_digest(px) + ("/i" if interp else "")
    prompt_ids = _prompt_ids(eng, prompt)
    Q, img = model.cfg.num_query_tokens, model.cfg.image_token_id
    n_img = sum(1 for t in prompt_ids if t == img) if img is not None else 0
    if n_img not in (0, Q):
        raise ValueError(f"prompt has {n_img} image tokens (id {img}); expected 0 or num_query_tokens={Q}")
    if n_img:
        lm_tokens = tuple(-1 if t == img else t for t in prompt_ids)
    else:
        lm_tokens = (-1,) * Q + prompt_ids  # no image tokens: the queries go first
    q = itertools.count()
    keys = tuple(("img", digest, next(q)) if t < 0 else t for t in lm_tokens)
    n_lm = len(keys)
    if not eng.layout.cross and n_lm >= eng.max_model_len:
        raise ValueError(f"prompt of {n_lm} positions (image queries included) leaves no room for new tokens "
                         f"within the model's maximum of {eng.max_model_len} positions")
    if p.num_beams > eng.max_num_seqs:
        raise ValueError(f"num_beams={p.num_beams} exceeds max_num_seqs={eng.max_num_seqs}")
    bs = eng.block_size
    lm_prompt = 1 if eng.layout.cross else n_lm
    room = min(p.max_new_tokens, eng.max_model_len - lm_prompt)  # a request stops at max_model_len
    cross = math.ceil(n_lm / bs) if eng.layout.cross else 0
    worst = max(math.ceil((lm_prompt + room) / bs) * p.num_beams + cross,
                eng.scheduler.blocks_to_admit(n_lm if eng.layout.cross else 0, lm_prompt, p.num_beams))
    if worst > eng.num_blocks:
        raise ValueError(f"request {request_id!r} needs up to {worst} KV blocks but the pool has {eng.num_blocks}")
    defaults = getattr(model, "generation_defaults", {})
    eos = p.stop_token_ids if p.stop_token_ids is not None else defaults.get("eos_token_id")
    eos = () if eos is None else ((eos,) if isinstance(eos, int) else tuple(eos))
    generator = None
    if p.do_sample:
        if p.seed is None:  # drawn from the global RNG: torch.manual_seed reproduces the request
            p.seed = int(torch.randint(0, 2**63 - 1, (1,)))
        generator = torch.Generator(device=model.device).manual_seed(p.seed)
    ban = tuple(t for t in eos if 0 <= t < eng._vocab)
    r = Request(request_id, order, p, prompt_ids, lm_tokens, keys, digest, px, interp, eos, ban,
                defaults.get("pad_token_id"), room, generator, time.monotonic(), p.plain_greedy)
    r.bans = BanRules.of(p, eos)
    r.watch = bool(p.stopping_criteria)
    if p.output_scores:
        r.step_scores = []
    if p.output_logits:
        r.step_logits = []
    return r

def _prompt_ids(eng, prompt) -> tuple[int, ...]:
    model = eng.model
    if prompt is None:
        if model.is_encoder_decoder:
            return ()
        bos = getattr(model, "generation_defaults", {}).get("bos_token_id")
        return (bos,) if bos is not None else ()
    if isinstance(prompt, str):
        tok = eng.tokenizer
        if tok is None:
            ids = model.processor()(text=[prompt], return_tensors="pt")["input_ids"][0].tolist()
        elif not callable(tok):
            raise TypeError(f"a text prompt needs a callable tokenizer (tokenizer(text)['input_ids']); "
                            f"{type(tok).__name__} is not: pass token ids instead")
        else:
            ids = tok(prompt)["input_ids"]
        return tuple(check_ids("prompt", ids, eng._vocab))
    if isinstance(prompt, torch.Tensor):
        if prompt.dim() != 1 or prompt.is_floating_point() or prompt.dtype == torch.bool or prompt.is_complex():
            raise ValueError(f"prompt token ids must be a 1-D integer sequence, got {prompt.dtype} of shape "
                             f"{list(prompt.shape)}")
        prompt = prompt.tolist()
    elif hasattr(prompt, "dtype") and hasattr(prompt, "tolist"):  # numpy
        if getattr(prompt, "ndim", 1) != 1 or prompt.dtype.kind not in "iu":
            raise ValueError(f"prompt token ids must be a 1-D integer sequence, got {prompt.dtype} of shape "
                             f"{list(prompt.shape)}")
        prompt = prompt.tolist()
    if not isinstance(prompt, (list, tuple)):
        raise TypeError(f"prompt must be text or a 1-D sequence of token ids, got {type(prompt).__name__}")
    return tuple(check_ids("prompt", prompt, eng._vocab))
