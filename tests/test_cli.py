"""caption / answer with the checkpoint's processor, the command line, and the demo."""
import json
import subprocess
import sys

import pytest
import torch
from PIL import Image

import blip2_fast
from blip2_fast.demo import build_demo_checkpoint, sample_image


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    return build_demo_checkpoint(tmp_path_factory.mktemp("demo") / "ckpt")


def test_caption_and_answer(demo_dir):
    m = blip2_fast.load(demo_dir, backend="reference")
    img = sample_image()
    caps = m.caption([img, img.resize((100, 60))], max_new_tokens=5)
    assert len(caps) == 2 and all(isinstance(c, str) for c in caps)
    # the processor's prompt path: same tokens as a manual generate with the processor's ids
    from transformers import Blip2Processor

    proc = Blip2Processor.from_pretrained(str(demo_dir))
    enc = proc(images=[img], text=["a photo of"], return_tensors="pt")
    ids = m.generate(enc["pixel_values"], input_ids=enc["input_ids"], max_new_tokens=5)
    want = proc.tokenizer.decode(ids[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip()
    assert m.caption(img, prompt="a photo of", max_new_tokens=5) == [want]
    ans = m.answer([img], ["what is this?"], max_new_tokens=4)
    assert len(ans) == 1
    # one question is asked of every image (the README's `model.answer(pil_images, ["what is shown?"])`)
    two = m.answer([img, img.resize((100, 60))], ["what is this?"], max_new_tokens=4)
    assert two == m.answer([img, img.resize((100, 60))], ["what is this?"] * 2, max_new_tokens=4)
    assert two == m.answer([img, img.resize((100, 60))], "what is this?", max_new_tokens=4)
    with pytest.raises(ValueError, match="questions"):
        m.answer([img, img, img], ["one question", "two"])
    with pytest.raises(TypeError, match="PIL image, a path"):
        m.caption({"image": img})
    with pytest.raises(ValueError, match="C = 1, 3 or 4"):
        m.caption(torch.zeros(2, 8, 8))
    with pytest.raises(ValueError, match="mode 'F'"):
        m.caption(Image.new("F", (32, 32)))


def test_caption_takes_paths_arrays_and_tensors(demo_dir, tmp_path, monkeypatch):
    """The same image as a PIL image, a str path, a Path, an HWC uint8 array and a CHW tensor gives
    the same caption (issue 14's inputs), and the pixel limit applies to caption() too."""
    import numpy as np

    from blip2_fast import images

    m = blip2_fast.load(demo_dir, backend="reference")
    img = sample_image()
    f = tmp_path / "x.png"
    img.save(f)
    a = np.asarray(img.convert("RGB"))
    inputs = [img, str(f), f, a, torch.from_numpy(a.copy()).permute(2, 0, 1)]
    caps = m.caption(inputs, max_new_tokens=4)
    assert caps == m.caption([img] * len(inputs), max_new_tokens=4) and len(set(caps)) == 1
    monkeypatch.setattr(images, "MAX_IMAGE_PIXELS", img.width * img.height - 1)
    with pytest.raises(ValueError, match="over the limit"):
        m.caption(f)
    with pytest.raises(ValueError, match="over the limit"):
        m.answer([img], ["what is this?"])


def test_engine_accepts_pil_and_text(demo_dir):
    m = blip2_fast.load(demo_dir, backend="reference")
    eng = blip2_fast.Engine(m, num_blocks=64, tokenizer=None)
    eng.add_request("a", image=sample_image(), prompt="a photo of", sampling=blip2_fast.SamplingParams(max_new_tokens=3))
    out = eng.run()["a"]
    assert out.finished and 1 <= len(out.token_ids) <= 3


def test_cli_caption(demo_dir, tmp_path):
    img = tmp_path / "x.png"
    sample_image().save(img)
    r = subprocess.run([sys.executable, "-m", "blip2_fast", "caption", str(img), "--model", str(demo_dir),
                        "--max-new-tokens", "4", "--backend", "reference"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(str(img) + "\t")
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    r = subprocess.run([sys.executable, "-m", "blip2_fast", "caption", str(bad), "--model", str(demo_dir)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "cannot read image" in r.stderr


def _cli(*args, timeout=300):
    env = dict(__import__("os").environ)
    env.pop("TRITON_INTERPRET", None)  # as a user runs it
    return subprocess.run([sys.executable, "-m", "blip2_fast", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=env)


def _one_line_error(r, code):
    lines = r.stderr.strip().splitlines()
    assert r.returncode == code and len(lines) == 1 and lines[0].startswith("error: "), (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr
    return lines[0]


def test_cli_user_errors_are_one_line(demo_dir, tmp_path):
    """Every user error: one line on stderr, a non-zero exit, no traceback (in a subprocess, as run)."""
    from test_images import png_claiming

    good = tmp_path / "x.png"
    sample_image().save(good)
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_claiming(100_000, 100_000))
    line = _one_line_error(_cli("caption", bomb, "--model", demo_dir), 2)
    assert "bomb.png" in line and "over the limit of 89478485" in line
    line = _one_line_error(_cli("caption", tmp_path / "missing.png", "--model", demo_dir), 2)
    assert "missing.png" in line and "does not exist" in line
    line = _one_line_error(_cli("caption", good, "--model", demo_dir, "--max-image-pixels", 100), 2)
    assert "over the limit of 100" in line
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in demo_dir.iterdir():
        (broken / f.name).symlink_to(f)
    (broken / "config.json").unlink()
    cfg = json.loads((demo_dir / "config.json").read_text())
    cfg["vision_config"]["layer_norm_eps"] = float("nan")
    (broken / "config.json").write_text(json.dumps(cfg))
    line = _one_line_error(_cli("caption", good, "--model", broken, "--backend", "reference"), 1)
    assert "layer_norm_eps" in line and "config.json" in line


def _fifo_checkpoint(demo_dir, tmp_path):
    """The demo checkpoint (linked file by file) with one tokenizer file replaced by a FIFO that no
    writer ever opens: transformers reads the processor's files unchecked and would block on it."""
    import os

    d = tmp_path / "fifo-ckpt"
    d.mkdir()
    for f in demo_dir.iterdir():
        (d / f.name).symlink_to(f)
    tok = next(f.name for f in demo_dir.iterdir() if f.name.startswith("tokenizer"))
    (d / tok).unlink()
    os.mkfifo(d / tok)
    return d, tok


@pytest.mark.skipif(not hasattr(__import__("os"), "mkfifo"), reason="needs FIFOs (POSIX)")
def test_cli_fifo_in_the_checkpoint_is_one_line_not_a_hang(demo_dir, tmp_path):
    good = tmp_path / "x.png"
    sample_image().save(good)
    d, tok = _fifo_checkpoint(demo_dir, tmp_path)
    line = _one_line_error(_cli("caption", good, "--model", d, timeout=120), 1)
    assert tok in line and "FIFO" in line


@pytest.mark.parametrize("flags,match", [
    (["--max-new-tokens", "2.5"], "--max-new-tokens"), (["--num-beams", "0"], "--num-beams"),
    (["--max-image-pixels", "-3"], "--max-image-pixels"), (["--frobnicate"], "unrecognized"),
    (["--backend", "turbo"], "--backend"), ([], "--model"),
])
def test_cli_bad_flags_are_one_line(flags, match, capsys):
    from blip2_fast.__main__ import main

    with pytest.raises(SystemExit) as e:
        main(["caption", "x.png", *(["--model", "m"] if flags != [] else []), *flags])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and err[0].startswith("error: ") and match in err[0], err


def test_cli_bad_device_and_dtype_are_one_line(demo_dir, tmp_path, capsys):
    from blip2_fast.__main__ import main

    good = tmp_path / "x.png"
    sample_image().save(good)
    for flags, match in ((["--device", "gpu"], "device 'gpu'"), (["--dtype", "int8"], "dtype")):
        assert main(["caption", str(good), "--model", str(demo_dir), *flags]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and match in err[0], err


def test_cli_max_image_pixels_raises_the_limit_too(demo_dir, tmp_path, monkeypatch, capsys):
    """A limit above the default lets a larger image through, in caption() as well."""
    from blip2_fast import images
    from blip2_fast.__main__ import main

    monkeypatch.setattr(images, "MAX_IMAGE_PIXELS", images.MAX_IMAGE_PIXELS)  # main() sets it for its process
    img = tmp_path / "x.png"
    sample_image().save(img)
    n = sample_image().width * sample_image().height
    monkeypatch.setattr(images, "MAX_IMAGE_PIXELS", n - 1)  # as if the default were lower than this image
    args = ["caption", str(img), "--model", str(demo_dir), "--backend", "reference", "--max-new-tokens", "2"]
    assert main(args + ["--max-image-pixels", str(n)]) == 0, capsys.readouterr().err
    assert main(args + ["--max-image-pixels", str(n - 1)]) == 2
    assert "over the limit" in capsys.readouterr().err


def test_demo_runs(tmp_path):
    env = dict(__import__("os").environ, BLIP2_FAST_CACHE=str(tmp_path))
    env.pop("TRITON_INTERPRET", None)  # the demo as a user runs it: fast ops fall back on a CPU
    r = subprocess.run([sys.executable, "-m", "blip2_fast", "demo"], capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "RANDOM weights" in r.stdout and "[reference]" in r.stdout and "[fast" in r.stdout


def test_engine_text_is_decoded_on_access_only(demo_dir):
    """RequestOutput.text: the tokenizer's decoding of token_ids, computed when read, never per step."""
    from transformers import Blip2Processor

    tok = Blip2Processor.from_pretrained(str(demo_dir)).tokenizer
    calls = []

    class Counting:
        def decode(self, ids, **kw):
            calls.append(list(ids))
            return tok.decode(ids, **kw)

        def __call__(self, text):
            return tok(text)

    m = blip2_fast.load(demo_dir, backend="reference")
    eng = blip2_fast.Engine(m, num_blocks=64, tokenizer=Counting())
    eng.add_request("a", image=sample_image(), prompt="a photo of", sampling=blip2_fast.SamplingParams(max_new_tokens=6, min_new_tokens=6))
    outs = []
    while eng.has_unfinished():
        outs += eng.step()
    assert len(outs) >= 6 and not calls  # six steps, nothing decoded yet
    last = outs[-1]
    assert last.finished and last.text == tok.decode(last.token_ids, skip_special_tokens=True)
    assert last.text == last.text and len(calls) == 1  # decoded once, then cached
    assert outs[2].text == tok.decode(outs[2].token_ids, skip_special_tokens=True)
    assert blip2_fast.Engine(m, num_blocks=64).tokenizer is None


def test_request_output_copies_carry_text_not_the_tokenizer():
    import copy
    import dataclasses
    import json
    import pickle

    from blip2_fast.engine.engine import RequestOutput

    class Tok:
        calls = 0

        def decode(self, ids, **kw):
            Tok.calls += 1
            return " ".join(map(str, ids))

    out = RequestOutput._decoded_later(Tok(), "a", [1, 2], [2], False, None, None, None)
    assert Tok.calls == 0
    for c in (pickle.loads(pickle.dumps(out)), copy.deepcopy(out)):
        assert c.text == "1 2" and "_tokenizer" not in c.__dict__
    assert Tok.calls == 1  # decoded once, for the first copy
    assert json.loads(json.dumps(dataclasses.asdict(out)))["text"] == "1 2"
    assert RequestOutput("b", [3], [3], True, "stop", "given", None).text == "given"  # constructor unchanged
    assert RequestOutput("b", [3], [3], True).text is None


@pytest.mark.skipif(not hasattr(__import__("os"), "mkfifo"), reason="needs FIFOs (POSIX)")
def test_library_processor_load_refuses_a_fifo_without_hanging(demo_dir, tmp_path):
    """The library's own processor loading (caption() after a load, the server) checks the directory
    as the CLI does: a FIFO named like a tokenizer file is a CheckpointError, not a hang."""
    import subprocess
    import sys

    d, tok = _fifo_checkpoint(demo_dir, tmp_path)
    code = ("import blip2_fast\nfrom blip2_fast.demo import sample_image\n"
            f"m = blip2_fast.load({str(d)!r}, backend='reference')\n"
            "try:\n    m.caption(sample_image(), max_new_tokens=2)\n"
            "except Exception as e:\n    print(type(e).__name__, e)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.startswith("CheckpointError") and tok in r.stdout and "FIFO" in r.stdout, r.stdout


def test_engine_image_requests_apply_the_pixel_limit(demo_dir, monkeypatch):
    """Engine.add_request(image=...) refuses an image over the pixel limit (from its header, before
    decoding) and one not in an 8-bit mode, as caption() does."""
    from PIL import Image

    from blip2_fast import images
    from blip2_fast.engine import Engine

    m = blip2_fast.load(demo_dir, backend="reference")
    eng = Engine(m, max_num_seqs=2)
    monkeypatch.setattr(images, "MAX_IMAGE_PIXELS", 100 * 100)
    with pytest.raises(ValueError, match="pixel"):
        eng.add_request("big", image=Image.new("RGB", (101, 100)), prompt="a photo of")
    with pytest.raises(ValueError, match="mode 'F'"):
        eng.add_request("float", image=Image.new("F", (8, 8)), prompt="a photo of")
    eng.add_request("ok", image=Image.new("RGB", (100, 100)), prompt="a photo of")  # at the limit: admitted
    assert not eng.stats().num_running and eng.has_unfinished()


def test_cli_help_version_and_flags_have_help(capsys):
    from blip2_fast import __version__
    from blip2_fast.__main__ import main

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"blip2_fast {__version__}"
    for argv in (["--help"], ["caption", "--help"]):
        with pytest.raises(SystemExit):
            main(argv)
        text = capsys.readouterr().out
        assert "examples:" in text and "python -m blip2_fast caption" in text
    import argparse

    from blip2_fast import __main__ as cli

    captured = {}
    real = argparse.ArgumentParser.parse_args

    def grab(self, *a, **k):
        captured["parser"] = self
        raise SystemExit(0)

    argparse.ArgumentParser.parse_args = grab
    try:
        with pytest.raises(SystemExit):
            cli.main(["caption"])
    finally:
        argparse.ArgumentParser.parse_args = real
    sub = next(a for a in captured["parser"]._actions if isinstance(a, argparse._SubParsersAction))
    for name in ("caption", "demo", "build-ext"):
        for action in sub.choices[name]._actions:
            assert action.help, f"{name} {action.option_strings or action.dest} has no help text"


def test_cli_caption_directories_globs_batches_json_sampling(demo_dir, tmp_path):
    d = tmp_path / "imgs"
    d.mkdir()
    img = sample_image()
    for i, im in enumerate([img, img.rotate(90), img.resize((80, 50))]):
        im.save(d / f"{i}.png")
    (d / "notes.txt").write_text("not an image")
    other = tmp_path / "other"
    other.mkdir()
    img.rotate(180).save(other / "a.png")
    common = ["--model", demo_dir, "--backend", "reference", "--max-new-tokens", 4]
    r = _cli("caption", d, other / "*.png", *common, "--batch-size", 2, "--json")
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert [x["image"] for x in rows] == [str(d / "0.png"), str(d / "1.png"), str(d / "2.png"), str(other / "a.png")]
    m = blip2_fast.load(demo_dir, backend="reference")
    from blip2_fast.images import open_image

    want = m.caption([open_image(x["image"]) for x in rows], max_new_tokens=4)
    assert [x["caption"] for x in rows] == want  # batching does not change a caption
    s1 = _cli("caption", d, *common, "--do-sample", "--temperature", 0.9, "--top-p", 0.8, "--seed", 3, "--batch-size", 1)
    s2 = _cli("caption", d, *common, "--do-sample", "--temperature", 0.9, "--top-p", 0.8, "--seed", 3, "--batch-size", 3)
    assert s1.returncode == 0 and s1.stdout == s2.stdout  # the seed, not the batching, decides the draws
    line = _one_line_error(_cli("caption", tmp_path / "nothing-*.png", *common), 2)
    assert "matches no files" in line
    line = _one_line_error(_cli("caption", d, *common, "--top-p", 0.5), 2)
    assert "--do-sample" in line
