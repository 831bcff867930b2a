"""The serving engine: continuous batching over a paged KV cache (see `engine.Engine`)."""
from .engine import Engine
from .outputs import EngineStats, RequestMetrics, RequestOutput
from .params import SamplingParams

__all__ = ["Engine", "EngineStats", "RequestMetrics", "RequestOutput", "SamplingParams"]
