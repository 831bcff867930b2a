"""The checkpoint's image processor, run faster where it is exactly a resize and a per-value map.

transformers' PIL-backed BLIP image processor (what `model.processor()` gives on transformers 5)
turns an RGB image into pixels by a PIL resize, then `uint8 -> float64 * rescale_factor -> float32`,
then `(x - mean[c]) / std[c]` in float32. After the resize every step is elementwise on one
channel's uint8 value, so it takes one of 256 values per channel: `LookupPixels` resizes with the
very same PIL call, then maps uint8 -> float through a [3, 256] table computed once by running the
processor's own `rescale` and `normalize` on the values 0..255, laid out [3, H, W] with one gather
per channel. That cost the server's preprocessing thread 0.26 ms per 224 px image against the
processor's 0.89 ms (and the gather releases the GIL, which the processor's Python glue holds).

Only a processor this was checked for is taken (the PIL backend's own methods, not overridden; a
fixed height x width resize with a PIL filter; rescale, normalize and RGB conversion on; no crop or
pad), and only after the table reproduces the processor on probe images at start-up. Anything
else (other processor classes or options) gets None from `LookupPixels.of`, and the caller runs the
processor as before.
"""
from __future__ import annotations

import numpy as np
import torch

# the processor pipeline LookupPixels reproduces: these methods must be the PIL backend's own
_PIPELINE = ("__call__", "preprocess", "_preprocess_image_like_inputs", "_prepare_image_like_inputs",
             "_prepare_images_structure", "process_image", "convert_to_rgb", "_preprocess", "resize", "rescale",
             "normalize", "_standardize_kwargs", "_validate_preprocess_kwargs")
# float32 outputs of the same arithmetic agree exactly; the tolerance only keeps the probe from
# depending on that (another numpy could round a last bit differently)
_PROBE_ATOL = 1e-5


class LookupPixels:
    """`image (PIL) -> [3, H, W] float32 tensor`, equal to `image_processor(images=[image],
    return_tensors="pt")["pixel_values"][0]`. Build with `LookupPixels.of(image_processor)`."""

    def __init__(self, image_processor, size: tuple[int, int], resample: int, table: np.ndarray):
        self.image_processor = image_processor
        self.height, self.width = size
        self.resample = resample
        self.table = table  # [3, 256] float32: channel c's output for uint8 value v

    @classmethod
    def of(cls, image_processor) -> LookupPixels | None:
        """A LookupPixels for `image_processor`, or None where its pipeline is not the one this
        reproduces (or the probe images disagree with it): then run the processor itself."""
        size = _eligible(image_processor)
        if size is None:
            return None
        ip = image_processor
        values = np.broadcast_to(np.arange(256, dtype=np.uint8), (3, 1, 256)).copy()  # [3, 1, 256] channels-first
        table = ip.normalize(ip.rescale(values, ip.rescale_factor), ip.image_mean, ip.image_std)  # the processor's own arithmetic
        table = np.ascontiguousarray(np.asarray(table, dtype=np.float32)[:, 0, :])  # [3, 256]
        fast = cls(ip, size, int(ip.resample), table)
        return fast if fast._agrees() else None

    def __call__(self, image) -> torch.Tensor:
        from PIL import Image

        if not isinstance(image, Image.Image):
            raise TypeError(f"image must be a PIL image, got {type(image).__name__}")
        if image.mode != "RGB":  # the processor's own conversion (alpha composited onto white)
            rgb = self.image_processor.convert_to_rgb(image)  # a PIL image (transformers 5.17) or an array
            image = rgb if isinstance(rgb, Image.Image) else Image.fromarray(rgb)
        # the resize the processor makes: PIL, (width, height), its filter, no reducing gap
        hwc = np.asarray(image.resize((self.width, self.height), resample=self.resample, reducing_gap=None))
        out = np.empty((3, self.height, self.width), dtype=np.float32)  # [3, H, W]
        for c in range(3):
            np.take(self.table[c], hwc[:, :, c], out=out[c])  # [H, W] uint8 -> [H, W] float32
        return torch.from_numpy(out)

    def _agrees(self) -> bool:
        """The table's pixels against the processor's on seeded probe images: odd sizes, up- and
        downscaling, the target size itself, and the non-RGB modes it converts."""
        from PIL import Image

        rng = np.random.default_rng(0)
        h, w = self.height, self.width
        probes = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)),
                  Image.fromarray(rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)),
                  Image.fromarray(rng.integers(0, 256, (2 * h + 3, w + 7, 3), dtype=np.uint8)),
                  Image.fromarray(rng.integers(0, 256, (31, 29), dtype=np.uint8)),  # L
                  Image.fromarray(rng.integers(0, 256, (23, 41, 4), dtype=np.uint8))]  # RGBA
        for im in probes:
            try:
                want = self.image_processor(images=[im], return_tensors="pt")["pixel_values"]
            except Exception:  # a processor that cannot take a probe is not one to second-guess
                return False
            try:
                got = self(im).numpy()
            except Exception:  # this transformers' pieces do not fit together as checked: the processor runs
                return False
            if (not isinstance(want, torch.Tensor) or want.dtype != torch.float32 or tuple(want.shape) != (1, *got.shape)
                    or not float(np.abs(got - want[0].numpy()).max()) <= _PROBE_ATOL):  # NaN fails too
                return False
        return True


def _eligible(ip) -> tuple[int, int] | None:
    """(height, width) when `ip` is a PIL-backend processor whose pipeline is resize + rescale +
    normalize + RGB conversion as PilBackend runs them; None otherwise."""
    try:
        from transformers.image_processing_backends import PilBackend
        from transformers.image_utils import PILImageResampling
    except ImportError:  # a transformers without the PIL backend: its processors are not the one checked
        return None
    if not isinstance(ip, PilBackend):
        return None
    for name in _PIPELINE:
        if getattr(type(ip), name, None) is not getattr(PilBackend, name, None):
            return None  # overridden: the processor does something else
    if not (ip.do_resize is True and ip.do_rescale is True and ip.do_normalize is True and ip.do_convert_rgb is True):
        return None
    if getattr(ip, "do_center_crop", None) or getattr(ip, "do_pad", None):
        return None
    size = ip.size
    other = ("shortest_edge", "longest_edge", "max_height", "max_width")
    if size is None or any(getattr(size, k, None) for k in other):
        return None
    h, w = getattr(size, "height", None), getattr(size, "width", None)
    if not (isinstance(h, int) and isinstance(w, int) and h > 0 and w > 0):
        return None
    if not isinstance(ip.resample, (PILImageResampling, int)) or isinstance(ip.resample, bool):
        return None
    if not isinstance(ip.rescale_factor, (int, float)) or isinstance(ip.rescale_factor, bool):
        return None
    for stat in (ip.image_mean, ip.image_std):
        if not isinstance(stat, (tuple, list)) or len(stat) != 3:
            return None
    return h, w
