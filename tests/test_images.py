"""blip2_fast.images: the pixel limit against decompression bombs, and what caption() / answer() accept."""
import io
import os
import struct
import subprocess
import sys
import warnings
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from blip2_fast import images
from blip2_fast.images import check_image, open_image, to_rgb_images


def png_claiming(width: int, height: int) -> bytes:
    """A tiny valid PNG header declaring width x height 1-bit pixels (a decompression bomb's shape:
    a few hundred bytes that would decode to gigabytes)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1-bit greyscale
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def _rand_rgb(h=13, w=17, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _png(a) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


# ---- the pixel limit -------------------------------------------------------------------------------

def test_default_limit_is_documented_and_pils_threshold():
    assert images.MAX_IMAGE_PIXELS == 89_478_485 and "MAX_IMAGE_PIXELS" in images.__doc__


def test_bomb_over_pils_hard_limit_is_a_value_error(tmp_path):
    f = tmp_path / "bomb.png"
    f.write_bytes(png_claiming(100_000, 100_000))  # 10^10 pixels in ~100 bytes: PIL itself refuses
    with pytest.raises(ValueError, match=r"bomb\.png.*decompression bomb"):
        open_image(f)
    with pytest.raises(ValueError, match="decompression bomb"):
        open_image(f.read_bytes())


def test_bomb_between_pils_warning_and_error_is_refused_before_decoding(tmp_path):
    f = tmp_path / "big.png"
    f.write_bytes(png_claiming(10_000, 10_000))  # 10^8: PIL only warns; over blip2_fast's default
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with pytest.raises(ValueError, match=r"big\.png.*10000x10000 = 100000000 pixels, over the limit of 89478485"):
            open_image(f)


def test_limit_per_call_and_module_default_read_at_call_time(monkeypatch, tmp_path):
    a = _rand_rgb(10, 11)
    f = tmp_path / "x.png"
    f.write_bytes(_png(a))
    with pytest.raises(ValueError, match="110 pixels, over the limit of 109"):
        open_image(f, max_pixels=109)
    assert np.array_equal(np.asarray(open_image(f, max_pixels=110)), a)
    monkeypatch.setattr(images, "MAX_IMAGE_PIXELS", 100)
    for im in (f, Image.fromarray(a), a, torch.from_numpy(a).permute(2, 0, 1)):
        with pytest.raises(ValueError, match="over the limit of 100"):
            to_rgb_images(im)
    monkeypatch.setattr(images, "MAX_IMAGE_PIXELS", None)  # off
    assert len(to_rgb_images([f, a])) == 2
    with pytest.raises(ValueError, match="max_pixels"):
        to_rgb_images(a, max_pixels=0)


def test_check_image_refuses_from_the_header_before_decoding():
    im = Image.open(io.BytesIO(_png(_rand_rgb(40, 50))))  # lazily opened: nothing decoded yet
    decoded = []
    im.load = lambda: decoded.append(1)  # every decode goes through load()
    with pytest.raises(ValueError, match="2000 pixels, over the limit of 1999"):
        check_image(im, max_pixels=1999)
    check_image(im, max_pixels=2000)
    assert not decoded, "check_image decoded the pixels"
    with pytest.raises(ValueError, match="mode 'F'"):
        check_image(Image.new("F", (4, 4)))
    with pytest.raises(ValueError, match="0x4 pixels"):
        check_image(Image.new("RGB", (0, 4)))
    with pytest.raises(TypeError, match="PIL image"):
        check_image(np.zeros((4, 4, 3), np.uint8))


# ---- opening files -----------------------------------------------------------------------------------

def test_open_image_errors_name_the_image(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.png"):
        open_image(tmp_path / "nope.png")
    with pytest.raises(ValueError, match=r"d\.png.*is a directory"):
        (tmp_path / "d.png").mkdir()
        open_image(tmp_path / "d.png")
    (tmp_path / "junk.png").write_bytes(b"not an image at all")
    with pytest.raises(ValueError, match=r"cannot read image .*junk\.png"):
        open_image(tmp_path / "junk.png")
    good = _png(_rand_rgb(64, 64))
    (tmp_path / "cut.png").write_bytes(good[: len(good) // 2])
    with pytest.raises(ValueError, match=r"cut\.png"):
        open_image(tmp_path / "cut.png")
    with pytest.raises(TypeError, match="path or the file's bytes"):
        open_image(12)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs (POSIX)")
def test_fifo_image_path_is_refused_without_hanging(tmp_path):
    os.mkfifo(tmp_path / "pipe.png")
    code = ("from blip2_fast.images import open_image\n"
            f"try:\n    open_image({str(tmp_path / 'pipe.png')!r})\nexcept ValueError as e:\n    print(e)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "FIFO" in r.stdout and "not a regular file" in r.stdout, (r.stdout, r.stderr[-2000:])


# ---- what caption() / answer() accept ----------------------------------------------------------------

def test_every_accepted_input_gives_the_same_rgb_image(tmp_path):
    a = _rand_rgb(13, 17)
    f = tmp_path / "x.png"
    f.write_bytes(_png(a))
    t = torch.from_numpy(a).permute(2, 0, 1)  # (3, H, W)
    inputs = [Image.fromarray(a), Image.fromarray(a).convert("RGBA"), str(f), f, f.read_bytes(), a,
              a.astype(np.float32) / 255, t, t.float() / 255, t.double() / 255]
    out = to_rgb_images(inputs)
    assert len(out) == len(inputs)
    for i, im in enumerate(out):
        assert im.mode == "RGB" and im.size == (17, 13), i
        assert np.array_equal(np.asarray(im), a), f"input {i} ({type(inputs[i]).__name__}) changed the pixels"


def test_single_items_batches_and_grey():
    a = _rand_rgb(5, 6)
    assert to_rgb_images(torch.from_numpy(a).permute(2, 0, 1).to(torch.bfloat16) / 255)[0].size == (6, 5)
    assert len(to_rgb_images(a)) == 1 and len(to_rgb_images(torch.from_numpy(a).permute(2, 0, 1))) == 1
    batch = np.stack([a, a[::-1].copy()])  # (2, H, W, 3)
    out = to_rgb_images(batch)
    assert [np.array_equal(np.asarray(o), b) for o, b in zip(out, batch)] == [True, True]
    out = to_rgb_images(torch.from_numpy(batch).permute(0, 3, 1, 2))  # (2, 3, H, W)
    assert [np.array_equal(np.asarray(o), b) for o, b in zip(out, batch)] == [True, True]
    grey = a[:, :, 0]
    for g in (grey, grey[:, :, None], torch.from_numpy(grey), torch.from_numpy(grey)[None]):
        im = to_rgb_images(g)[0]
        assert np.array_equal(np.asarray(im), np.repeat(grey[:, :, None], 3, 2))


@pytest.mark.parametrize("bad,exc,match", [
    ([], ValueError, "no images"),
    ({"a": 1}, TypeError, "dict"),
    ([Image.new("RGB", (4, 4)), 3], TypeError, "image 1 is a int"),
    (np.zeros((4, 4, 3), np.int32), ValueError, "dtype int32"),
    (np.zeros((4, 4, 2), np.uint8), ValueError, "C = 1, 3 or 4"),
    (torch.zeros(2, 4, 4), ValueError, "C = 1, 3 or 4"),
    (np.full((4, 4, 3), 1.5, np.float32), ValueError, r"outside \[0, 1\]"),
    (torch.full((3, 4, 4), float("nan")), ValueError, "NaN"),
    (np.zeros((1, 1, 4, 4, 3), np.uint8), ValueError, "shape"),
    (torch.zeros(3, 4, 4, dtype=torch.bool), ValueError, "dtype bool"),
    (torch.zeros(3, 4, 4, device="meta"), ValueError, "meta"),
    (np.zeros((0, 4, 3), np.uint8), ValueError, "empty"),
    (Image.new("I;16", (4, 4)), ValueError, "mode 'I;16'"),
], ids=["empty", "dict", "int-in-list", "int32", "two-channels", "tensor-two-channels", "float-range", "nan",
        "5d", "bool", "meta", "zero-height", "16-bit"])
def test_refused_inputs_name_the_problem(bad, exc, match):
    with pytest.raises(exc, match=match):
        to_rgb_images(bad)
