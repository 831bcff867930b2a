"""Small random-weight BLIP-2 checkpoints built with transformers (for tests, the demo and benchmarks).

Nothing is downloaded: the config is written out, the model is instantiated with random weights
(re-drawn so that no tensor is left at transformers' zero/near-zero init), and `save_pretrained`.
"""
from __future__ import annotations

import torch


def tiny_config(lm: str = "opt", *, vision_hidden=88, vision_heads=2, vision_layers=2, image_size=42, patch=6,
                q_hidden=64, q_heads=4, q_layers=2, num_query=5, lm_hidden=80, lm_heads=2, lm_layers=2,
                vocab=211, image_token=True, retrieval=False):
    """A BLIP-2 config with awkward sizes by default: head dims 44 (vision), 16 (Q-Former), 40 (LM);
    49 + 1 = 50 patches; vocab 211 (prime)."""
    from transformers import Blip2Config, Blip2QFormerConfig, Blip2VisionConfig, OPTConfig, T5Config

    vc = Blip2VisionConfig(hidden_size=vision_hidden, intermediate_size=2 * vision_hidden + 8,
                           num_hidden_layers=vision_layers, num_attention_heads=vision_heads,
                           image_size=image_size, patch_size=patch)
    qc = Blip2QFormerConfig(hidden_size=q_hidden, num_hidden_layers=q_layers, num_attention_heads=q_heads,
                            intermediate_size=2 * q_hidden + 4, encoder_hidden_size=vision_hidden, vocab_size=97,
                            max_position_embeddings=64, use_qformer_text_input=retrieval)
    if lm == "opt":
        tc = OPTConfig(hidden_size=lm_hidden, num_hidden_layers=lm_layers, ffn_dim=2 * lm_hidden + 8,
                       num_attention_heads=lm_heads, vocab_size=vocab, max_position_embeddings=128,
                       word_embed_proj_dim=lm_hidden, bos_token_id=2, eos_token_id=3, pad_token_id=1)
    elif lm == "t5":
        tc = T5Config(d_model=lm_hidden, d_kv=lm_hidden // lm_heads, d_ff=2 * lm_hidden + 8, num_layers=lm_layers,
                      num_decoder_layers=lm_layers, num_heads=lm_heads, vocab_size=vocab,
                      feed_forward_proj="gated-gelu", tie_word_embeddings=False, eos_token_id=1, pad_token_id=0,
                      decoder_start_token_id=0, relative_attention_num_buckets=8, relative_attention_max_distance=20)
    else:
        tc = {"model_type": lm}
    kw = {}
    if image_token:
        kw["image_token_index"] = vocab - 1
    cfg = Blip2Config(vision_config=vc.to_dict(), qformer_config=qc.to_dict(),
                      text_config=tc if isinstance(tc, dict) else tc.to_dict(), num_query_tokens=num_query,
                      image_text_hidden_size=24, **kw)
    return cfg


def randomize_(model: torch.nn.Module, seed: int = 0, std: float = 0.2) -> torch.nn.Module:
    """Redraw every parameter: transformers initialises BLIP-2's vision weights at std 1e-10 and the
    query tokens at zero, which would make parity tests pass vacuously."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name.lower() and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            elif p.dim() == 1:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            else:
                fan_in = p.shape[-1] if p.dim() > 1 else 1
                scale = std if p.dim() != 2 or fan_in < 4 else min(std, 1.5 / fan_in ** 0.5)
                p.copy_(scale * torch.randn(p.shape, generator=g))
    return model


def build_checkpoint(path, lm: str = "opt", *, arch: str = "Blip2ForConditionalGeneration", seed: int = 0,
                     shard_size=None, safe_serialization=True, **cfg_kw):
    """Build, randomise and save a tiny BLIP-2 checkpoint to `path`; returns the transformers model (eval)."""
    import transformers

    cfg = tiny_config(lm, retrieval=arch in ("Blip2ForImageTextRetrieval", "Blip2TextModelWithProjection"), **cfg_kw)
    torch.manual_seed(seed)
    model = getattr(transformers, arch)(cfg).eval()
    randomize_(model, seed)
    kw = {}
    if shard_size is not None:
        kw["max_shard_size"] = shard_size
    model.save_pretrained(str(path), safe_serialization=safe_serialization, **kw)
    return model
