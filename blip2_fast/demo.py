"""`python -m blip2_fast demo`: caption a bundled image with a small random-weight BLIP-2.

No hub is reachable on our machines, so the demo builds (once, seeded, cached) a small BLIP-2
checkpoint with transformers plus a real tokenizer and processor built locally, then
captions the bundled sample image with both backends and prints the timings. Random weights give
meaningless text: the demo shows the runtime working, not a model's quality.
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path


_CORPUS = [
    "a photo of a house on a green hill under a blue sky",
    "a yellow sun above a small brown house with a door",
    "two cats laying on a couch next to a remote control",
    "a man riding a bicycle down a street in the city",
    "a bowl of fruit on a wooden table near a window",
    "Question: what is in the picture? Answer: a house",
]


def cache_dir() -> Path:
    return Path(os.environ.get("BLIP2_FAST_CACHE", Path.home() / ".cache" / "blip2_fast"))


def sample_image():
    from PIL import Image

    return Image.open(Path(__file__).parent / "data" / "sample.png").convert("RGB")


def demo_tokenizer():
    """A word-level tokenizer over a small corpus, built locally (random weights then emit
    meaningless words): <pad> 0, </s> 1, <s> 2, <unk> 3, the words, then <image>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = sorted({w for line in _CORPUS for w in line.replace("?", " ?").replace(":", " :").split()})
    vocab = {t: i for i, t in enumerate(["<pad>", "</s>", "<s>", "<unk>"] + words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")
    fast.add_special_tokens({"additional_special_tokens": ["<image>"]})
    return fast


def build_processor_checkpoint(path: Path, lm: str = "opt", *, image_size: int = 42, num_query: int = 5,
                               seed: int = 0, **cfg_kw) -> Path:
    """A random-weight BLIP-2 checkpoint with `demo_tokenizer()` and a Blip2Processor saved beside
    it (written to a temporary name, then renamed: a half-built one is never picked up). cfg_kw:
    `blip2_fast.testing.tiny_config`'s sizes."""
    import json

    from transformers import Blip2Processor

    try:  # transformers >= 5: the PIL-backed processor needs no torchvision
        from transformers import BlipImageProcessorPil as BlipImageProcessor
    except ImportError:
        from transformers import BlipImageProcessor

    from .testing import build_checkpoint

    fast = demo_tokenizer()
    image_token = fast.convert_tokens_to_ids("<image>")
    tmp = path.with_name(path.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    build_checkpoint(tmp, lm, seed=seed, image_size=image_size, num_query=num_query, vocab=len(fast),
                     image_token=False, **cfg_kw)
    cfg = json.loads((tmp / "config.json").read_text())
    cfg["image_token_index"] = image_token
    ids = {"eos_token_id": fast.eos_token_id, "pad_token_id": fast.pad_token_id}
    if lm == "opt":
        ids["bos_token_id"] = fast.bos_token_id
    else:
        ids["decoder_start_token_id"] = fast.pad_token_id  # T5 starts the decoder with its pad id
    cfg["text_config"].update(ids)
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
    (tmp / "generation_config.json").write_text(json.dumps(ids))
    proc = Blip2Processor(image_processor=BlipImageProcessor(size={"height": image_size, "width": image_size}),
                          tokenizer=fast, num_query_tokens=num_query)
    proc.save_pretrained(str(tmp))
    tmp.rename(path)
    return path


def build_demo_checkpoint(path: Path) -> Path:
    """A 224-px BLIP-2 (OPT) with random weights, a word-level tokenizer built locally and a processor."""
    return build_processor_checkpoint(path, "opt", image_size=224, num_query=32, vision_hidden=256, vision_heads=4,
                                      vision_layers=4, patch=14, q_hidden=128, q_heads=4, q_layers=2, lm_hidden=256,
                                      lm_heads=4, lm_layers=4)


def demo_checkpoint() -> Path:
    path = cache_dir() / "demo-blip2-opt-v2"
    if not (path / "config.json").exists():
        print(f"building the demo checkpoint in {path} (once) ...", file=sys.stderr)
        build_demo_checkpoint(path)
    return path


def main(argv=None) -> int:
    from .loader import load

    path = demo_checkpoint()
    image = sample_image()
    print("blip2_fast demo: a small BLIP-2 with RANDOM weights, so the captions are meaningless text;")
    print("it shows the runtime (load, vision encoder, Q-Former, paged-KV generation) working end to end.\n")
    print(f"checkpoint: {path}\nimage: bundled sample.png (224x224)\n")
    from . import _ext

    for backend in ("reference", "fast"):
        t0 = time.perf_counter()
        built0 = _ext.build_seconds
        import warnings

        with warnings.catch_warnings():  # the fallbacks are summarised below instead
            warnings.simplefilter("ignore", RuntimeWarning)
            model = load(path, backend=backend, progress=False)
        t_build = _ext.build_seconds - built0  # a first fast load compiles the C++ extension (once per machine)
        t_load = time.perf_counter() - t0 - t_build
        model.caption(image, max_new_tokens=4)  # warm-up
        t0 = time.perf_counter()
        text = model.caption(image, max_new_tokens=20, min_new_tokens=20)[0]
        t_gen = time.perf_counter() - t0
        fell_back = sorted(k for k, v in model.impls.items() if v == "reference") if backend == "fast" else []
        print(f"[{backend:9s}] load {t_load*1e3:6.0f} ms   caption (20 tokens) {t_gen*1e3:6.0f} ms   -> {text!r}")
        if t_build > 0:
            print(f"            (before that load: the C++ extension was built, once, in {t_build:.1f} s)")
        if fell_back:
            print(f"            (on {model.device.type}, ops without a usable fast kernel ran their reference: {', '.join(fell_back)})")
    return 0
