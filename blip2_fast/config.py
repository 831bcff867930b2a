"""Model configuration: the fields our model code uses, read from a BLIP-2 `config.json`.

transformers' config classes parse the file (they know every historical spelling and default); we copy
out what we need into small frozen dataclasses so model code never depends on transformers' objects.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from .files import CheckpointError, read_json

SUPPORTED_LMS = ("opt", "t5")
KNOWN_ARCHITECTURES = ("Blip2ForConditionalGeneration", "Blip2Model", "Blip2ForImageTextRetrieval",
                       "Blip2VisionModelWithProjection", "Blip2TextModelWithProjection")


class UnsupportedModelError(ValueError):
    """The checkpoint is not a BLIP-2 model we can run (e.g. its language model is not OPT or T5)."""


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    hidden: int
    layers: int
    heads: int
    mlp: int
    image_size: int
    patch: int
    eps: float
    qkv_bias: bool
    act: str

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch) ** 2


@dataclasses.dataclass(frozen=True)
class QFormerConfig:
    hidden: int
    layers: int
    heads: int
    mlp: int
    eps: float
    cross_every: int
    encoder_hidden: int
    vocab: int
    max_positions: int
    pad_token_id: int
    use_text_input: bool
    act: str


@dataclasses.dataclass(frozen=True)
class OPTConfig:
    hidden: int
    layers: int
    heads: int
    ffn: int
    vocab: int
    max_positions: int
    word_embed_proj_dim: int
    pre_norm: bool
    final_norm: bool
    act: str
    bias: bool
    ln_affine: bool
    tie_embeddings: bool
    bos_token_id: int | None
    eos_token_id: int | list[int] | None
    pad_token_id: int | None


@dataclasses.dataclass(frozen=True)
class T5Config:
    d_model: int
    d_kv: int
    heads: int
    d_ff: int
    enc_layers: int
    dec_layers: int
    vocab: int
    eps: float
    buckets: int
    max_distance: int
    gated: bool
    act: str
    scale_decoder_outputs: bool
    tie_embeddings: bool
    decoder_start_token_id: int
    eos_token_id: int | list[int] | None
    pad_token_id: int | None


@dataclasses.dataclass(frozen=True)
class Blip2Config:
    vision: VisionConfig | None
    qformer: QFormerConfig | None
    lm: OPTConfig | T5Config | None
    num_query_tokens: int
    image_token_id: int | None
    image_text_hidden: int
    architecture: str
    raw: dict = dataclasses.field(repr=False, compare=False, default_factory=dict)

    @property
    def lm_type(self) -> str | None:
        return None if self.lm is None else ("opt" if isinstance(self.lm, OPTConfig) else "t5")


def _first(d: dict, *names, default=None):
    for n in names:
        if n in d and d[n] is not None:
            return d[n]
    return default


def parse(raw: dict, where: str = "config.json") -> Blip2Config:
    """Turn a BLIP-2 config dict (as in config.json) into our dataclasses; raise on what we can't run.

    Every number the model is built from is checked here (type, sign, range, finiteness, and how the
    fields fit together), so a bad value is a CheckpointError naming the field and `where` (the file),
    never a model that loads and then computes garbage. Sizes the weights pin down (hidden sizes,
    vocabularies, patch and position counts) are checked against the tensors' shapes at load.
    """
    try:
        return _parse(raw, where)
    except (TypeError, AttributeError, ZeroDivisionError, KeyError, IndexError, OverflowError, RecursionError) as e:
        raise CheckpointError(f"{where} is malformed ({type(e).__name__}: {e})") from None


class _Fields:
    """Checked reads of one config section; errors name `where` and `section.field`."""

    def __init__(self, where: str, section: str, obj):
        self.where, self.section, self.obj = where, section, obj

    def _bad(self, name, want, v):
        return CheckpointError(f"{self.where}: {self.section}{name} must be {want}, got {v!r}")

    def get(self, name, default=None):
        return getattr(self.obj, name, default) if not isinstance(self.obj, dict) else self.obj.get(name, default)

    def int(self, name, lo=1, hi=None, *, none=False, value=None):
        v = self.get(name) if value is None else value
        if v is None and none:
            return None
        if isinstance(v, bool) or not isinstance(v, int) or v < lo or (hi is not None and v > hi):
            want = (("a positive integer" if lo == 1 else f"an integer >= {lo}") if hi is None
                    else f"an integer in [{lo}, {hi}]")
            raise self._bad(name, want, v)
        return v

    def eps(self, name):
        v = self.get(name)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < 1:  # NaN fails too
            raise self._bad(name, "a finite number in (0, 1)", v)
        return float(v)

    def flag(self, name, default):
        v = self.get(name, default)
        if not isinstance(v, bool):
            raise self._bad(name, "true or false", v)
        return v

    def token(self, name, vocab, v="__read__"):
        """A token id in [0, vocab), or None."""
        v = self.get(name) if v == "__read__" else v
        if v is None:
            return None
        return self.int(name, 0, vocab - 1, value=v)

    def tokens(self, name, vocab):
        """End-of-sequence ids: one id, a non-empty list of ids, or None."""
        v = self.get(name)
        if isinstance(v, list) and v:
            return [self.token(name, vocab, t) for t in v]
        return self.token(name, vocab, v)


def _section(where, name, obj):
    return _Fields(where, f"{name}." if name else "", obj)


def _parse(raw: dict, where: str) -> Blip2Config:
    from transformers import Blip2Config as HFBlip2Config

    if not isinstance(raw, dict):
        raise CheckpointError(f"{where} must hold a JSON object, got {type(raw).__name__}")
    for sub in ("vision_config", "qformer_config", "text_config"):
        if raw.get(sub) is not None and not isinstance(raw[sub], dict):
            raise CheckpointError(f"{where}: {sub} must be an object, got {type(raw[sub]).__name__}")
    if raw.get("model_type") not in ("blip-2", "blip_2"):
        raise UnsupportedModelError(f"not a BLIP-2 checkpoint: {where} has model_type={raw.get('model_type')!r} (expected 'blip-2')")
    text = raw.get("text_config") or {}
    lm_type = text.get("model_type", "opt")
    archs = raw.get("architectures") or ["Blip2ForConditionalGeneration"]
    if isinstance(archs, str):
        archs = [archs]
    if not isinstance(archs, list) or archs[0] not in KNOWN_ARCHITECTURES:
        raise UnsupportedModelError(f"{where}: architectures={archs!r}; blip2_fast runs "
                                    f"{', '.join(KNOWN_ARCHITECTURES)}")
    needs_lm = archs[0] in ("Blip2ForConditionalGeneration", "Blip2Model")
    if needs_lm and lm_type not in SUPPORTED_LMS:
        raise UnsupportedModelError(
            f"{where}: language model {lm_type!r} is not supported by blip2_fast (supported: "
            f"{', '.join(SUPPORTED_LMS)}); the checkpoint's text_config.model_type is {lm_type!r}")
    try:
        # the normalised list: transformers 5.17's strict config dataclass refuses a bare string
        hf = HFBlip2Config(**{k: v for k, v in raw.items() if k not in ("transformers_version", "architectures")},
                           architectures=archs)
    except Exception as e:  # transformers raises many kinds for values it cannot take
        raise _hf_error(where, raw, e) from None
    vision = _vision(_section(where, "vision_config", hf.vision_config))
    qformer = _qformer(_section(where, "qformer_config", hf.qformer_config))
    if archs[0] in _HAS_VISION and qformer.encoder_hidden != vision.hidden:
        raise CheckpointError(f"{where}: qformer_config.encoder_hidden_size={qformer.encoder_hidden} must equal "
                              f"vision_config.hidden_size={vision.hidden} (the Q-Former attends to the vision encoder's output)")
    lm = None
    if lm_type == "opt":
        lm = _opt(_section(where, "text_config", hf.text_config))
    elif lm_type == "t5":
        lm = _t5(_section(where, "text_config", hf.text_config))
    top = _section(where, "", raw)
    num_query = top.int("num_query_tokens", value=hf.num_query_tokens)
    image_text_hidden = top.int("image_text_hidden_size", value=getattr(hf, "image_text_hidden_size", 256))
    image_token_id = _first(raw, "image_token_id", "image_token_index")
    name = "image_token_id" if raw.get("image_token_id") is not None else "image_token_index"
    if lm is not None and needs_lm:
        image_token_id = top.token(name, lm.vocab, image_token_id)
    elif image_token_id is not None:
        image_token_id = top.int(name, 0, value=image_token_id)
    return Blip2Config(vision=vision, qformer=qformer, lm=lm, num_query_tokens=num_query,
                       image_token_id=image_token_id, image_text_hidden=image_text_hidden,
                       architecture=archs[0], raw=raw)


def _hf_error(where: str, raw: dict, e: Exception) -> CheckpointError:
    """transformers' own refusal of a config, as one line naming the section and field at fault."""
    import re

    from transformers import CONFIG_MAPPING, Blip2QFormerConfig, Blip2VisionConfig

    section, err = "", e
    try:
        text_cls = CONFIG_MAPPING[(raw.get("text_config") or {}).get("model_type", "opt")]
    except (KeyError, TypeError):
        text_cls = None
    for name, cls in (("vision_config", Blip2VisionConfig), ("qformer_config", Blip2QFormerConfig),
                      ("text_config", text_cls)):
        if cls is None or not isinstance(raw.get(name), dict):
            continue
        try:
            cls(**raw[name])
        except Exception as sub:  # this section alone fails: name it
            section, err = name + ".", sub
            break
    m = re.search(r"field '([^']+)'", str(err))
    field = m.group(1) if m else ""
    text = " ".join(str(err).split())
    return CheckpointError(f"{where}: {section}{field or '(a field)'} is not valid: {text}")


