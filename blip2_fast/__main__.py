"""Command line: `python -m blip2_fast {demo, caption, build-ext, serve}` (`--help` on each; `--version`).

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


_EXAMPLES = """examples:
  python -m blip2_fast demo
  python -m blip2_fast caption photo.jpg --model Salesforce/blip2-opt-2.7b
  python -m blip2_fast caption photos/ "more/*.png" --model ./blip2 --batch-size 16 --json > captions.jsonl
  python -m blip2_fast caption photo.jpg --model ./blip2 --prompt "Question: what is shown? Answer:"
  python -m blip2_fast caption photo.jpg --model ./blip2 --do-sample --temperature 0.8 --top-p 0.9 --seed 1
  python -m blip2_fast build-ext
  python -m blip2_fast serve --model ./blip2 --port 8000
"""

_CAPTION_EXAMPLES = """examples:
  python -m blip2_fast caption a.jpg b.png --model ./blip2
  python -m blip2_fast caption photos/ --model ./blip2 --batch-size 16 --json
  python -m blip2_fast caption "shots/*.jpg" --model ./blip2 --num-beams 3 --max-new-tokens 20
  python -m blip2_fast caption a.jpg --model ./blip2 --do-sample --top-p 0.9 --seed 7

Prints one line per image, "<image>\\t<caption>", or with --json one JSON object per line:
{"image": "<image>", "caption": "<caption>"}. Progress goes to stderr when it is a terminal.
"""


def _positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not v > 0 or v != v or v == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text}")
    return v


def _unit(text: str) -> float:
    v = _positive_float(text)
    if v > 1:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {v}")
    return v


def _seed(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer in [0, 2**64), got {text!r}") from None
    if not 0 <= v < 2**64:
        raise argparse.ArgumentTypeError(f"expected an integer in [0, 2**64), got {v}")
    return v


def main(argv=None) -> int:
    from . import __version__
    from .images import MAX_IMAGE_PIXELS

    raw = argparse.RawDescriptionHelpFormatter
    ap = _Parser(prog="python -m blip2_fast", description="blip2_fast: fast BLIP-2 inference", epilog=_EXAMPLES,
                 formatter_class=raw)
    ap.add_argument("--version", action="version", version=f"blip2_fast {__version__}",
                    help="print the version and exit")
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("demo", help="caption a bundled image with a small random-weight BLIP-2 (no downloads)",
                   description="Build (once) a small random-weight BLIP-2 with a local tokenizer and processor, "
                               "caption a bundled image with both backends and print the timings.")
    cap = sub.add_parser("caption", help="caption image files, directories or globs",
                         description="Caption images with a BLIP-2 checkpoint, in batches.", epilog=_CAPTION_EXAMPLES,
                         formatter_class=raw)
    cap.add_argument("images", nargs="+", help="image files, directories (their images, sorted) or globs "
                                               "(quoted, e.g. \"photos/*.jpg\")")
    cap.add_argument("--model", required=True, help="checkpoint directory or hub id, e.g. Salesforce/blip2-opt-2.7b")
    cap.add_argument("--prompt", default=None, help='optional prompt, e.g. "Question: what is shown? Answer:"')
    cap.add_argument("--max-new-tokens", type=_positive_int, default=30, metavar="N",
                     help="new tokens per caption at most (default 30)")
    cap.add_argument("--num-beams", type=_positive_int, default=1, metavar="K", help="beam search width (default 1)")
    cap.add_argument("--do-sample", action="store_true", help="sample instead of greedy / beam decoding")
    cap.add_argument("--temperature", type=_positive_float, default=None, metavar="T",
                     help="sampling temperature (with --do-sample; default 1.0)")
    cap.add_argument("--top-p", type=_unit, default=None, metavar="P",
                     help="nucleus sampling: keep the smallest set of tokens with probability >= P (with --do-sample)")
    cap.add_argument("--seed", type=_seed, default=None, metavar="S",
                     help="seed for --do-sample: the same seed gives the same captions")
    cap.add_argument("--batch-size", type=_positive_int, default=8, metavar="B",
                     help="images captioned together (default 8)")
    cap.add_argument("--json", action="store_true",
                     help='print one JSON object per image: {"image": ..., "caption": ...}')
    cap.add_argument("--max-image-pixels", type=_pixel_limit, default=MAX_IMAGE_PIXELS, metavar="N",
                     help=f"refuse images of more than N pixels (width x height) before decoding them, against "
                          f"decompression bombs; 0: no limit (default {MAX_IMAGE_PIXELS})")
    cap.add_argument("--backend", choices=["fast", "reference"], default=None,
                     help="fast kernels or the plain-PyTorch reference (default: fast, or $BLIP2_FAST_BACKEND)")
    cap.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    cap.add_argument("--dtype", default=None, help="float32, float16, bfloat16 or auto (the checkpoint's; "
                                                   "default: bfloat16 on a GPU, float32 on a CPU)")
    sub.add_parser("build-ext", help="build the C++/CUDA extension now (it is otherwise built on first use)",
                   description="Build the C++/CUDA extension now, showing the compiler's output.")
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


_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm")


def _expand(names: list[str]) -> list[str]:
    """Files, directories (their image files, sorted) and globs -> image paths, in order."""
    import glob
    from pathlib import Path

    out = []
    for name in names:
        p = Path(name)
        if p.is_dir():
            found = sorted(str(f) for f in p.iterdir() if f.suffix.lower() in _IMAGE_SUFFIXES and f.is_file())
            if not found:
                raise ValueError(f"directory {name} holds no image files ({', '.join(_IMAGE_SUFFIXES)})")
            out += found
        elif not p.exists() and glob.has_magic(name):
            found = sorted(f for f in glob.glob(name) if Path(f).is_file())
            if not found:
                raise ValueError(f"{name!r} matches no files")
            out += found
        else:
            out.append(name)  # open_image names it if it is missing or unreadable
    return out


class _Bar:
    """A one-line progress bar on stderr, only when stderr is a terminal."""

    def __init__(self, total: int):
        import time

        self.total, self.done, self.t0 = total, 0, time.perf_counter()
        self.on = sys.stderr.isatty() and total > 1

    def update(self, n: int) -> None:
        import time

        self.done += n
        if self.on:
            rate = self.done / max(time.perf_counter() - self.t0, 1e-9)
            fill = int(30 * self.done / self.total)
            print(f"\r[{'#' * fill}{' ' * (30 - fill)}] {self.done}/{self.total} images, {rate:.1f}/s", end="",
                  file=sys.stderr, flush=True)
            if self.done >= self.total:
                print(file=sys.stderr, flush=True)


def _caption(args) -> int:
    import json
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
    try:
        files = _expand(args.images)
    except ValueError as e:
        _error(e)
        return 2
    gen = {"max_new_tokens": args.max_new_tokens, "num_beams": args.num_beams}
    if args.do_sample:
        gen["do_sample"] = True
        gen.update({k: v for k, v in (("temperature", args.temperature), ("top_p", args.top_p), ("seed", args.seed))
                    if v is not None})
    elif args.temperature is not None or args.top_p is not None:
        _error(ValueError("--temperature and --top-p apply to sampling: add --do-sample"))
        return 2
    B = args.batch_size

    def open_batch(names):
        try:
            return [_images.open_image(f) for f in names]  # messages name the image
        except (OSError, ValueError, TypeError) as e:
            _error(e)
            return None

    first = open_batch(files[:B])  # a bad first image fails before the model loads
    if first is None:
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
    bar = _Bar(len(files))
    for at in range(0, len(files), B):
        names = files[at: at + B]
        imgs = first if at == 0 else open_batch(names)
        if imgs is None:
            return 2
        if "seed" in gen:
            gen["seed"] = (args.seed + at) % 2**64  # each batch its own draws, reproducible from --seed
        texts = model.caption(imgs, prompt=args.prompt, **gen)
        for f, t in zip(names, texts):
            print(json.dumps({"image": f, "caption": t}) if args.json else f"{f}\t{t}", flush=True)
        bar.update(len(names))
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
