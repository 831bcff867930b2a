"""The OpenAI-compatible HTTP server over the engine (needs the `serve` extra).

    app = blip2_fast.serving.build_app(model, max_num_seqs=64)      # an ASGI app (FastAPI)
    python -m blip2_fast serve --model DIR --port 8000              # the same, under uvicorn
    python -m blip2_fast serve --ray --num-replicas 2               # on Ray Serve (the `ray` extra)

One thread owns the engine (driver.py); asyncio owns the sockets (app.py, response.py); they
talk through a command queue one way and per-request asyncio queues the other.
"""
__all__ = ["build_app", "MediaPolicy"]


def __getattr__(name):
    # lazily, so `python -m blip2_fast` can build its `serve` parser without the [serve] extra installed
    if name == "build_app":
        from .app import build_app

        return build_app
    if name == "MediaPolicy":
        from .media import MediaPolicy

        return MediaPolicy
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