_HAS_VISION = ("Blip2ForConditionalGeneration", "Blip2Model", "Blip2ForImageTextRetrieval",
               "Blip2VisionModelWithProjection")
_GELUS = ("gelu", "gelu_new", "gelu_pytorch_tanh")


def _heads(c: _Fields, hidden_name: str, heads_name: str) -> tuple[int, int]:
    hidden, heads = c.int(hidden_name), c.int(heads_name)
    if hidden % heads:
        raise CheckpointError(f"{c.where}: {c.section}{hidden_name}={hidden} is not divisible by "
                              f"{c.section}{heads_name}={heads}")
    return hidden, heads


def _act(c: _Fields, name: str, allowed) -> str:
    act = c.get(name)
    if act not in allowed:
        raise UnsupportedModelError(f"{c.where}: {c.section}{name}={act!r} is not supported (expected one of {', '.join(allowed)})")
    return act


def _vision(c: _Fields) -> VisionConfig:
    hidden, heads = _heads(c, "hidden_size", "num_attention_heads")
    image_size = c.int("image_size")
    patch = c.int("patch_size", 1, image_size)  # a larger patch than the image leaves no patch at all
    return VisionConfig(hidden=hidden, layers=c.int("num_hidden_layers"), heads=heads, mlp=c.int("intermediate_size"),
                        image_size=image_size, patch=patch, eps=c.eps("layer_norm_eps"),
                        qkv_bias=c.flag("qkv_bias", True), act=_act(c, "hidden_act", _GELUS))


