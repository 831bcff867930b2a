"""Images from users: a pixel limit against decompression bombs, and what caption() / answer() accept.

A 50 KB PNG can declare 50000 x 50000 pixels and decode to 7.5 GB. Every image blip2_fast opens or
is handed is checked against a pixel limit (width x height) before it is decoded:

    blip2_fast.images.MAX_IMAGE_PIXELS = 89_478_485   # the default; None turns the limit off

The default is PIL's own warning threshold (`PIL.Image.MAX_IMAGE_PIXELS`, about 256 MiB as RGB),
but refused outright rather than warned about: BLIP-2 resizes every image to 224 or 364 pixels a
side, so nothing larger is needed. Functions take `max_pixels=` to override it per call; the
module-level value is read at each call, so setting it changes caption() / answer() too.
PIL's own limit (2x its threshold) still applies on top: raise `PIL.Image.MAX_IMAGE_PIXELS` as well
to open larger images.
"""
from __future__ import annotations

import io
import os
from typing import Literal

from .files import open_regular

MAX_IMAGE_PIXELS: int | None = 89_478_485

# 8-bit modes PIL converts to RGB faithfully; 16-bit / float modes would be clipped or rescaled silently
_MODES = ("RGB", "RGBA", "L", "LA", "P", "PA", "CMYK", "YCbCr", "1", "RGBX", "La", "RGBa")

Limit = int | None | Literal["default"]


def _limit(max_pixels: Limit) -> int | None:
    lim = MAX_IMAGE_PIXELS if max_pixels == "default" else max_pixels
    if lim is not None and (isinstance(lim, bool) or not isinstance(lim, int) or lim < 1):
        raise ValueError(f"max_pixels must be a positive int or None (no limit), got {lim!r}")
    return lim


def _check_size(name: str, width: int, height: int, lim: int | None) -> None:
    if width < 1 or height < 1:
        raise ValueError(f"{name} is {width}x{height} pixels: empty")
    if lim is not None and width * height > lim:
        raise ValueError(f"{name} is {width}x{height} = {width * height} pixels, over the limit of {lim} "
                         "(a decompression bomb, or a far larger image than BLIP-2 needs); raise "
                         "blip2_fast.images.MAX_IMAGE_PIXELS or pass max_pixels= to allow it")


def open_image(source, *, max_pixels: Limit = "default", name: str | None = None):
    """Decode an image file (a path, or its bytes) into an RGB PIL image, refusing it before decoding
    when it has more than `max_pixels` pixels (default `MAX_IMAGE_PIXELS`; None: no limit).

    Raises ValueError naming the image for a decompression bomb, a corrupt or unreadable image, or a
    path that is not a regular file (a directory or FIFO); FileNotFoundError for a missing path;
    TypeError for a source that is neither a path nor bytes.
    """
    from PIL import Image

    lim = _limit(max_pixels)
    if isinstance(source, (str, os.PathLike)):
        name = name or f"image {os.fspath(source)!r}"
        if not os.path.lexists(source):
            raise FileNotFoundError(f"{name} does not exist")
        f = open_regular(source, "image file", ValueError)
    elif isinstance(source, (bytes, bytearray, memoryview)):
        name = name or f"image ({len(source)} bytes)"
        f = io.BytesIO(bytes(source))
    else:
        raise TypeError(f"open_image takes a path or the file's bytes, got {type(source).__name__}")
    with f:
        try:
            im = Image.open(f)  # reads the header only: the size is known before anything is decoded
        except Image.DecompressionBombError as e:  # over 2x PIL's own limit
            raise ValueError(f"{name} was refused by PIL as a decompression bomb ({e}); raise "
                             "PIL.Image.MAX_IMAGE_PIXELS as well to open it") from None
        except Exception as e:  # PIL raises many kinds for files it cannot identify
            raise ValueError(f"cannot read {name}: {type(e).__name__}: {e}") from None
        with im:
            _check_size(name, *im.size, lim)
            try:
                return _to_rgb(im, name)
            except ValueError:
                raise
            except Exception as e:  # truncated or corrupt data, found while decoding
                raise ValueError(f"cannot decode {name}: {type(e).__name__}: {e}") from None


def check_image(im, *, max_pixels: Limit = "default", name: str = "image") -> None:
    """Refuse an already-opened PIL image that is over `max_pixels` (default `MAX_IMAGE_PIXELS`),
    empty, or in a mode that does not convert to 8-bit RGB faithfully. A lazily opened image is
    checked from its header, before its pixels are decoded."""
    from PIL import Image

    if not isinstance(im, Image.Image):
        raise TypeError(f"{name} is a {type(im).__name__}, expected a PIL image")
    _check_size(name, *im.size, _limit(max_pixels))
    if im.mode not in _MODES:
        raise ValueError(f"{name} has mode {im.mode!r}; expected an 8-bit image (RGB, RGBA, L, P, CMYK, ...): "
                         "convert high-bit-depth or float images to 8-bit RGB first")


