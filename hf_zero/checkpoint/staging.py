"""Host memory that holds the snapshot of an asynchronous save, kept from one save to the next.

``save_checkpoint(..., async_save=True)`` copies every tensor of the rank file into host memory
before training resumes. Copying into memory the process never touched costs a page fault per
page (on a VM often a host-side fault too: 0.5-2.5 GB/s measured on the CPU box, against ~5 GB/s
into touched memory), so the copies are kept and refilled at the next save: from the second
asynchronous save on, the snapshot is a plain copy.

Invariants:
    * One ``SnapshotStaging`` per engine (``engine._checkpoint_staging``). ``copy(key, src)``
      returns the host tensor kept under ``key``, refilled with ``src``; a new tensor is made
      only when there is none yet or its shape or dtype differs.
    * Only ``save_checkpoint`` fills it, on the main thread, and only after ``finish_pending``
      joined the previous background write: a snapshot never overwrites bytes still being
      written. ``begin()`` starts a snapshot; ``end()`` drops the tensors it did not use (a
      model that changed since the last save).
    * Pinned memory when the engine's device is CUDA (device-to-host copies at full speed), and
      the copies are synchronous: when ``copy`` returns the bytes are in host memory.
    * Not kept (``hf_zero.async_save_keep_staging`` false, or null when training on the CPU):
      the engine does not hold it, so the snapshot's memory goes back when its file is written
      (each save pays the first touch again; the host RAM between saves is free).
      ``load_checkpoint`` and ``engine.destroy()`` drop a kept one.
"""

from __future__ import annotations

from typing import Dict, Optional, Set

import torch


class SnapshotStaging:
    """Named host tensors refilled at every asynchronous save (see the module note)."""

    def __init__(self, pin: bool = False):
        self.pin = pin
        self._held: Dict[str, torch.Tensor] = {}
        self._used: Set[str] = set()

    def begin(self) -> None:
        """A new snapshot starts (whatever an interrupted one marked as used is forgotten)."""
        self._used = set()

    def copy(self, key: str, src: torch.Tensor, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """``src`` (any device) as a contiguous CPU tensor of ``dtype`` in the memory kept under
        ``key``; never shares memory with ``src``."""
        src = src.detach()
        dtype = dtype or src.dtype
        out = self._held.get(key)
        if out is None or out.shape != src.shape or out.dtype != dtype:
            out = torch.empty(src.shape, dtype=dtype, pin_memory=self.pin)
            self._held[key] = out
        out.copy_(src)
        self._used.add(key)
        return out

    def end(self) -> None:
        """The snapshot is complete: forget the tensors it did not use."""
        for key in set(self._held) - self._used:
            del self._held[key]
        self._used = set()

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._held.values())
