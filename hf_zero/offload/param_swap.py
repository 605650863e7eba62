"""Stage-3 parameter shards kept in an NVMe swap file and read back a few units ahead of use.

Note:
    * One swap kind, ``param``, per rank: every stage-3 flat (trainable or frozen) owns a 4 KiB-
      aligned region holding its shard in the compute dtype, moved as raw 4-byte words (a shard is
      a multiple of 16 elements, so its bytes are a multiple of 4 whatever the dtype).
    * Between uses a flat's shard exists only in the file (``flat.shard`` is None). A flat is
      *held* from the moment its read is issued until the gather that used it has finished with
      the host copy (:meth:`ParamSwap.release`); only held flats occupy RAM.
    * Read-ahead (:meth:`prefetch`) holds at most ``buffer_count`` units' worth of shard bytes
      (the largest unit's, times ``buffer_count``); a read the gather needs now (:meth:`acquire`)
      is never refused, so a prefetch that was skipped costs time, never a deadlock.
    * Order: a read of a flat whose write is still in flight copies the written values (no
      disk read, no wait); otherwise it waits for that flat's pending write and reads the file.
      A write drops any held copy of the flat. So a gather never sees weights older than the
      last :meth:`write`.
    * With CUDA, host buffers are pinned and a released buffer carries the event of the copy
      that read it; the buffer is reused only after that event completed.
    * All methods are called from the thread that runs forward/backward and the optimizer
      publish (one at a time); a lock makes them safe if autograd calls from its own thread.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Sequence

import torch

from .nvme import ELEM, NvmeSwapStore, aligned_empty, region_layout

KIND = "param"


def shard_words(numel: int, dtype: torch.dtype) -> int:
    """4-byte words of a shard of ``numel`` elements of ``dtype``."""
    nbytes = numel * torch.empty(0, dtype=dtype).element_size()
    if nbytes % ELEM:
        raise ValueError(f"a shard of {numel} {dtype} elements is not a whole number of 4-byte words")
    return nbytes // ELEM


@dataclass
class _Held:
    buffer: torch.Tensor               # fp32 words, aligned, region-sized
    read: Optional[Future]             # None once waited for
    words: int


class ParamSwap:
    """The NVMe home of stage-3 parameter shards (one instance per rank).

    Args:
        shard_sizes: per flat, in the order flats are later :meth:`adopt`-ed, ``(numel, dtype)``
            of its shard; unit_of: per flat, the index of its unit (sizes the read-ahead budget).
        nvme_path, rank, block_size, threads: as :class:`~hf_zero.offload.nvme.NvmeSwapStore`.
        buffer_count: units whose shards read-ahead may keep in RAM at once; the gathers read
            ``buffer_count - 1`` units ahead (``read_ahead_units``).
        pin: pin the host buffers (CUDA).
    """

    def __init__(self, shard_sizes: Sequence[tuple], unit_of: Sequence[int], *, nvme_path: str, rank: int,
                 buffer_count: int = 4, block_size: int = 1 << 20, threads: int = 4, pin: bool = False,
                 use_direct: bool = True, checksums: bool = True):
        self.words = [shard_words(n, d) for n, d in shard_sizes]
        self.offsets, total = region_layout(self.words)
        unit_bytes: Dict[int, int] = {}
        for w, u in zip(self.words, unit_of):
            unit_bytes[u] = unit_bytes.get(u, 0) + w * ELEM
        self.budget_bytes = max(unit_bytes.values(), default=0) * max(1, buffer_count)
        self.read_ahead_units = max(1, buffer_count - 1)  # units the gathers read ahead of use
        self.pin = pin
        self.store = NvmeSwapStore(nvme_path, rank, {KIND: total}, block_size=block_size, threads=threads,
                                   use_direct=use_direct, checksums=checksums)
        self._index: Dict[int, int] = {}          # id(flat) -> region index
        self._flats: List[object] = []
        self._held: Dict[int, _Held] = {}
        self._writes: Dict[int, Future] = {}
        # values of writes still in flight, as 4-byte words: a read meanwhile copies them instead
        # of waiting for the disk (each entry goes when its write lands; own lock, never held
        # while waiting, since the I/O threads take it)
        self._in_flight_values: Dict[int, torch.Tensor] = {}
        self._values_lock = threading.Lock()
        self._free: Dict[int, List[tuple]] = {}   # words -> [(buffer, cuda event or None)]
        self._lock = threading.RLock()
        # counters (never reset here; benchmarks take differences)
        self.reads = 0                             # regions read (from disk or a write in flight)
        self.acquires = 0
        self.prefetch_hits = 0                     # acquires whose read was already issued
        self.bytes_read = 0                        # from disk
        self.bytes_written = 0
        self.wait_seconds = 0.0                    # time acquire() blocked on reads
        self.reads_from_pending_writes = 0         # reads served from a write still in flight

    # ---------------------------------------------------------------------------- set-up
    def adopt(self, flat) -> None:
        """Write ``flat``'s shard to its region and drop it from memory (``flat.shard`` = None)."""
        i = len(self._flats)
        if i >= len(self.words):
            raise ValueError("more flats adopted than shard sizes given")
        if shard_words(flat.shard_numel, flat.dtype) != self.words[i]:
            raise ValueError(f"flat {i}: shard size differs from the planned one")
        self._index[id(flat)] = i
        self._flats.append(flat)
        self._write(i, flat.shard.detach().cpu()).result()  # a GPU shard comes down first
        flat.drop_shard()

    def _i(self, flat) -> int:
        try:
            return self._index[id(flat)]
        except KeyError:
            raise KeyError("this flat's shard is not kept in the NVMe parameter swap") from None

    def __contains__(self, flat) -> bool:
        return id(flat) in self._index

    # ---------------------------------------------------------------------------- buffers
    def _take_buffer(self, words: int) -> torch.Tensor:
        free = self._free.get(words)
        if free:
            buf, event = free.pop()
            if event is not None:
                event.synchronize()       # the copy up from this buffer has finished
            return buf
        return aligned_empty(words, pin=self.pin)

    def _held_bytes(self) -> int:
        return sum(h.words * ELEM for h in self._held.values())

    def _issue_read(self, i: int) -> _Held:
        with self._values_lock:
            values = self._in_flight_values.get(i)
        buf = self._take_buffer(self.words[i])
        if values is not None:            # written moments ago: the bytes are still in RAM
            buf.copy_(values)
            read = None
            self.reads_from_pending_writes += 1
        else:
            pending = self._writes.pop(i, None)
            if pending is not None:
                pending.result()
            read = self.store.read(KIND, buf, self.offsets[i])
            self.bytes_read += self.words[i] * ELEM
        held = self._held[i] = _Held(buf, read, self.words[i])
        self.reads += 1
        return held

    # ---------------------------------------------------------------------------- use
    def prefetch(self, flats: Iterable) -> None:
        """Start reading the shards of ``flats`` (in order) while the read-ahead budget lasts."""
        with self._lock:
            for flat in flats:
                i = self._i(flat)
                if i in self._held:
                    continue
                if self._held_bytes() + self.words[i] * ELEM > self.budget_bytes:
                    return
                self._issue_read(i)

    def acquire(self, flat) -> torch.Tensor:
        """This flat's shard in RAM (its dtype, ``shard_numel`` elements), read now if it was not
        prefetched. Valid until :meth:`release`."""
        with self._lock:
            i = self._i(flat)
            self.acquires += 1
            held = self._held.get(i)
            if held is None:
                held = self._issue_read(i)
            else:
                self.prefetch_hits += 1
            if held.read is not None:
                t0 = time.perf_counter()
                held.read.result()
                self.wait_seconds += time.perf_counter() - t0
                held.read = None
            return held.buffer.view(flat.dtype)[: flat.shard_numel]

    def release(self, flat, event=None) -> None:
        """The gather is done with this flat's host copy (``event``: a CUDA event recorded after
        the last copy that reads it)."""
        with self._lock:
            held = self._held.pop(self._i(flat), None)
            if held is None:
                return
            if held.read is not None:     # prefetched, never used: let the read land first
                held.read.result()
            self._free.setdefault(held.words, []).append((held.buffer, event))

    def read(self, flat) -> torch.Tensor:
        """A fresh CPU copy of this flat's shard (checkpoints, exports)."""
        with self._lock:
            was_held = self._i(flat) in self._held
            out = self.acquire(flat).clone()
            if not was_held:
                self.release(flat)
            return out

    def write(self, flat, values: torch.Tensor, donate: bool = False) -> None:
        """Replace this flat's shard with ``values`` (asynchronously; later reads wait for it).
        ``values`` is copied first unless ``donate`` says the caller will never touch it again."""
        with self._lock:
            i = self._i(flat)
            if i in self._held:            # a stale copy: never hand it out again
                self.release(flat)
            values = values.detach().to("cpu", flat.dtype, copy=not donate).reshape(-1)
            if values.numel() != flat.shard_numel:
                raise ValueError(f"write of {values.numel()} elements into a shard of {flat.shard_numel}")
            self._write(i, values)

    def _write(self, i: int, values: torch.Tensor) -> Future:
        pending = self._writes.pop(i, None)
        if pending is not None:
            pending.result()
        words = values.contiguous()
        try:
            words = words.view(torch.float32)
        except RuntimeError:               # a storage offset that is not word-aligned
            words = words.clone().view(torch.float32)
        future = self.store.write(KIND, words, self.offsets[i])
        self._writes[i] = future
        self.bytes_written += self.words[i] * ELEM
        with self._values_lock:
            self._in_flight_values[i] = words
        future.add_done_callback(lambda _f, i=i, w=words: self._landed(i, w))
        return future

    def _landed(self, i: int, words: torch.Tensor) -> None:
        with self._values_lock:
            if self._in_flight_values.get(i) is words:
                del self._in_flight_values[i]

    def flush(self) -> None:
        """Wait for every pending write."""
        with self._lock:
            for f in list(self._writes.values()):
                f.result()
            self._writes.clear()

    # ---------------------------------------------------------------------------- reports
    @property
    def nvme_bytes(self) -> int:
        return sum(self.words) * ELEM

    def host_bytes(self) -> int:
        """Bytes of host buffers allocated (held or free for reuse)."""
        free = sum(w * ELEM * len(bufs) for w, bufs in self._free.items())
        return free + self._held_bytes()

    def close(self) -> None:
        with self._lock:
            try:
                self.flush()
                for i in list(self._held):
                    h = self._held.pop(i)
                    if h.read is not None:  # let it land before the buffer goes; its values are dropped,
                        h.read.exception()  # so a failed read (a damaged file) was reported by its user
            finally:
                self._free.clear()
                self.store.close()
