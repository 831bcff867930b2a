"""Limits checked before anything is allocated: the memory a device has left (and, on a GPU, what a
profile run leaves for the KV cache), and the pixel tensors every entry point accepts (tensors or
numpy arrays, converted as transformers' processor flow would)."""
from __future__ import annotations

import math
import resource

import numpy as np
import torch

from ..layers import AttnMeta


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
    if not all_finite(out):
        raise ValueError(f"{name} contain NaN or infinite values")
    return out


def all_finite(t: torch.Tensor) -> bool:
    """Whether every element of the float tensor `t` is finite. One vectorised sum decides it (a NaN or
    an infinity makes the sum NaN or infinite; 11 us for a 224 px image here, where isfinite().all()
    took 425): only a sum that overflowed from finite values is settled element by element."""
    acc = torch.float64 if t.dtype == torch.float64 else torch.float32  # half-precision sums overflow at 65504
    if math.isfinite(t.sum(dtype=acc).item()):
        return True
    return bool(torch.isfinite(t).all())


def profile_kv_blocks(model, util: float, per_block: int, max_model_len: int, max_num_batched_tokens: int,
                  max_num_seqs: int) -> int:
    """KV blocks of `per_block` bytes that fit in `util` of the GPU after what is in use (the weights)
    and the measured peak of a profile run: an image batch through the vision encoder and Q-Former,
    the largest prefill the engine admits, and the decode step's logits at max_num_seqs."""
    m, dev = model, model.device
    torch.cuda.synchronize(dev)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(dev)
    base = torch.cuda.memory_allocated(dev)
    with torch.inference_mode():
        S = m.cfg.vision.image_size
        m.language_model_inputs(torch.zeros(32, 3, S, S, device=dev, dtype=m.dtype))
        L = max_model_len
        n = max(1, max_num_batched_tokens // L)
        E = m.lm.embed_tokens(torch.zeros(1, 1, dtype=torch.long, device=dev)).shape[-1]  # embedding width
        x = torch.zeros(n, L, E, device=dev, dtype=m.dtype)
        mask = torch.ones(n, L, dtype=torch.bool, device=dev)
        if m.is_encoder_decoder:
            enc = m.lm.encode(x, mask)
            m.lm.decode(x, enc, AttnMeta(prefill=True, key_padding_mask=mask, encoder_mask=mask))
        else:
            pos = torch.arange(L, device=dev).expand(n, L)
            m.lm(x, pos, AttnMeta(prefill=True, key_padding_mask=mask))
        del x, mask
        hidden = m.cfg.lm.d_model if m.is_encoder_decoder else m.cfg.lm.hidden
        m.lm.logits(torch.zeros(max_num_seqs, hidden, device=dev, dtype=m.dtype)).float()
    torch.cuda.synchronize(dev)
    peak = torch.cuda.max_memory_allocated(dev) - base
    torch.cuda.empty_cache()  # what the profile run cached is free again: count it once, as `peak`
    free, total = torch.cuda.mem_get_info(dev)
    budget = int(total * util) - (total - free) - peak
    if budget < 2 * per_block:
        raise ValueError(f"gpu_memory_utilization={util}: {format_bytes(total * util)} of the GPU leave no room for "
                         f"a KV cache after {format_bytes(total - free)} in use and a measured activation peak of "
                         f"{format_bytes(peak)}")
    return budget // per_block
