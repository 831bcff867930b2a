"""Model configuration: the fields our model code uses, read from a BLIP-2 `config.json`.

transformers' config classes parse the file (they know every historical spelling and default); we copy
out what we need into small frozen dataclasses so model code never depends on transformers' objects.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from .weights import CheckpointError

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
    eos_token_id: int | None
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
    eos_token_id: int | None
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


def parse(raw: dict) -> Blip2Config:
    """Turn a BLIP-2 config dict (as in config.json) into our dataclasses; raise on what we can't run."""
    try:
        return _parse(raw)
    except (TypeError, AttributeError, ZeroDivisionError, KeyError) as e:  # a field of the wrong kind
        raise CheckpointError(f"config.json is malformed ({type(e).__name__}: {e})") from None


def _parse(raw: dict) -> Blip2Config:
    from transformers import Blip2Config as HFBlip2Config

    if not isinstance(raw, dict):
        raise CheckpointError(f"config.json must hold a JSON object, got {type(raw).__name__}")
    for sub in ("vision_config", "qformer_config", "text_config"):
        if raw.get(sub) is not None and not isinstance(raw[sub], dict):
            raise CheckpointError(f"config.json: {sub} must be an object, got {type(raw[sub]).__name__}")
    if raw.get("model_type") not in ("blip-2", "blip_2"):
        raise UnsupportedModelError(f"not a BLIP-2 checkpoint: config.json has model_type={raw.get('model_type')!r} (expected 'blip-2')")
    text = raw.get("text_config") or {}
    lm_type = text.get("model_type", "opt")
    archs = raw.get("architectures") or ["Blip2ForConditionalGeneration"]
    if isinstance(archs, str):
        archs = [archs]
    if not isinstance(archs, list) or archs[0] not in KNOWN_ARCHITECTURES:
        raise UnsupportedModelError(f"config.json architectures={archs!r}; blip2_fast runs "
                                    f"{', '.join(KNOWN_ARCHITECTURES)}")
    needs_lm = archs[0] in ("Blip2ForConditionalGeneration", "Blip2Model")
    if needs_lm and lm_type not in SUPPORTED_LMS:
        raise UnsupportedModelError(
            f"language model {lm_type!r} is not supported by blip2_fast (supported: {', '.join(SUPPORTED_LMS)}); "
            f"the checkpoint's text_config.model_type is {lm_type!r}")
    try:
        # the normalised list: transformers 5.17's strict config dataclass refuses a bare string
        hf = HFBlip2Config(**{k: v for k, v in raw.items() if k not in ("transformers_version", "architectures")},
                           architectures=archs)
    except Exception as e:
        raise CheckpointError(f"config.json could not be parsed as a BLIP-2 config ({type(e).__name__}: {e})") from None
    v, q, t = hf.vision_config, hf.qformer_config, hf.text_config
    vision = VisionConfig(hidden=v.hidden_size, layers=v.num_hidden_layers, heads=v.num_attention_heads,
                          mlp=v.intermediate_size, image_size=v.image_size, patch=v.patch_size,
                          eps=v.layer_norm_eps, qkv_bias=bool(getattr(v, "qkv_bias", True)), act=v.hidden_act)
    qformer = QFormerConfig(hidden=q.hidden_size, layers=q.num_hidden_layers, heads=q.num_attention_heads,
                            mlp=q.intermediate_size, eps=q.layer_norm_eps, cross_every=q.cross_attention_frequency,
                            encoder_hidden=q.encoder_hidden_size, vocab=q.vocab_size,
                            max_positions=q.max_position_embeddings, pad_token_id=q.pad_token_id or 0,
                            use_text_input=bool(getattr(q, "use_qformer_text_input", False)), act=q.hidden_act)
    for name, cfg in (("vision_config", vision), ("qformer_config", qformer)):
        for field in ("hidden", "layers", "heads", "mlp"):
            if not isinstance(getattr(cfg, field), int) or getattr(cfg, field) < 1:
                raise CheckpointError(f"{name}: {field} must be a positive integer, got {getattr(cfg, field)!r}")
        if cfg.hidden % cfg.heads:
            raise CheckpointError(f"{name}: hidden size {cfg.hidden} is not divisible by {cfg.heads} heads")
    if not isinstance(qformer.cross_every, int) or qformer.cross_every < 1:
        raise CheckpointError(f"qformer_config.cross_attention_frequency must be >= 1, got {qformer.cross_every!r}")
    for name, act in (("vision_config.hidden_act", vision.act), ("qformer_config.hidden_act", qformer.act)):
        if act not in ("gelu", "gelu_new", "gelu_pytorch_tanh"):
            raise UnsupportedModelError(f"{name}={act!r} is not supported (expected gelu)")
    lm = None
    if lm_type == "opt":
        if t.activation_function not in ("relu", "gelu"):
            raise UnsupportedModelError(f"OPT activation {t.activation_function!r} is not supported")
        lm = OPTConfig(hidden=t.hidden_size, layers=t.num_hidden_layers, heads=t.num_attention_heads, ffn=t.ffn_dim,
                       vocab=t.vocab_size, max_positions=t.max_position_embeddings,
                       word_embed_proj_dim=t.word_embed_proj_dim or t.hidden_size, pre_norm=t.do_layer_norm_before,
                       final_norm=t.do_layer_norm_before and not getattr(t, "_remove_final_layer_norm", False),
                       act=t.activation_function, bias=getattr(t, "enable_bias", True),
                       ln_affine=getattr(t, "layer_norm_elementwise_affine", True),
                       tie_embeddings=getattr(t, "tie_word_embeddings", True),
                       bos_token_id=t.bos_token_id, eos_token_id=t.eos_token_id, pad_token_id=t.pad_token_id)
        if min(lm.hidden, lm.heads, lm.layers, lm.ffn, lm.vocab) < 1:
            raise CheckpointError("text_config: hidden_size, num_attention_heads, num_hidden_layers, ffn_dim and "
                                  "vocab_size must be positive")
        if lm.hidden % lm.heads:
            raise CheckpointError(f"text_config: hidden size {lm.hidden} is not divisible by {lm.heads} heads")
    elif lm_type == "t5":
        act = getattr(t, "dense_act_fn", "relu")
        if act not in ("gelu_new", "gelu", "relu", "gelu_pytorch_tanh"):
            raise UnsupportedModelError(f"T5 feed-forward activation {act!r} is not supported")
        lm = T5Config(d_model=t.d_model, d_kv=t.d_kv, heads=t.num_heads, d_ff=t.d_ff, enc_layers=t.num_layers,
                      dec_layers=t.num_decoder_layers if t.num_decoder_layers is not None else t.num_layers,
                      vocab=t.vocab_size, eps=t.layer_norm_epsilon, buckets=t.relative_attention_num_buckets,
                      max_distance=t.relative_attention_max_distance, gated=bool(getattr(t, "is_gated_act", False)),
                      act=act, scale_decoder_outputs=bool(getattr(t, "scale_decoder_outputs", getattr(t, "tie_word_embeddings", True))),
                      tie_embeddings=getattr(t, "tie_word_embeddings", True),
                      decoder_start_token_id=t.decoder_start_token_id if t.decoder_start_token_id is not None else (t.pad_token_id or 0),
                      eos_token_id=t.eos_token_id, pad_token_id=t.pad_token_id)
        if min(lm.d_model, lm.d_kv, lm.heads, lm.d_ff, lm.enc_layers, lm.dec_layers, lm.vocab, lm.buckets) < 1:
            raise CheckpointError("text_config: T5 sizes (d_model, d_kv, num_heads, d_ff, num_layers, "
                                  "num_decoder_layers, vocab_size, relative_attention_num_buckets) must be positive")
    image_token_id = _first(raw, "image_token_id", "image_token_index")
    return Blip2Config(vision=vision, qformer=qformer, lm=lm, num_query_tokens=hf.num_query_tokens,
                       image_token_id=image_token_id, image_text_hidden=getattr(hf, "image_text_hidden_size", 256),
                       architecture=archs[0], raw=raw)


def read(path: Path) -> Blip2Config:
    f = Path(path) / "config.json"
    if not f.exists():
        raise CheckpointError(f"{path}: no config.json")
    try:
        raw = json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{f}: not valid JSON ({e})") from None
    return parse(raw)