def _qformer(c: _Fields) -> QFormerConfig:
    hidden, heads = _heads(c, "hidden_size", "num_attention_heads")
    vocab = c.int("vocab_size")
    pad = c.get("pad_token_id")
    return QFormerConfig(hidden=hidden, layers=c.int("num_hidden_layers"), heads=heads, mlp=c.int("intermediate_size"),
                         eps=c.eps("layer_norm_eps"), cross_every=c.int("cross_attention_frequency"),
                         encoder_hidden=c.int("encoder_hidden_size"), vocab=vocab,
                         max_positions=c.int("max_position_embeddings"),
                         pad_token_id=0 if pad is None else c.token("pad_token_id", vocab),
                         use_text_input=c.flag("use_qformer_text_input", False), act=_act(c, "hidden_act", _GELUS))


def _opt(c: _Fields) -> OPTConfig:
    hidden, heads = _heads(c, "hidden_size", "num_attention_heads")
    vocab = c.int("vocab_size")
    proj = c.int("word_embed_proj_dim", none=True)
    pre_norm = c.flag("do_layer_norm_before", True)
    return OPTConfig(hidden=hidden, layers=c.int("num_hidden_layers"), heads=heads, ffn=c.int("ffn_dim"), vocab=vocab,
                     max_positions=c.int("max_position_embeddings"), word_embed_proj_dim=proj or hidden,
                     pre_norm=pre_norm, final_norm=pre_norm and not c.flag("_remove_final_layer_norm", False),
                     act=_act(c, "activation_function", ("relu", "gelu")), bias=c.flag("enable_bias", True),
                     ln_affine=c.flag("layer_norm_elementwise_affine", True),
                     tie_embeddings=c.flag("tie_word_embeddings", True), bos_token_id=c.token("bos_token_id", vocab),
                     eos_token_id=c.tokens("eos_token_id", vocab), pad_token_id=c.token("pad_token_id", vocab))


def _t5(c: _Fields) -> T5Config:
    vocab = c.int("vocab_size")
    buckets = c.int("relative_attention_num_buckets", 4)  # the encoder halves them, then keeps half exact
    max_exact = buckets // 2  # the decoder's exact buckets (the encoder's are half as many)
    max_distance = c.int("relative_attention_max_distance", max_exact + 1)  # log(max_distance / max_exact) > 0
    layers = c.int("num_layers")
    dec_layers = c.int("num_decoder_layers", none=True)
    pad = c.token("pad_token_id", vocab)
    start = c.token("decoder_start_token_id", vocab)
    tie = c.flag("tie_word_embeddings", True)
    return T5Config(d_model=c.int("d_model"), d_kv=c.int("d_kv"), heads=c.int("num_heads"), d_ff=c.int("d_ff"),
                    enc_layers=layers, dec_layers=layers if dec_layers is None else dec_layers, vocab=vocab,
                    eps=c.eps("layer_norm_epsilon"), buckets=buckets, max_distance=max_distance,
                    gated=c.flag("is_gated_act", False), act=_act(c, "dense_act_fn", ("gelu_new", "gelu", "relu", "gelu_pytorch_tanh")),
                    scale_decoder_outputs=c.flag("scale_decoder_outputs", tie), tie_embeddings=tie,
                    decoder_start_token_id=start if start is not None else (pad or 0),
                    eos_token_id=c.tokens("eos_token_id", vocab), pad_token_id=pad)


def read(path: Path) -> Blip2Config:
    """The config of checkpoint directory `path` (its config.json, a regular UTF-8 JSON file)."""
    f = Path(path) / "config.json"
    if not os.path.lexists(f):
        raise CheckpointError(f"{path}: no config.json")
    return parse(read_json(f, "config.json"), str(f))
