"""One step's host-side inputs, packed into one buffer and sent to the device with one copy.

The runner (token ids, positions, cache slots, block tables, ...) and the sampler (row indices,
banned ids, temperatures, ...) `add` numpy arrays and get device views back at once; `send()` then
copies everything from pinned memory in one transfer, ahead of any kernel that reads the views
(same stream). Float32 arrays travel bit for bit inside the int32 buffer. On a CPU the device
buffer is the host buffer: no copy at all.

The layout is deterministic (arrays sit in the order they were added), which is what lets a CUDA
graph captured over views of this buffer read the inputs a later step writes at the same offsets.
A step that outgrows the first buffer spills into a second one (a second copy); the first buffer
never moves, since captured graphs read it.
"""
from __future__ import annotations

import functools

import numpy as np
import torch


def inference(fn):
    """`torch.inference_mode()` as a decorator that costs nothing when the mode is already on (the
    engine's step turns it on once; the stock decorator enters it again on every call, ~5 us)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if torch.is_inference_mode_enabled():
            return fn(*args, **kwargs)
        with torch.inference_mode():
            return fn(*args, **kwargs)
    return wrapper


class _Segment:
    def __init__(self, device: torch.device, capacity: int):
        cuda = device.type == "cuda"
        self.capacity = capacity
        self.host = torch.empty(capacity, dtype=torch.int32, pin_memory=cuda)
        self.np = self.host.numpy()
        self.dev = torch.empty(capacity, dtype=torch.int32, device=device) if cuda else self.host
        self.used = self.sent = 0


class Staging:
    def __init__(self, device: torch.device, capacity: int = 1 << 16):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.segments = [_Segment(self.device, capacity)]
        self.cur = 0
        self.owner = None  # who laid out the arrays at offset 0 (set by that caller; cleared by another's add there)

    @property
    def capacity(self) -> int:
        return self.segments[0].capacity

    def reset(self) -> None:
        """Start a step. Views handed out before are invalid from here on."""
        if len(self.segments) > 2:  # spilled more than once: one overflow buffer that holds it all next time
            self.segments = [self.segments[0], _Segment(self.device, sum(s.capacity for s in self.segments[1:]))]
        for s in self.segments:
            s.used = s.sent = 0
        self.cur = 0

    def add(self, a: np.ndarray) -> torch.Tensor:
        """Append `a` (int32 or float32; other integer arrays are cast to int32); returns its device view
        of a's shape (int32 or float32), valid once `send()` has run."""
        return self.add_np(a)[1]

    def add_np(self, a: np.ndarray) -> tuple[np.ndarray, torch.Tensor]:
        """`add`, also returning the host buffer's numpy view of `a`: a caller that lays out the same
        arrays at the same offsets next step may rewrite them there and `skip` (no new views)."""
        if a.dtype == np.float32:
            words, dtype = np.ascontiguousarray(a).reshape(-1).view(np.int32), torch.float32
        else:
            words, dtype = np.ascontiguousarray(a, dtype=np.int32).reshape(-1), torch.int32
        n = words.size
        seg = self.segments[self.cur]
        while seg.used + n > seg.capacity:
            self.cur += 1
            if self.cur == len(self.segments):
                self.segments.append(_Segment(self.device, max(n, self.segments[0].capacity)))
            seg = self.segments[self.cur]
        a0 = seg.used
        if a0 == 0 and self.cur == 0:
            self.owner = None  # offset 0 is being rewritten: whatever layout sat there is gone
        seg.np[a0: a0 + n] = words
        seg.used += n
        v = seg.np[a0: a0 + n]
        hv = (v.view(np.float32) if dtype == torch.float32 else v).reshape(a.shape)
        if not self.cuda:  # the host buffer is the device buffer: one numpy view, one torch call
            return hv, torch.from_numpy(hv)
        t = seg.dev[a0: a0 + n]
        return hv, (t.view(torch.float32) if dtype == torch.float32 else t).view(a.shape)

    @property
    def offset(self) -> tuple[int, int]:
        """Where the next add goes: (buffer, word)."""
        return self.cur, self.segments[self.cur].used

    def skip(self, words: int) -> None:
        """Advance past `words` words already laid out in the first buffer (see `add_np`)."""
        assert self.cur == 0 and self.segments[0].used + words <= self.segments[0].capacity
        self.segments[0].used += words

    @staticmethod
    @inference  # the buffers may be inference tensors (an engine built under inference mode)
    def _copy(seg: _Segment) -> None:
        seg.dev[seg.sent: seg.used].copy_(seg.host[seg.sent: seg.used], non_blocking=True)

    def send(self) -> None:
        """The host-to-device copy of everything added since the last send (one per step)."""
        for seg in self.segments:
            if self.cuda and seg.used > seg.sent:
                self._copy(seg)
            seg.sent = seg.used