def _to_rgb(im, name):
    check_image(im, max_pixels=None, name=name)
    return im.convert("RGB")  # a new, fully decoded image: nothing keeps the file open


def to_rgb_images(images, *, max_pixels: Limit = "default") -> list:
    """What a user passes as images to caption() / answer(), as a list of RGB PIL images.

    Accepted, alone or in a list / tuple: PIL images; paths (str or os.PathLike) and encoded image
    bytes, decoded with `open_image`; numpy arrays [H, W], [H, W, C] or a batch [N, H, W, C]; torch
    tensors [H, W], [C, H, W] or a batch [N, C, H, W] (C = 1, 3 or 4). Arrays and tensors are uint8
    (0-255) or floating point in [0, 1] (torchvision's convention). Every image is checked against
    `max_pixels` (default `MAX_IMAGE_PIXELS`). Anything else is a TypeError or ValueError naming
    the image by its position.
    """
    import numpy as np
    import torch
    from PIL import Image

    if isinstance(images, (Image.Image, str, os.PathLike, bytes, bytearray, memoryview)):
        images = [images]
    elif isinstance(images, (np.ndarray, torch.Tensor)):
        images = list(images) if images.ndim == 4 else [images]
    elif isinstance(images, (list, tuple)):
        images = list(images)
    else:
        raise TypeError(f"images must be a PIL image, a path, an array, a tensor or a list of them, "
                        f"got {type(images).__name__}")
    if not images:
        raise ValueError("no images given")
    lim = _limit(max_pixels)
    out = []
    for i, im in enumerate(images):
        name = f"image {i}"
        if isinstance(im, Image.Image):
            check_image(im, max_pixels=lim, name=name)
            try:
                out.append(im.convert("RGB"))
            except Exception as e:  # a lazily opened image whose data is corrupt
                raise ValueError(f"cannot decode {name}: {type(e).__name__}: {e}") from None
        elif isinstance(im, (str, os.PathLike, bytes, bytearray, memoryview)):
            out.append(open_image(im, max_pixels=lim, name=f"{name} ({os.fspath(im)!r})" if not isinstance(
                im, (bytes, bytearray, memoryview)) else name))
        elif isinstance(im, np.ndarray):
            out.append(_from_array(im, lim, name, channels_last=True))
        elif isinstance(im, torch.Tensor):
            if im.is_meta:
                raise ValueError(f"{name} is a meta tensor: it has no pixels")
            t = im.detach().cpu()
            out.append(_from_array((t.float() if t.dtype == torch.bfloat16 else t).numpy(), lim, name,
                                   channels_last=False))  # numpy has no bfloat16
        else:
            raise TypeError(f"{name} is a {type(im).__name__}; expected a PIL image, a path, encoded bytes, "
                            "a numpy array or a torch tensor")
    return out


def _from_array(a, lim, name, *, channels_last: bool):
    import numpy as np
    from PIL import Image

    layout = "[H, W, C]" if channels_last else "[C, H, W]"
    if a.ndim == 3:
        c = a.shape[2] if channels_last else a.shape[0]
        if c not in (1, 3, 4):
            raise ValueError(f"{name} has shape {list(a.shape)}: expected {layout} with C = 1, 3 or 4")
        if not channels_last:
            a = a.transpose(1, 2, 0)  # (H, W, C)
        if c == 1:
            a = a[:, :, 0]
    elif a.ndim != 2:
        raise ValueError(f"{name} has shape {list(a.shape)}: expected [H, W] or {layout}")
    _check_size(name, a.shape[1], a.shape[0], lim)
    if a.dtype == np.uint8:
        pass
    elif a.dtype.kind == "f":
        if not np.isfinite(a).all() or a.min() < 0 or a.max() > 1:
            raise ValueError(f"{name} is a {a.dtype} array with values outside [0, 1] (or NaN): floating-point "
                             "images are read as 0..1; pass uint8 for 0..255")
        a = np.round(a.astype(np.float64) * 255).astype(np.uint8)
    else:
        raise ValueError(f"{name} has dtype {a.dtype}; expected uint8 (0..255) or floating point in [0, 1]")
    return Image.fromarray(np.ascontiguousarray(a)).convert("RGB")
