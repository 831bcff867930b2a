"""Limits checked before anything is allocated: the memory a device has left, and the pixel
tensors every entry point accepts (tensors or numpy arrays, converted as transformers' processor
flow would)."""
from __future__ import annotations

import resource

import numpy as np
import torch


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


def available_memory(device: torch.device) -> int:
    """Bytes that can still be allocated on `device`: the GPU's free memory; on a CPU, MemAvailable
    (Linux), and no more than the address space RLIMIT_AS leaves this process."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    avail = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
                    break
    except OSError:
        pass
    if avail is None:
        try:
            import os

            avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            avail = 1 << 62
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft != resource.RLIM_INFINITY:
        avail = min(avail, max(0, soft - _address_space()))
    return avail


def _address_space() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmSize:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def to_pixels(model, px, name: str = "pixel_values", *, batched: bool, device, interpolate: bool = False) -> torch.Tensor:
    """`px` as the model's pixels: a torch tensor (numpy arrays are converted) of floats, [B, 3, H, W]
    (batched) or [3, H, W], cast to the model's dtype, on `device` (None: where it is), finite, of
    the size the vision encoder expects (checked by it). Always a tensor the caller does not share."""
    if isinstance(px, np.ndarray):
        if px.dtype == object:
            raise TypeError(f"{name} must be a numeric array, got an object array")
        px = torch.from_numpy(np.array(px))  # a copy: the caller's array may be read-only or change later
    if not isinstance(px, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or a numpy array, got {type(px).__name__}")
    if px.is_meta:
        raise ValueError(f"{name} is on the meta device (a tensor without data): pass real pixel values")
    want = 4 if batched else 3
    if px.dim() != want or px.shape[-3] != 3:
        shape = "[batch, 3, height, width]" if batched else "[3, height, width]"
        raise ValueError(f"{name} must have shape {shape}, got {list(px.shape)}")
    if not px.is_floating_point():
        raise ValueError(f"{name} must be a float tensor (normalised pixels), got {px.dtype}")
    out = px.detach().to(device=px.device if device is None else device, dtype=model.dtype)
    if out.data_ptr() == px.data_ptr():
        out = out.clone()
    model.vision.check_pixels(out if batched else out[None], interpolate)
    if not bool(torch.isfinite(out).all()):
        raise ValueError(f"{name} contain NaN or infinite values")
    return out
