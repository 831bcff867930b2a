"""blip2_fast: a fast inference runtime for BLIP-2."""
__version__ = "0.1.0"
