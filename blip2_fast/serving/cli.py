"""`python -m blip2_fast serve`: load a model, build the app, serve it with uvicorn (or Ray Serve).

Importing this module is cheap (argparse only): the server's packages load when it runs.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys

log = logging.getLogger("blip2_fast.serving")


def _json_object(text: str) -> dict:
    try:
        v = json.loads(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"not JSON: {e}") from None
    if not isinstance(v, dict):
        raise argparse.ArgumentTypeError("expected a JSON object")
    return v


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--model", default=None,
                    help="checkpoint directory or hub id (default: the random-weight demo checkpoint, built once)")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000, help="0: any free port (the chosen one is printed)")
    ap.add_argument("--served-model-name", default=None, help="the model id clients send (default: the model's name)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--backend", choices=["fast", "reference"], default=None)
    ap.add_argument("--max-num-seqs", type=int, default=256, help="sequences decoded together at most")
    ap.add_argument("--num-blocks", type=int, default=None, help="KV-cache blocks (default: the engine's sizing)")
    ap.add_argument("--max-model-len", type=int, default=None)
    ap.add_argument("--max-queue", type=int, default=512, help="waiting requests before new ones get 503")
    ap.add_argument("--api-key", default=os.environ.get("BLIP2_FAST_API_KEY"),
                    help="require Authorization: Bearer KEY on /v1/* (default: $BLIP2_FAST_API_KEY, else none)")
    ap.add_argument("--allowed-local-media-path", default=None, metavar="DIR",
                    help="file:// image URLs may name files under DIR (default: file:// refused)")
    ap.add_argument("--allow-remote-images", action="store_true",
                    help="fetch http(s) image URLs (default: refused; the server never fetches what clients name)")
    ap.add_argument("--max-image-pixels", type=int, default=4096 * 4096, help="width x height at most")
    ap.add_argument("--max-image-bytes", type=int, default=20 * 2**20, help="encoded image size at most")
    ap.add_argument("--shutdown-timeout", type=float, default=30.0,
                    help="on SIGINT/SIGTERM, seconds to let requests in flight finish before aborting them")
    ap.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    ap.add_argument("--ray", action="store_true", help="deploy on Ray Serve ($RAY_ADDRESS, else a local Ray)")
    ap.add_argument("--num-replicas", type=int, default=1, help="with --ray: replicas, one engine each")
    ap.add_argument("--autoscaling-config", type=_json_object, default=None,
                    help="with --ray: Ray Serve autoscaling_config as JSON (replaces --num-replicas)")
    ap.add_argument("--ray-actor-options", type=_json_object, default=None,
                    help='with --ray: per replica, e.g. {"num_gpus": 1} (default: one GPU on cuda, else one CPU)')


def server_options(args) -> tuple[dict, dict, dict]:
    """(load kwargs, engine kwargs, app kwargs) from parsed arguments."""
    load_kw = {"device": args.device, "dtype": args.dtype, "backend": args.backend, "progress": False}
    engine_kw = {"max_num_seqs": args.max_num_seqs}
    if args.num_blocks is not None:
        engine_kw["num_blocks"] = args.num_blocks
    if args.max_model_len is not None:
        engine_kw["max_model_len"] = args.max_model_len
    app_kw = {"served_model_name": args.served_model_name, "api_key": args.api_key, "max_queue": args.max_queue,
              "allowed_local_media_path": args.allowed_local_media_path,
              "allow_remote_images": args.allow_remote_images, "max_image_pixels": args.max_image_pixels,
              "max_image_bytes": args.max_image_bytes}
    return load_kw, engine_kw, app_kw


def model_source(args) -> str:
    if args.model is not None:
        return args.model
    from ..demo import demo_checkpoint

    return str(demo_checkpoint())


def main(args) -> int:
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    source = model_source(args)
    if args.served_model_name is None:
        args.served_model_name = os.path.basename(os.path.normpath(source))
    if args.ray:
        from .ray import run_cli

        return run_cli(args, source)
    from pathlib import Path

    from ..generation import load_processor
    from ..loader import load
    from .app import build_app

    load_kw, engine_kw, app_kw = server_options(args)
    if Path(source).is_dir():
        load_processor(source)  # fail before reading the weights if the processor files are missing
    model = load(source, **load_kw)
    app = build_app(model, **engine_kw, **app_kw)
    return serve_app(app, args.host, args.port, args.shutdown_timeout, args.log_level,
                     f"{args.served_model_name} ({source})")


def serve_app(app, host: str, port: int, shutdown_timeout: float, log_level: str, what: str) -> int:
    """Run `app` under uvicorn until SIGINT / SIGTERM; then requests in flight get `shutdown_timeout`
    seconds to finish, the rest are aborted, the engine thread stops, and this returns 0."""
    import signal
    import socket

    import uvicorn

    # uvicorn picks httptools (HTTP parsing in C) and uvloop when installed (the serve extra has them)
    config = uvicorn.Config(app, log_level=log_level, access_log=False, lifespan="on",
                            timeout_graceful_shutdown=shutdown_timeout)
    server = uvicorn.Server(config)
    # uvicorn handles the signals while it runs and re-raises them once its graceful shutdown is done:
    # these handlers underneath its own make that re-raise harmless (status 0, not death by signal),
    # and make a signal that arrives before uvicorn starts end it as soon as it has started
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: setattr(server, "should_exit", True))
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.create_server((host, port), family=family, backlog=2048)  # listening before we say so
    print(f"blip2_fast: serving {what} on http://{host}:{sock.getsockname()[1]}", flush=True)
    server.run(sockets=[sock])
    log.info("blip2_fast: shut down cleanly")
    return 0


if __name__ == "__main__":
    p = argparse.ArgumentParser(prog="python -m blip2_fast.serving.cli")
    add_arguments(p)
    sys.exit(main(p.parse_args()))
