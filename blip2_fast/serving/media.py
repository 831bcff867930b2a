"""Images named by a request's URL: `data:` URLs, `file://` under one allowed directory, and (only
when the operator allows it) http(s). Every path checks the byte limit before reading past it and
the pixel limit before decoding the pixels, so a small compressed file cannot expand into a huge
buffer. A server must not fetch what clients point it at by default: remote URLs are refused
unless `MediaPolicy.allow_remote_images` is set.
"""
from __future__ import annotations

import binascii
import dataclasses
import io
import warnings
from pathlib import Path
from urllib.parse import unquote, urlsplit

from .errors import APIError, bad_request

_MIME = {"image/png": "PNG", "image/jpeg": "JPEG", "image/jpg": "JPEG", "image/webp": "WEBP"}
_FORMATS = ("PNG", "JPEG", "WEBP")
# the modes model.caption / model.answer accept (8-bit images); anything else is refused as they refuse it
_MODES = ("RGB", "RGBA", "L", "LA", "P", "PA", "CMYK", "YCbCr", "1")


@dataclasses.dataclass(frozen=True)
class MediaPolicy:
    """What the server may read. max_image_bytes: the encoded file; max_image_pixels: width x height.
    allowed_local_media_path: the only directory `file://` URLs may point into (None: refused)."""

    max_image_bytes: int = 20 * 2**20
    max_image_pixels: int = 4096 * 4096
    allowed_local_media_path: Path | None = None
    allow_remote_images: bool = False
    remote_timeout_s: float = 10.0

    def __post_init__(self):
        for name in ("max_image_bytes", "max_image_pixels"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if self.allowed_local_media_path is not None:
            root = Path(self.allowed_local_media_path)
            if not root.is_dir():
                raise ValueError(f"allowed_local_media_path {root} is not a directory")
            object.__setattr__(self, "allowed_local_media_path", root.resolve())


def too_large(what: str, limit: int, unit: str) -> APIError:
    return APIError(413, f"{what} is over the server's limit of {limit} {unit}", code="too_large")


def read_source(url: str, policy: MediaPolicy, param: str) -> tuple[str, object]:
    """Check `url` without reading or decoding anything: ("base64", payload) for data: URLs,
    ("file", path), ("remote", url); raises APIError (400 refused or malformed, 413 over the byte
    limit). `read_bytes` then gets the bytes (off the event loop: it decodes and reads files)."""
    if not isinstance(url, str) or not url:
        raise bad_request("an image URL must be a non-empty string", param)
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme == "data":
        return "base64", _data_url(url, policy, param)
    if scheme == "file":
        return "file", _local_path(url, policy, param)
    if scheme in ("http", "https"):
        if not policy.allow_remote_images:
            raise bad_request("remote image URLs are refused: send the image as a data: URL, or start the server "
                              "with --allow-remote-images", param)
        return "remote", url
    raise bad_request(f"image URL scheme {scheme or '(none)'!r} is not supported: use a data: URL (base64 PNG, "
                      "JPEG or WebP) or a file:// URL under --allowed-local-media-path", param)


def _data_url(url: str, policy: MediaPolicy, param: str) -> bytes:
    head, sep, payload = url[5:].partition(",")
    if not sep:
        raise bad_request("malformed data: URL (no ',' before the data)", param)
    fields = [f.strip().lower() for f in head.split(";")]
    if "base64" not in fields[1:]:
        raise bad_request("data: URLs must be base64-encoded (data:image/png;base64,...)", param)
    if fields[0] not in _MIME:
        raise bad_request(f"data: URL media type {fields[0] or '(none)'!r} is not supported; expected one of "
                          f"{', '.join(sorted(_MIME))}", param)
    if len(payload) * 3 // 4 > policy.max_image_bytes + 3:  # checked before decoding a byte of it
        raise too_large("the image", policy.max_image_bytes, "bytes")
    return payload


def read_bytes(kind: str, src, policy: MediaPolicy, param: str) -> bytes:
    """The encoded image named by `read_source`'s answer (or ("bytes", data) already fetched)."""
    if kind == "file":
        return read_file(src, policy)
    if kind == "base64":
        try:
            # strict: only the base64 alphabet and correct padding (as b64decode(validate=True)
            # accepts), without its regular-expression pass over the whole payload first
            data = binascii.a2b_base64(src, strict_mode=True)
        except (binascii.Error, ValueError):
            raise bad_request("the data: URL's base64 payload does not decode", param) from None
        if len(data) > policy.max_image_bytes:
            raise too_large("the image", policy.max_image_bytes, "bytes")
        return data
    assert kind == "bytes", kind
    return src


def _local_path(url: str, policy: MediaPolicy, param: str) -> Path:
    root = policy.allowed_local_media_path
    if root is None:
        raise bad_request("file:// URLs are refused: the server was started without --allowed-local-media-path", param)
    parts = urlsplit(url)
    if parts.netloc not in ("", "localhost"):
        raise bad_request(f"file:// URL host {parts.netloc!r} is not supported (only file:///path)", param)
    try:
        path = Path(unquote(parts.path)).resolve(strict=True)  # symlinks resolved before the containment check
    except (OSError, RuntimeError):
        raise bad_request(f"no such file: {unquote(parts.path)}", param) from None
    if not path.is_relative_to(root) or not path.is_file():
        raise bad_request(f"file:// URLs must name a file under the allowed media directory {root}", param)
    if path.stat().st_size > policy.max_image_bytes:
        raise too_large("the image", policy.max_image_bytes, "bytes")
    return path


def read_file(path: Path, policy: MediaPolicy) -> bytes:
    with open(path, "rb") as f:
        data = f.read(policy.max_image_bytes + 1)  # the file may have grown since the size check
    if len(data) > policy.max_image_bytes:
        raise too_large("the image", policy.max_image_bytes, "bytes")
    return data


async def fetch_remote(url: str, policy: MediaPolicy, param: str) -> bytes:
    """GET an http(s) image, at most max_image_bytes of it (the server must allow remote images)."""
    import httpx

    data = bytearray()
    try:
        async with httpx.AsyncClient(follow_redirects=True, max_redirects=3, timeout=policy.remote_timeout_s) as c:
            async with c.stream("GET", url) as r:
                if r.status_code != 200:
                    raise bad_request(f"fetching the image failed: HTTP {r.status_code}", param)
                async for chunk in r.aiter_bytes():
                    data += chunk
                    if len(data) > policy.max_image_bytes:
                        raise too_large("the image", policy.max_image_bytes, "bytes")
    except httpx.HTTPError as e:
        raise bad_request(f"fetching the image failed: {type(e).__name__}", param) from None
    return bytes(data)


def decode(data: bytes, policy: MediaPolicy, param: str):
    """Encoded PNG / JPEG / WebP bytes -> an RGB PIL image, refusing more than max_image_pixels
    before the pixels are decoded (413) and anything that does not decode (400)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            # our own limit is checked below; PIL's bomb check still raises past twice its own limit
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data), formats=_FORMATS)  # reads the header only
            w, h = im.size
            if w * h > policy.max_image_pixels:
                raise too_large(f"the image ({w}x{h} = {w * h} pixels)", policy.max_image_pixels, "pixels")
            if im.mode not in _MODES:
                raise bad_request(f"the image has mode {im.mode!r}; send an 8-bit image (RGB, RGBA, L, P, ...)", param)
            im.load()
    except Image.DecompressionBombError:
        raise too_large("the image", policy.max_image_pixels, "pixels") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError):
        raise bad_request("the image could not be decoded (expected PNG, JPEG or WebP)", param) from None
    return im if im.mode == "RGB" else im.convert("RGB")  # an RGB file needs no copy
