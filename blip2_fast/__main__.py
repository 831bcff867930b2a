"""Command line: `python -m blip2_fast {demo, caption, build-ext, serve}`.

Every user error (a bad flag, a missing, corrupt or oversized image, a bad checkpoint) is one line on
stderr, `error: ...`, and a non-zero exit: 2 for bad flags and images, 1 for the rest.
"""
from __future__ import annotations

import argparse
import sys


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are one line (argparse's own print the usage first)."""

    def error(self, message):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {v}")
    return v


def _pixel_limit(text: str) -> int | None:
    if text.strip() == "0":
        return None
    return _positive_int(text)


def main(argv=None) -> int:
    from .images import MAX_IMAGE_PIXELS

    ap = _Parser(prog="python -m blip2_fast", description="blip2_fast: fast BLIP-2 inference")
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("demo", help="caption a bundled image with a small random-weight BLIP-2 (no downloads)")
    cap = sub.add_parser("caption", help="caption image files")
    cap.add_argument("images", nargs="+", help="image files")
    cap.add_argument("--model", required=True, help="checkpoint directory or hub id")
    cap.add_argument("--prompt", default=None, help='optional prompt, e.g. "Question: what is shown? Answer:"')
    cap.add_argument("--max-new-tokens", type=_positive_int, default=30)
    cap.add_argument("--num-beams", type=_positive_int, default=1)
    cap.add_argument("--max-image-pixels", type=_pixel_limit, default=MAX_IMAGE_PIXELS, metavar="N",
                     help=f"refuse images of more than N pixels (width x height) before decoding them, against "
                          f"decompression bombs; 0: no limit (default {MAX_IMAGE_PIXELS})")
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
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except (ValueError, TypeError, OSError, MemoryError, RuntimeError) as e:
        # CheckpointError and UnsupportedModelError are ValueErrors; torch reports bad devices and
        # failed allocations as RuntimeErrors
        _error(e)
        return 1


def _error(e: BaseException, prefix: str = "") -> None:
    msg = " ".join(str(e).split()) or type(e).__name__  # one line, whatever the message holds
    print(f"error: {prefix}{msg}", file=sys.stderr)


def _caption(args) -> int:
    import warnings
    from pathlib import Path

    from PIL import Image

    from . import images as _images
    from .files import check_directory_files
    from .generation import load_processor
    from .loader import load

    # --max-image-pixels is the one limit in this process: it replaces PIL's own (which would warn,
    # or refuse, on its own terms) and blip2_fast's default, which caption() applies again
    Image.MAX_IMAGE_PIXELS = None
    _images.MAX_IMAGE_PIXELS = args.max_image_pixels
    images = []
    for f in args.images:
        try:
            images.append(_images.open_image(f))  # messages name the image
        except (OSError, ValueError, TypeError) as e:
            _error(e)
            return 2
    # warnings raised while loading (fallback notes, unused tensors) are shown only if the load
    # succeeds: a failed load is its one error line
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        if Path(args.model).is_dir():
            check_directory_files(args.model)  # transformers' processor loading would block on a FIFO
            load_processor(args.model)  # fail before reading gigabytes of weights if there is no processor
        model = load(args.model, device=args.device, dtype=args.dtype, backend=args.backend)
    for w in caught:
        warnings.showwarning(w.message, w.category, w.filename, w.lineno)
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
