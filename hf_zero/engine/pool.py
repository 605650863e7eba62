"""Reusable buffers: stage 2/3 gradient buffers (:class:`BufferPool`) and the memory of
gathered stage-3 units on the CPU (:class:`GatherPool`).

Note:
    * A buffer is handed out zeroed (``take``) and handed back (``give``) once nothing reads it
      any more (its reduce-scatter was waited for). Buffers are keyed by (numel, dtype,
      device); a decoder-layer model has one key per distinct unit size, so the same few
      buffers serve every unit of every step.
    * Why: a freshly allocated buffer on the CPU is fresh pages from the OS, and touching them
      costs a page fault each; zeroing a resident buffer is a ``memset``. On CUDA the caching
      allocator pools already, and the pool changes nothing but saves the allocator call.
    * On the CPU, buffers of at least :data:`MAPPED_MIN_BYTES` are the pool's own anonymous
      mappings (:func:`mapped_zeros`), not ``malloc`` blocks: glibc raises its mmap threshold
      each time a large mapped block is freed (to 16 MB and more once a model's weights were
      flattened), after which buffers of a unit's size come from the heap, where blocks freed
      between other allocations stay resident as holes (the stage-3 RSS creep). A mapping
      leaves no hole: dropping one (``trim``) returns its pages to the OS at once.
    * Bound: at most ``keep`` free buffers per key stay in the pool after :meth:`trim`
      (called at the end of every backward), so a backward that needed many buffers at once
      (two forwards before one backward hold every unit's gradient) does not keep them.
      Buffers in use are the caller's; the pool holds only free ones.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import sys
from typing import Dict, List, Optional, Tuple

import torch

_PAGE = mmap.PAGESIZE

#: CPU buffers at least this large are anonymous mappings of their own (see the notes)
MAPPED_MIN_BYTES = 1 << 20


def mapped_zeros(numel: int, dtype: torch.dtype) -> torch.Tensor:
    """A zeroed 1-D CPU tensor over an anonymous private mapping of its own (fresh zero pages,
    resident once touched; unmapped when the tensor's storage is freed)."""
    nbytes = numel * torch.empty((), dtype=dtype).element_size()
    m = mmap.mmap(-1, max(-(-nbytes // _PAGE) * _PAGE, _PAGE), flags=mmap.MAP_PRIVATE)
    return torch.frombuffer(m, dtype=dtype, count=numel)


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
        if device.type == "cpu" and numel * torch.empty((), dtype=dtype).element_size() >= MAPPED_MIN_BYTES:
            return mapped_zeros(numel, dtype)
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


# ---------------------------------------------------------------------------------------------
# Stage 3 on the CPU: gathered unit buffers whose memory moves between units instead of being
# freed and allocated again.

_PROT_RW = 0x1 | 0x2
_MAP_PRIVATE, _MAP_FIXED, _MAP_ANONYMOUS, _MAP_NORESERVE = 0x02, 0x10, 0x20, 0x4000
_MREMAP_MAYMOVE, _MREMAP_FIXED = 0x1, 0x2


def _libc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                              ctypes.c_long]
        libc.mremap.restype = ctypes.c_void_p
        libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        return libc
    except (OSError, AttributeError):
        return None


class GatherPool:
    """Resident page runs for the gathered buffers of stage-3 flats on the CPU.

    Each pooled flat's ``full`` is a tensor over its own fixed address range (a *window*, an
    anonymous private mapping), so its storage object and data pointer never change: tensors
    autograd saved in forward see the values again after the next gather, as with the
    resize-to-zero scheme this replaces. Releasing a unit moves the window's resident pages
    out (``mremap``, no copy) into the pool's free list and maps fresh zero pages (no memory)
    back at the window; gathering moves a free run of the same size into the window, so the
    all-gather writes into pages that are already resident: no page faults, no zeroing, no
    allocator churn (glibc otherwise keeps the freed blocks resident and fragments: the RSS
    creep). A gather with no free run of its size leaves the window's zero pages, which the
    all-gather then faults in; its release adds them to the pool.

    Bound: the pool never allocates. Its memory, in use plus free, is at most the most bytes
    gathered at once, and at most ``keep`` free runs per size are kept (beyond, a release
    unmaps), so between steps it holds at most ``keep`` units' worth per size: the prefetch
    window. A window read while released reads zeros (the parameters' guard stops that
    before it happens, see :mod:`hf_zero.engine.access`).
    """

    def __init__(self, keep: int = 2):
        self._libc = _libc()
        self.keep = int(keep)
        self._free: Dict[int, List[int]] = {}  # span bytes -> addresses of free resident runs
        self._windows: List[mmap.mmap] = []
        self.moves_in = 0  # gathers served from the pool (statistics)
        self.misses = 0  # gathers that found no free run

    @classmethod
    def for_cpu(cls, keep: int = 2) -> Optional["GatherPool"]:
        """A pool, or None where the platform cannot remap pages (then flats resize storage)."""
        pool = cls(keep)
        if pool._libc is None:
            return None
        try:  # probe: one page out and back
            probe = pool.window(1, torch.uint8)
            probe.fill_(7)
            pool.release(probe)
            pool.acquire(probe)
            ok = int(probe[0]) == 7
            pool.release(probe)
        except OSError:
            return None
        pool._windows.clear()
        pool.close()  # the probe's page
        pool.moves_in = pool.misses = 0
        return pool if ok else None

    @staticmethod
    def _span(t: torch.Tensor) -> int:
        return -(-t.numel() * t.element_size() // _PAGE) * _PAGE

    def window(self, numel: int, dtype: torch.dtype) -> torch.Tensor:
        """A 1-D tensor of ``numel`` elements over a fresh window (zeros, no memory yet)."""
        span = -(-numel * torch.empty((), dtype=dtype).element_size() // _PAGE) * _PAGE
        m = mmap.mmap(-1, span, flags=mmap.MAP_PRIVATE)
        self._windows.append(m)  # the tensor's storage keeps it too (frombuffer holds the buffer)
        return torch.frombuffer(m, dtype=dtype, count=numel)

    def _check(self, ret, what: str) -> int:
        if ret is None or ret == ctypes.c_void_p(-1).value:
            err = ctypes.get_errno()
            raise OSError(err, f"hf_zero gather pool: {what} failed: {os.strerror(err)}")
        return ret

    def release(self, full: torch.Tensor) -> None:
        """Move ``full``'s pages into the pool; ``full`` then reads zeros and holds no memory."""
        span, addr = self._span(full), full.data_ptr()
        free = self._free.setdefault(span, [])
        libc = self._libc
        if len(free) < self.keep:
            # a same-size mremap never moves unless told where: reserve the destination first
            dest = self._check(libc.mmap(None, span, _PROT_RW, _MAP_PRIVATE | _MAP_ANONYMOUS | _MAP_NORESERVE, -1, 0),
                               "mmap (reserve)")
            self._check(libc.mremap(ctypes.c_void_p(addr), ctypes.c_size_t(span), ctypes.c_size_t(span),
                                    ctypes.c_int(_MREMAP_MAYMOVE | _MREMAP_FIXED), ctypes.c_void_p(dest)),
                        "mremap (release)")
            free.append(dest)
            self._check(libc.mmap(addr, span, _PROT_RW, _MAP_PRIVATE | _MAP_ANONYMOUS | _MAP_FIXED | _MAP_NORESERVE,
                                  -1, 0), "mmap (release)")
        else:  # enough kept: drop the pages
            self._check(libc.mmap(addr, span, _PROT_RW, _MAP_PRIVATE | _MAP_ANONYMOUS | _MAP_FIXED | _MAP_NORESERVE,
                                  -1, 0), "mmap (release)")

    def acquire(self, full: torch.Tensor) -> None:
        """Give ``full`` resident pages (their old contents: the caller overwrites them all)."""
        span, addr = self._span(full), full.data_ptr()
        free = self._free.get(span)
        if not free:
            self.misses += 1
            return
        src = free.pop()
        self._check(self._libc.mremap(ctypes.c_void_p(src), ctypes.c_size_t(span), ctypes.c_size_t(span),
                                      ctypes.c_int(_MREMAP_MAYMOVE | _MREMAP_FIXED), ctypes.c_void_p(addr)),
                    "mremap (acquire)")
        self.moves_in += 1

    @property
    def free_bytes(self) -> int:
        """Resident bytes held in free runs (they count in the process's RSS)."""
        return sum(span * len(v) for span, v in self._free.items())

    def close(self) -> None:
        for span, addrs in self._free.items():
            for a in addrs:
                self._libc.munmap(a, span)
        self._free.clear()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass
