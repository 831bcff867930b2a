"""Ray Serve: the same app as a deployment, one engine per replica (needs the `ray` extra).

    from ray import serve
    from blip2_fast.serving.ray import deployment

    app = deployment("Salesforce/blip2-opt-2.7b", num_replicas=4, ray_actor_options={"num_gpus": 1},
                     load_kwargs={"dtype": "bf16"}, engine_kwargs={"max_num_seqs": 64})
    serve.run(app, name="blip2_fast", route_prefix="/")

Each replica loads the model and builds the app (`build_app`) in its own process; Ray Serve routes
HTTP to it through `@serve.ingress`. The engine batches, so there is no `@serve.batch`; each
replica takes up to `max_num_seqs` requests at once (`max_ongoing_requests`), which lets Ray's
router hold the rest and send each to whichever replica has room.
"""
from __future__ import annotations

import os

from ray import serve


@serve.ingress()
class Blip2Deployment:
    """One replica: a model, its engine thread, and the OpenAI app over them."""

    def __init__(self, source: str, load_kwargs: dict, engine_kwargs: dict, app_kwargs: dict):
        from ..loader import load
        from .app import build_app

        model = load(source, **{"progress": False, **load_kwargs})
        self._app = build_app(model, **engine_kwargs, **app_kwargs)

    def __serve_build_asgi_app__(self):
        return self._app


def deployment(source: str, *, num_replicas: int = 1, autoscaling_config: dict | None = None,
               ray_actor_options: dict | None = None, load_kwargs: dict | None = None,
               engine_kwargs: dict | None = None, name: str = "blip2_fast", **app_kwargs):
    """A bound Ray Serve application serving checkpoint `source` (a path every node can read, or a
    hub id). autoscaling_config (Ray Serve's dict) replaces num_replicas. ray_actor_options: per
    replica (default one CPU; one GPU per replica on a GPU cluster: {"num_gpus": 1}).
    load_kwargs go to `blip2_fast.load`, engine_kwargs to `Engine`, the rest to `build_app`."""
    engine_kwargs = {"max_num_seqs": 256, **(engine_kwargs or {})}
    opts = {"name": name, "max_ongoing_requests": engine_kwargs["max_num_seqs"],
            "ray_actor_options": ray_actor_options or {"num_cpus": 1}}
    if autoscaling_config is not None:
        opts["autoscaling_config"] = autoscaling_config
    else:
        opts["num_replicas"] = num_replicas
    return serve.deployment(Blip2Deployment, **opts).bind(source, dict(load_kwargs or {}), engine_kwargs,
                                                          app_kwargs)


def run_cli(args, source: str) -> int:
    """`python -m blip2_fast serve --ray`: deploy, serve until SIGINT / SIGTERM, then take it down."""
    import signal
    import threading

    import ray

    from .cli import server_options

    load_kw, engine_kw, app_kw = server_options(args)
    load_kw = {k: v for k, v in load_kw.items() if v is not None}
    address = os.environ.get("RAY_ADDRESS")
    ray.init(address=address or None)  # a local Ray when RAY_ADDRESS is unset
    actor = args.ray_actor_options
    if actor is None:
        import torch

        cuda = (args.device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
        actor = {"num_gpus": 1} if cuda else {"num_cpus": 1}
    app = deployment(source, num_replicas=args.num_replicas, autoscaling_config=args.autoscaling_config,
                     ray_actor_options=actor, load_kwargs=load_kw, engine_kwargs=engine_kw, **app_kw)
    serve.start(http_options={"host": args.host, "port": args.port})
    serve.run(app, name="blip2_fast", route_prefix="/")
    print(f"blip2_fast: serving {args.served_model_name} on Ray Serve at http://{args.host}:{args.port}", flush=True)
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    done.wait()
    if address:  # someone else's cluster: take down only our application
        serve.delete("blip2_fast")
    else:
        serve.shutdown()
        ray.shutdown()
    return 0
