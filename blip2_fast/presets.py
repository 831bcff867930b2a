"""Named BLIP-2 configurations with random weights, for benchmarks: no download, no transformers model.

    model = load_preset("blip2-opt-2.7b", device="cuda", dtype="bf16")   # weights drawn on the GPU

Each preset is a checkpoint-style `config.json` dict in `blip2_fast/presets/<name>.json`, parseable by
`blip2_fast.config.parse` (and by `transformers.Blip2Config(**d)`). The real checkpoints' sizes:
ViT-g (1408 hidden, 39 layers), Q-Former (768, 12 layers, 32 queries), OPT-2.7B / 6.7B, Flan-T5-XL / XXL.
"""
from __future__ import annotations

import copy
import json
from functools import lru_cache
from pathlib import Path

import torch

from . import config as _config
from . import ops as _ops
from . import weights
from .loader import _generation_defaults, _resolve_device_dtype
from .model import Blip2

_DIR = Path(__file__).with_name("presets")


def list_presets() -> list[str]:
    """Names of the bundled presets, sorted."""
    return sorted(p.stem for p in _DIR.glob("*.json"))


@lru_cache(maxsize=None)
def _read(name: str) -> dict:
    f = _DIR / f"{name}.json"
    if not f.exists():
        raise ValueError(f"unknown preset {name!r}; expected one of {', '.join(list_presets())}")
    return json.loads(f.read_text())


def preset_config(name: str) -> dict:
    """The preset's config.json dict (a fresh copy: callers may edit it)."""
    return copy.deepcopy(_read(name))


def load_preset(name: str, *, device=None, dtype=None, backend: str | None = None, ops: dict | None = None,
                seed: int = 0) -> Blip2:
    """Build preset `name` with random weights drawn directly on `device` in `dtype`.

    Weights: N(0, 0.02²), norm weights one, biases zero, LM head tied to the embeddings
    (`weights.random_source`). device / dtype / backend / ops as in `blip2_fast.load`.
    """
    raw = preset_config(name)
    cfg = _config.parse(raw)
    device, dtype = _resolve_device_dtype(device, dtype)
    bound = _ops.bind(backend, ops, device)
    src = weights.random_source(device=device, dtype=dtype, seed=seed)
    if device.type == "cuda":
        torch.manual_seed(seed)  # random_source draws from the global CUDA generator there
    with torch.inference_mode():
        model = Blip2(cfg, bound, src)
    model.generation_defaults = _generation_defaults(None, None, cfg)
    model.preset = name
    return model


def weight_bytes(model: Blip2, part: str | None = None) -> int:
    """Bytes of the weights held by `model` (or by one part: "vision", "qformer", "lm"): its
    parameters and buffers, each storage counted once (tied weights are one tensor)."""
    module = model if part is None else getattr(model, part)
    seen, total = set(), 0
    for t in list(module.parameters()) + list(module.buffers()):
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), t.dtype, tuple(t.shape))
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total
