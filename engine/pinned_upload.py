"""Reusable pinned host buffers for the per-step host-to-device upload.

Pinning a fresh array every step goes through the caching host allocator, which on the
H100 cost 2.5 ms per step once cascade steps made the upload larger (a cudaHostAlloc
whenever no cached block of that size class was free yet). A few buffers reused round
robin make the upload one memcpy into memory that is already pinned, whatever its size.
"""
from __future__ import annotations

import numpy as np
import torch


class PinnedUpload:
    """`stage(n)` gives a host array of n int64s to fill; `send(n)` copies it to the device
    without blocking. A slot is written again only after its previous copy has finished
    (with async output at most two steps are in flight, so that wait is already over)."""

    def __init__(self, device: torch.device, slots: int = 4) -> None:
        self.device = device
        self.pinned = device.type == "cuda"
        self._bufs: list[torch.Tensor | None] = [None] * slots
        self._events: list[torch.cuda.Event | None] = [None] * slots
        self._slot = 0
        self._host: np.ndarray | None = None

    def stage(self, n: int) -> np.ndarray:
        if not self.pinned:  # the CPU reads the array itself: a fresh one per step
            self._host = np.empty(n, dtype=np.int64)
            return self._host
        i = self._slot
        if self._events[i] is not None:
            self._events[i].synchronize()
            self._events[i] = None
        buf = self._bufs[i]
        if buf is None or buf.numel() < n:
            buf = torch.empty(max(2 * n, 1 << 14), dtype=torch.int64, pin_memory=True)
            self._bufs[i] = buf
        self._host = buf.numpy()[:n]
        return self._host

    def send(self, n: int) -> torch.Tensor:
        """The staged array on the device (a new tensor; the host slot may be reused later)."""
        if not self.pinned:
            return torch.from_numpy(self._host[:n])
        i = self._slot
        self._slot = (i + 1) % len(self._bufs)
        out = self._bufs[i][:n].to(self.device, non_blocking=True)
        ev = torch.cuda.Event()
        ev.record()
        self._events[i] = ev
        return out
