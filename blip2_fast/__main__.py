"""Command line: `python -m blip2_fast {demo, caption, build-ext, serve}`."""
from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m blip2_fast", description="blip2_fast: fast BLIP-2 inference")
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("demo", help="caption a bundled image with a small random-weight BLIP-2 (no downloads)")
    cap = sub.add_parser("caption", help="caption image files")
    cap.add_argument("images", nargs="+", help="image files")
    cap.add_argument("--model", required=True, help="checkpoint directory or hub id")
    cap.add_argument("--prompt", default=None, help='optional prompt, e.g. "Question: what is shown? Answer:"')
    cap.add_argument("--max-new-tokens", type=int, default=30)
    cap.add_argument("--num-beams", type=int, default=1)
    cap.add_argument("--backend", choices=["fast", "reference"], default=None)
    cap.add_argument("--device", default=None)
    cap.add_argument("--dtype", default=None)
    sub.add_parser("build-ext", help="build the C++/CUDA extension now (it is otherwise built on first use)")
    _add_serve(sub)
    args = ap.parse_args(argv)
    if args.cmd == "serve":
        return _serve(args)
    if args.cmd == "demo":
        from .demo import main as demo

        return demo()
    if args.cmd == "build-ext":
        from . import _ext

        reason = _ext.build(verbose=True)
        if reason:
            print(f"build failed: {reason}", file=sys.stderr)
            return 1
        print("extension built")
        return 0
    try:
        return _caption(args)
    except (ValueError, TypeError, OSError) as e:  # CheckpointError and UnsupportedModelError are ValueErrors
        print(f"error: {e}", file=sys.stderr)
        return 1


def _caption(args) -> int:
    from pathlib import Path

    from PIL import Image, UnidentifiedImageError

    from .generation import load_processor
    from .loader import load

    images = []
    for f in args.images:
        try:
            images.append(Image.open(f).convert("RGB"))
        except (OSError, UnidentifiedImageError) as e:
            print(f"error: cannot read image {f}: {e}", file=sys.stderr)
            return 2
    if Path(args.model).is_dir():
        load_processor(args.model)  # fail before reading gigabytes of weights if there is no processor
    model = load(args.model, device=args.device, dtype=args.dtype, backend=args.backend)
    texts = model.caption(images, prompt=args.prompt, max_new_tokens=args.max_new_tokens, num_beams=args.num_beams)
    for f, t in zip(args.images, texts):
        print(f"{f}\t{t}")
    return 0


def _add_serve(sub) -> None:
    from .serving.cli import add_arguments  # argparse only: the server's packages load when it runs

    add_arguments(sub.add_parser("serve", help="an OpenAI-compatible HTTP server (needs the [serve] extra)"))


def _serve(args) -> int:
    from .serving.cli import main as serve

    try:
        return serve(args)
    except ModuleNotFoundError as e:
        if e.name not in ("fastapi", "uvicorn", "prometheus_client", "httpx", "ray"):
            raise
        extra = "ray" if e.name == "ray" else "serve"
        print(f"error: serving needs the [{extra}] extra (pip install 'blip2_fast[{extra}]'): {e}", file=sys.stderr)
        return 1
    except (ValueError, TypeError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
