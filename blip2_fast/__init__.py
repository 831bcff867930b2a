"""blip2_fast: a fast inference runtime for BLIP-2 (EVA ViT-g -> Q-Former -> OPT / Flan-T5).

    import blip2_fast
    model = blip2_fast.load("path/to/blip2-checkpoint")          # or a hub id, or a transformers model
    ids = model.generate(pixel_values, input_ids=..., max_new_tokens=30)
    engine = blip2_fast.Engine(model)                            # continuous batching for serving
"""
from . import images  # blip2_fast.images.MAX_IMAGE_PIXELS: the pixel limit, settable before any call
from .engine import Engine, EngineStats, RequestMetrics, RequestOutput, SamplingParams
from .loader import load
from .config import UnsupportedModelError
from .weights import CheckpointError

__version__ = "0.1.0"
__all__ = ["load", "Engine", "EngineStats", "RequestMetrics", "RequestOutput", "SamplingParams", "CheckpointError",
           "UnsupportedModelError"]
