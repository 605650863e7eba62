"""Reusable fixed-size buffers: the per-backward full gradient buffers of stages 2 and 3.

Note:
    * A buffer is handed out zeroed (``take``) and handed back (``give``) once nothing reads it
      any more (its reduce-scatter was waited for). Buffers are keyed by (numel, dtype,
      device); a decoder-layer model has one key per distinct unit size, so the same few
      buffers serve every unit of every step.
    * Why: a freshly allocated buffer on the CPU is fresh pages from the OS (glibc serves
      blocks of this size with ``mmap``), and touching them costs a page fault each; zeroing a
      resident buffer is a ``memset``. On CUDA the caching allocator pools already, and the pool
      changes nothing but saves the allocator call.
    * Bound: at most ``keep`` free buffers per key stay in the pool after :meth:`trim`
      (called at the end of every backward), so a backward that needed many buffers at once
      (two forwards before one backward hold every unit's gradient) does not keep them.
      Buffers in use are the caller's; the pool holds only free ones.
"""

from __future__ import annotations

from typing import Dict, List, Tuple

import torch


class BufferPool:
    """Free lists of 1-D buffers keyed by (numel, dtype, device)."""

    def __init__(self, keep: int):
        self.keep = int(keep)
        self._free: Dict[Tuple[int, torch.dtype, str], List[torch.Tensor]] = {}
        self.taken = 0  # buffers handed out (statistics for tests and benchmarks)
        self.reused = 0  # ... of which came from the free list

    def take(self, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """A zeroed buffer of ``numel`` elements."""
        self.taken += 1
        free = self._free.get((numel, dtype, str(device)))
        if free:
            self.reused += 1
            return free.pop().zero_()
        return torch.zeros(numel, dtype=dtype, device=device)

    def give(self, buf: torch.Tensor) -> None:
        """Hand ``buf`` back; the caller must hold no other reference that it still uses."""
        self._free.setdefault((buf.numel(), buf.dtype, str(buf.device)), []).append(buf)

    def trim(self) -> None:
        """Keep at most ``keep`` free buffers per key."""
        for free in self._free.values():
            del free[self.keep:]

    @property
    def free_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for free in self._free.values() for t in free)
