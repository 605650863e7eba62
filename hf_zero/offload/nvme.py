"""NVMe swap store: flat fp32 tensors kept in preallocated files, moved with direct I/O.

Note:
    * Layout: one file per rank per tensor kind, ``hf_zero-rank{rank:05d}-{name}.swap`` in the
      given directory, preallocated to ``capacity_bytes(numel)`` (the kind's numel × 4 bytes
      rounded up to 4 KiB). A kind holds many regions (one per unit shard); a region starts at an
      element offset that is a multiple of ``ALIGN_ELEMS`` (1024 fp32 = 4 KiB), so every region
      begins on its own 4 KiB block and the padding after its last element belongs to it alone.
      ``region_layout()`` computes such offsets.
    * I/O: files are opened with ``O_DIRECT`` when the file system accepts it (probed at open
      time with one aligned 4 KiB write and read); otherwise buffered, and ``flush()`` fsyncs.
      ``store.direct`` records the mode and ``store.mode_reason`` why.
    * A transfer is cut into at most ``threads`` contiguous spans (4 KiB-aligned, each at least
      ``block_size`` bytes unless the transfer is smaller), one per pool thread. Memory that is
      4 KiB-aligned moves with no copy, each span in as few ``os.pwrite``/``os.preadv`` calls as
      possible (at most ``MAX_REQUEST`` bytes each; the calls release the GIL). With ``O_DIRECT``
      the kernel splits one large call into device requests that are all in flight at once, so
      even one thread keeps the disk busy, and Python runs once per span rather than once per
      block. Anything else (a misaligned tensor, the partial last 4 KiB of a read) goes through a
      per-thread aligned staging buffer, ``block_size`` bytes per call.
    * A tensor handed to ``write``/``read`` must not be touched until its future resolves.
    * Integrity (``checksums=True``, the default): every span a ``write`` moves gets a checksum
      of its bytes (``DIGEST``: xxh3-64 when the ``xxhash`` package is there, else CRC-32), computed by the I/O thread and kept in memory, keyed by kind and byte range; a
      ``read`` of the same range verifies it and fails with :class:`SwapIntegrityError` naming
      the file, the range and both checksums. A write drops the checksums of every range it
      overlaps, so a range is only ever checked against what was last written there. Before
      every read the file's size is compared with its preallocated size (one ``fstat``): a
      truncated file fails naming the file and both sizes, never a short read deep in a thread.
    * Cleanup: ``close()`` removes the files; so do garbage collection of the store, interpreter
      exit (also after an uncaught exception) and SIGTERM / SIGINT, whose previous handlers are
      then chained (SIGINT still raises ``KeyboardInterrupt``; a default SIGTERM still kills the
      process with that signal). Only SIGKILL leaves files behind; a later store for the same
      rank and directory takes them over (an ``flock`` tells a stale file from a live one).
"""

from __future__ import annotations

import atexit
import ctypes
import errno
import fcntl
import os
import signal
import threading
import weakref
import zlib

try:  # xxh3 (~10 GB/s a core; the xxhash package comes with datasets, a dependency), else CRC-32
    from xxhash import xxh3_64_intdigest as _digest_fn

    DIGEST = "xxh3-64"
except ImportError:  # pragma: no cover - depends on the environment
    _digest_fn = zlib.crc32
    DIGEST = "crc32"
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch

ALIGN = 4096                    # bytes: buffer address, file offset and length granularity
ELEM = 4                        # bytes per fp32 element
ALIGN_ELEMS = ALIGN // ELEM     # region offsets are multiples of this many elements
MIN_MARGIN = 64 << 20           # free space kept beyond the files: max(1 %, 64 MiB)
MAX_REQUEST = 1 << 30           # bytes per zero-copy pwrite/preadv call (Linux caps one at 2 GiB - 4 KiB)


class OffloadError(ValueError):
    """A swap directory that cannot be used, or a transfer that does not fit its file."""


class SwapIntegrityError(OffloadError):
    """A swap file whose contents or size changed on disk since hf_zero wrote it."""


_LOST = ("the values kept there are lost: resume from the last checkpoint, and give this job an nvme_path "
         "that nothing else writes to (another job? a cleanup script? a failing disk?)")


# -- helpers --------------------------------------------------------------------------------------

def round_up(n: int, q: int) -> int:
    return -(-n // q) * q


def capacity_bytes(numel: int) -> int:
    """Bytes of the swap file for ``numel`` fp32 elements (at least one block)."""
    return max(ALIGN, round_up(numel * ELEM, ALIGN))


def region_layout(numels: Sequence[int]) -> Tuple[List[int], int]:
    """Element offsets for regions of the given sizes packed into one kind, each 4 KiB-aligned,
    and the total numel to give ``NvmeSwapStore`` for that kind."""
    offsets, total = [], 0
    for n in numels:
        offsets.append(total)
        total += round_up(max(int(n), 1), ALIGN_ELEMS)
    return offsets, total


def aligned_empty(numel: int, dtype: torch.dtype = torch.float32, *, pin: Optional[bool] = None) -> torch.Tensor:
    """A 1-D CPU tensor whose first byte is 4 KiB-aligned and whose storage extends to the next
    4 KiB boundary (pinned when CUDA is available, unless ``pin`` says otherwise)."""
    if pin is None:
        pin = torch.cuda.is_available()
    itemsize = torch.empty(0, dtype=dtype).element_size()
    nbytes = round_up(max(numel * itemsize, 1), ALIGN)
    raw = torch.empty(nbytes + ALIGN, dtype=torch.uint8, pin_memory=pin)
    skip = (-raw.data_ptr()) % ALIGN
    return raw[skip : skip + nbytes].view(dtype)[:numel]


def _mem(ptr: int, nbytes: int):
    """A writable buffer over raw memory (for os.pwrite / os.preadv)."""
    return (ctypes.c_char * nbytes).from_address(ptr)


def _slack_bytes(t: torch.Tensor) -> int:
    """Bytes of ``t``'s storage from its first element to the storage's end."""
    return t.untyped_storage().nbytes() - t.storage_offset() * t.element_size()


def _free_bytes(path: str) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


# -- cleanup registry -------------------------------------------------------------------------------

_live: "weakref.WeakSet[NvmeSwapStore]" = weakref.WeakSet()
_registry_lock = threading.Lock()
_handlers_installed = False
_previous_handlers: Dict[int, object] = {}


def _remove_files(paths: List[str], fds: List[int]) -> None:
    # Module-level (no reference to the store) so weakref.finalize can call it at exit.
    for p in paths:
        try:
            os.unlink(p)
        except FileNotFoundError:
            pass
        except OSError:
            pass
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass
    paths.clear()
    fds.clear()


def _remove_all_live() -> None:
    for store in list(_live):
        store._finalizer()


def _unlink_all_live() -> None:
    # From a signal handler: unlink only. Closing fds now could let an I/O thread that is still
    # running write into whatever file reuses the number; the fds close with the process (or at
    # close() if the program goes on after KeyboardInterrupt).
    for store in list(_live):
        for p in list(store._paths):
            try:
                os.unlink(p)
            except OSError:
                pass
        store._paths.clear()


def _on_signal(signum, frame):
    _unlink_all_live()
    previous = _previous_handlers.get(signum, signal.SIG_DFL)
    if callable(previous):
        previous(signum, frame)         # Python's default SIGINT handler raises KeyboardInterrupt
    elif previous == signal.SIG_IGN:
        return
    elif signum == signal.SIGINT:
        raise KeyboardInterrupt
    else:                               # SIG_DFL: die of the signal, as if we were not here
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)


def _install_handlers() -> None:
    global _handlers_installed
    if _handlers_installed or threading.current_thread() is not threading.main_thread():
        return                          # signal.signal only works in the main thread
    for signum in (signal.SIGTERM, signal.SIGINT):
        previous = signal.getsignal(signum)
        if previous == signal.SIG_IGN or previous is None:
            continue                    # ignored (or set outside Python): leave it alone
        _previous_handlers[signum] = previous
        signal.signal(signum, _on_signal)
    _handlers_installed = True


atexit.register(_remove_all_live)      # weakref.finalize also runs at exit; this is belt and braces


# -- the store --------------------------------------------------------------------------------------

class _Gather:
    """One Future that resolves when all of a transfer's span futures have."""

    def __init__(self, parts: List[Future], keep: object):
        self.future: Future = Future()
        self._left = len(parts)
        self._lock = threading.Lock()
        self._keep = keep               # the tensor, alive until the transfer ends
        self._error: Optional[BaseException] = None
        if not parts:
            self.future.set_result(None)
        for f in parts:
            f.add_done_callback(self._done)

    def _done(self, f: Future) -> None:
        with self._lock:
            if f.exception() is not None and self._error is None:
                self._error = f.exception()
            self._left -= 1
            last = self._left == 0
        if last:
            self._keep = None
            if self._error is not None:
                self.future.set_exception(self._error)
            else:
                self.future.set_result(None)


class NvmeSwapStore:
    """Preallocated swap files of one rank, one per tensor kind, with threaded direct I/O.

    Args:
        path: an existing, writable directory, ideally on a local NVMe disk.
        rank: the global rank (it names the files, so ranks can share a directory).
        tensors: kind name -> numel (fp32) of that kind's file.
        block_size: bytes (a multiple of 4 KiB): the smallest span a transfer is cut into per
            thread, and the size of each staged request (misaligned memory, the partial tail).
        threads: I/O threads: a transfer is cut into at most this many spans moved at once.
        use_direct: try ``O_DIRECT`` (False forces buffered I/O).
        checksums: keep a checksum per written span and verify it on read (see the module note).
    """

    def __init__(self, path: str, rank: int, tensors: Mapping[str, int], *, block_size: int = 1 << 20,
                 threads: int = 4, use_direct: bool = True, checksums: bool = True):
        if block_size <= 0 or block_size % ALIGN:
            raise ValueError(f"block_size must be a positive multiple of {ALIGN} bytes, got {block_size}")
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        if not tensors:
            raise ValueError("NvmeSwapStore needs at least one tensor kind")
        for name, numel in tensors.items():
            if not name or "/" in name or "\0" in name:
                raise ValueError(f"bad tensor kind name {name!r}")
            if int(numel) < 0:
                raise ValueError(f"numel of {name!r} must be >= 0, got {numel}")
        self.path = os.path.abspath(path)
        self.rank = int(rank)
        self.numels: Dict[str, int] = {k: int(v) for k, v in tensors.items()}
        self.block_size = block_size
        self.threads = threads
        self.files: Dict[str, str] = {
            k: os.path.join(self.path, f"hf_zero-rank{self.rank:05d}-{k}.swap") for k in self.numels}
        self._check_directory()

        self._paths: List[str] = []     # shared with the finalizer, which empties them
        self._fds_list: List[int] = []
        self._finalizer = weakref.finalize(self, _remove_files, self._paths, self._fds_list)
        self.fds: Dict[str, int] = {}
        self.direct = False
        self.mode_reason = "O_DIRECT not requested (use_direct=False)"
        with _registry_lock:
            _live.add(self)
            _install_handlers()
        try:
            self._create_files(use_direct)
        except BaseException:
            self._finalizer()
            raise
        self._local = threading.local()
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix=f"hf_zero-swap{self.rank}")
        self._closed = False
        self.checksums = bool(checksums)
        # kind -> {byte position: [span bytes, checksum or None while the write is in flight]}
        self._sums: Dict[str, Dict[int, list]] = {k: {} for k in self.numels}
        self._sums_lock = threading.Lock()  # write()/read() may come from more than one thread

    # -- set-up ---------------------------------------------------------------------------------
    def _fail(self, problem: str, fix: str, need: Optional[int] = None, free: Optional[int] = None,
              files: Optional[int] = None):
        space = ""
        if need is not None:
            parts = f" = {files:,} for the files + {need - files:,} margin" if files is not None else ""
            space = (f" (needs {need:,} bytes{parts} = {need / 2**30:.2f} GiB; "
                     f"{free:,} bytes = {free / 2**30:.2f} GiB free)")
        raise OffloadError(f"NVMe offload path {self.path!r}: {problem}{space}. Fix: {fix}")

    def _needed_bytes(self) -> Tuple[int, int, int]:
        """(files + margin, bytes of the files, bytes of stale files of ours that get reused)."""
        files = sum(capacity_bytes(n) for n in self.numels.values())
        # Files left by an earlier (killed) run of this rank are reused: their blocks count as free.
        reusable = 0
        for f in self.files.values():
            try:
                reusable += os.stat(f).st_blocks * 512
            except OSError:
                pass
        margin = max(files // 100, MIN_MARGIN)
        return files + margin, files, reusable

    def _check_directory(self) -> None:
        p = self.path
        if not os.path.exists(p):
            self._fail("does not exist", "create the directory (on a local NVMe disk) or set "
                       "offload_optimizer.nvme_path to an existing one")
        if not os.path.isdir(p):
            self._fail("is not a directory", "point nvme_path at a directory, not a file")
        try:
            read_only = bool(os.statvfs(p).f_flag & os.ST_RDONLY)
        except OSError:
            read_only = False
        if read_only or not os.access(p, os.W_OK | os.X_OK):
            why = ("is on a read-only file system" if read_only
                   else "is not writable (permissions, or an immutable directory)")
            self._fail(why, "choose a writable directory or fix its permissions")
        need, files, reusable = self._needed_bytes()
        free = _free_bytes(p) + reusable
        if free < need:
            self._fail("has too little free space for the swap files", "free space, give a directory on "
                       "a bigger disk, or offload fewer states", need, free, files)

    def _create_files(self, use_direct: bool) -> None:
        for name, fpath in self.files.items():
            size = capacity_bytes(self.numels[name])
            try:
                fd = os.open(fpath, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o600)
            except OSError as e:
                self._fail(f"cannot create {os.path.basename(fpath)} ({e.strerror})",
                           "choose a writable directory or fix its permissions")
            self._paths.append(fpath)
            self._fds_list.append(fd)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                self._paths.remove(fpath)   # someone else's live file: never delete it
                self._fail(f"{os.path.basename(fpath)} is in use by another live swap store (another job, "
                           "or another engine in this process)",
                           "give each job (and each engine) its own directory, or distinct ranks")
            try:
                os.ftruncate(fd, 0)
                try:
                    os.posix_fallocate(fd, 0, size)
                except OSError as e:
                    if e.errno in (errno.ENOSPC, errno.EDQUOT):
                        raise
                    os.ftruncate(fd, size)   # no fallocate on this file system: a sparse file
            except OSError as e:
                self._fail(f"cannot preallocate {os.path.basename(fpath)} ({e.strerror})",
                           "free space or give a directory on a bigger disk", size, _free_bytes(self.path))
            self.fds[name] = fd
        # Direct I/O: reopen each file with O_DIRECT and probe one aligned block.
        if not use_direct:
            return
        if not hasattr(os, "O_DIRECT"):
            self.mode_reason = "this platform has no O_DIRECT"
            return
        probe = aligned_empty(ALIGN // ELEM, pin=False).view(torch.uint8)
        direct_fds = {}
        try:
            for name, fpath in self.files.items():
                fd = os.open(fpath, os.O_RDWR | os.O_DIRECT | getattr(os, "O_CLOEXEC", 0))
                direct_fds[name] = fd
                self._fds_list.append(fd)
                buf = _mem(probe.data_ptr(), ALIGN)
                if os.pwrite(fd, buf, 0) != ALIGN or os.preadv(fd, [buf], 0) != ALIGN:
                    raise OSError(errno.EIO, "short direct transfer")
        except OSError as e:
            self.mode_reason = f"O_DIRECT refused by the file system ({e.strerror or e}); buffered I/O"
            return
        self.fds = direct_fds           # the buffered fds stay open: they hold the flocks
        self.direct = True
        self.mode_reason = "O_DIRECT"

    # -- I/O ------------------------------------------------------------------------------------
    def _staging(self) -> torch.Tensor:
        buf = getattr(self._local, "buf", None)
        if buf is None:
            buf = self._local.buf = aligned_empty(self.block_size, torch.uint8)
        return buf

    def _check(self, name: str, t: torch.Tensor, offset: int) -> int:
        if self._closed:
            raise OffloadError(f"swap store {self.path!r} is closed")
        if name not in self.numels:
            raise KeyError(f"unknown swap tensor kind {name!r}; known: {sorted(self.numels)}")
        if t.device.type != "cpu" or t.dtype != torch.float32 or not t.is_contiguous():
            raise ValueError(f"swap I/O needs a contiguous fp32 CPU tensor, got {t.dtype} on {t.device}"
                             f"{'' if t.is_contiguous() else ' (not contiguous)'}")
        if offset < 0 or offset % ALIGN_ELEMS:
            raise ValueError(f"offset must be a non-negative multiple of {ALIGN_ELEMS} elements "
                             f"(4 KiB), got {offset}; use region_layout()")
        end = offset + t.numel()
        if end > self.numels[name]:
            raise OffloadError(f"{name}[{offset}:{end}] is past the end of its swap file "
                               f"({self.numels[name]} elements)")
        return offset * ELEM

    def _spans(self, nbytes: int) -> List[Tuple[int, int]]:
        """Byte ranges ``[a, b)`` of a transfer, one per thread: contiguous, starting on 4 KiB
        boundaries, each at least ``block_size`` long (the last may be shorter)."""
        if nbytes <= 0:
            return []
        parts = max(1, min(self.threads, nbytes // self.block_size))
        q, r = divmod(-(-nbytes // ALIGN), parts)   # whole 4 KiB blocks, shared out evenly
        edges = [(i * q + min(i, r)) * ALIGN for i in range(parts)] + [nbytes]
        return list(zip(edges[:-1], edges[1:]))

    @staticmethod
    def _pwrite_all(fd: int, ptr: int, n: int, pos: int) -> None:
        done = 0
        while done < n:                 # pwrite may be short; continue where it stopped
            k = os.pwrite(fd, _mem(ptr + done, min(n - done, MAX_REQUEST)), pos + done)
            if k <= 0:
                raise OSError(errno.EIO, f"pwrite wrote {k} bytes at {pos + done}")
            done += k

    @staticmethod
    def _pread_all(fd: int, ptr: int, n: int, pos: int) -> None:
        done = 0
        while done < n:
            k = os.preadv(fd, [_mem(ptr + done, min(n - done, MAX_REQUEST))], pos + done)
            if k <= 0:
                raise OSError(errno.EIO, f"preadv read {k} bytes at {pos + done} (file too short?)")
            done += k

    def _write_span(self, fd: int, t: torch.Tensor, ptr: int, a: int, b: int, base: int, zero_copy: bool,
                    entry: Optional[list] = None) -> None:
        if entry is not None:           # the bytes as they leave: what a later read must find
            entry[1] = _digest_fn(_mem(ptr + a, b - a))
        if zero_copy:                   # the last span's padding comes from the storage's slack
            self._pwrite_all(fd, ptr + a, round_up(b - a, ALIGN), base + a)
            return
        src = t.reshape(-1).view(torch.uint8)
        stage = self._staging()
        for x in range(a, b, self.block_size):
            y = min(b, x + self.block_size)
            n, span = y - x, round_up(y - x, ALIGN)
            stage[:n].copy_(src[x:y])
            if span > n:
                stage[n:span].zero_()
            self._pwrite_all(fd, stage.data_ptr(), span, base + x)

    def _read_span(self, fd: int, t: torch.Tensor, ptr: int, a: int, b: int, base: int, zero_copy: bool,
                   name: str = "", entry: Optional[list] = None) -> None:
        a0 = a
        try:
            if zero_copy:                   # whole 4 KiB blocks straight into the tensor
                whole = (b - a) // ALIGN * ALIGN
                if whole:
                    self._pread_all(fd, ptr + a, whole, base + a)
                a += whole
            if a < b:
                dst = t.reshape(-1).view(torch.uint8)   # staged: a misaligned tensor, or the partial last block
                stage = self._staging()
                for x in range(a, b, self.block_size):
                    y = min(b, x + self.block_size)
                    self._pread_all(fd, stage.data_ptr(), round_up(y - x, ALIGN), base + x)
                    dst[x:y].copy_(stage[: y - x])
        except OSError as e:
            if name and e.errno == errno.EIO and "file too short" in str(e):
                raise SwapIntegrityError(f"{self.files[name]}: {e}: the swap file was truncated while in use "
                                         f"(now {self._size(name):,} bytes); {_LOST}") from None
            raise
        if entry is not None and entry[1] is not None:
            got = _digest_fn(_mem(ptr + a0, b - a0))
            if got != entry[1]:
                raise SwapIntegrityError(
                    f"{self.files[name]}: bytes [{base + a0:,}, {base + b:,}) of swap kind {name!r} differ from "
                    f"what hf_zero wrote there ({DIGEST} checksum {got:016x} on disk, {entry[1]:016x} written): the file was "
                    f"overwritten or corrupted on disk; {_LOST}")

    def _size(self, name: str) -> int:
        return os.fstat(self.fds[name]).st_size

    def _check_size(self, name: str) -> None:
        """One fstat: the file must still have the size it was preallocated to."""
        want = capacity_bytes(self.numels[name])
        size = self._size(name)
        if size < want:
            raise SwapIntegrityError(
                f"{self.files[name]}: swap file is {size:,} bytes, but hf_zero preallocated {want:,}: it was "
                f"truncated since (by another process, or a cleanup of the directory); {_LOST}")

    def _entries_for_write(self, name: str, pos: int, spans: List[Tuple[int, int]]) -> List[Optional[list]]:
        """Forget the checksums of every range this write overlaps; new (pending) ones for its spans."""
        if not self.checksums:
            return [None] * len(spans)
        with self._sums_lock:
            return self._new_entries(self._sums[name], pos, spans)

    @staticmethod
    def _new_entries(table: Dict[int, list], pos: int, spans: List[Tuple[int, int]]) -> List[list]:
        lo, hi = pos, pos + (spans[-1][1] if spans else 0)
        first = table.get(lo)
        if not (first is not None and spans and first[0] == spans[0][1] - spans[0][0]
                and all(table.get(pos + a, [None])[0] == b - a for a, b in spans)):
            for start in [k for k, (n, _) in table.items() if k < hi and k + n > lo]:
                del table[start]        # a different layout over these bytes: rare, so a scan
        entries = []
        for a, b in spans:
            entry = table[pos + a] = [b - a, None]
            entries.append(entry)
        return entries

    def _entries_for_read(self, name: str, pos: int, spans: List[Tuple[int, int]]) -> List[Optional[list]]:
        if not self.checksums:
            return [None] * len(spans)
        table, out = self._sums[name], []
        with self._sums_lock:
            for a, b in spans:
                entry = table.get(pos + a)
                out.append(entry if entry is not None and entry[0] == b - a else None)
        return out

    def write(self, name: str, tensor: torch.Tensor, offset: int = 0) -> Future:
        """Write ``tensor`` to kind ``name`` at element ``offset``; returns a Future."""
        pos = self._check(name, tensor, offset)
        nbytes = tensor.numel() * ELEM
        ptr = tensor.data_ptr()
        # No copy if aligned; a partial last block may then be written from the storage's slack.
        zero_copy = ptr % ALIGN == 0 and _slack_bytes(tensor) >= round_up(nbytes, ALIGN)
        fd = self.fds[name]
        spans = self._spans(nbytes)
        entries = self._entries_for_write(name, pos, spans)
        parts = [self._pool.submit(self._write_span, fd, tensor, ptr, a, b, pos, zero_copy, e)
                 for (a, b), e in zip(spans, entries)]
        return _Gather(parts, tensor).future

    def read(self, name: str, out: torch.Tensor, offset: int = 0) -> Future:
        """Read ``out.numel()`` elements of kind ``name`` from element ``offset`` into ``out``."""
        pos = self._check(name, out, offset)
        nbytes = out.numel() * ELEM
        ptr = out.data_ptr()
        zero_copy = ptr % ALIGN == 0   # the partial last 4 KiB (if any) goes through staging
        fd = self.fds[name]
        self._check_size(name)
        spans = self._spans(nbytes)
        entries = self._entries_for_read(name, pos, spans)
        parts = [self._pool.submit(self._read_span, fd, out, ptr, a, b, pos, zero_copy, name, e)
                 for (a, b), e in zip(spans, entries)]
        return _Gather(parts, out).future

    def write_from(self, name: str, tensor: torch.Tensor, offset: int = 0) -> None:
        self.write(name, tensor, offset).result()

    def read_into(self, name: str, out: torch.Tensor, offset: int = 0) -> torch.Tensor:
        self.read(name, out, offset).result()
        return out

    def flush(self) -> None:
        """Make written data durable (fsync; with O_DIRECT the data already bypassed the cache)."""
        for fd in self.fds.values():
            os.fsync(fd)

    def close(self) -> None:
        """Wait for pending transfers, close the files and remove them. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._pool.shutdown(wait=True)
        self._finalizer()
        with _registry_lock:
            _live.discard(self)

    @property
    def file_paths(self) -> List[str]:
        return list(self.files.values())

    def __enter__(self) -> "NvmeSwapStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        mode = "direct" if self.direct else "buffered"
        return f"NvmeSwapStore({self.path!r}, rank={self.rank}, kinds={list(self.numels)}, {mode})"


# -- the optimizer pipeline -------------------------------------------------------------------------

@dataclass(frozen=True)
class Region:
    """Elements ``[offset, offset + numel)`` of every kind (offset 4 KiB-aligned)."""

    offset: int
    numel: int


StepFn = Callable[[int, Region, Dict[str, torch.Tensor]], None]


class SwapPipeline:
    """Step swapped regions one by one: read region i+1 while ``step_fn`` works on region i and
    region i-1 is written back (with ``buffer_count=3``; more buffers read further ahead).

    ``step_fn(index, region, tensors)`` gets, per kind, a tensor of ``region.numel`` elements to
    update in place. Exactly ``buffer_count`` aligned buffers per kind are allocated, sized to the
    largest region, and reused; a region holds one from the start of its read to the end of its
    write, so at most ``buffer_count`` regions are in RAM. ``write_kinds`` (default all) are the
    kinds written back; others are only read.
    """

    def __init__(self, store: NvmeSwapStore, regions: Sequence[Region], *, buffer_count: int = 3,
                 kinds: Optional[Sequence[str]] = None, write_kinds: Optional[Sequence[str]] = None):
        if buffer_count < 2:
            raise ValueError("SwapPipeline needs buffer_count >= 2 (3 overlaps read, step and write)")
        self.store = store
        self.regions = [r if isinstance(r, Region) else Region(*r) for r in regions]
        self.kinds = list(kinds) if kinds is not None else list(store.numels)
        self.write_kinds = list(write_kinds) if write_kinds is not None else list(self.kinds)
        self.buffer_count = buffer_count
        largest = max((r.numel for r in self.regions), default=1)
        self.buffers = [{k: aligned_empty(largest) for k in self.kinds} for _ in range(buffer_count)]
        self.max_live = 0               # the most regions held in buffers at once (last run)

    def run(self, step_fn: StepFn, regions: Optional[Sequence[Region]] = None) -> None:
        """Step every region (or ``regions``: any others that fit the buffers, reusing them)."""
        if regions is None:
            regions = self.regions
        else:
            regions = [r if isinstance(r, Region) else Region(*r) for r in regions]
            room = self.buffers[0][self.kinds[0]].numel() if self.kinds else 0
            too_big = [r for r in regions if r.numel > room]
            if too_big:
                raise ValueError(f"region of {too_big[0].numel} elements does not fit this pipeline's "
                                 f"buffers ({room} elements)")
        B = self.buffer_count
        n = len(regions)
        ahead = max(1, B - 2)           # regions read ahead of the one being stepped
        reads: Dict[int, List[Future]] = {}
        writes: Dict[int, List[Future]] = {}
        live = set()
        self.max_live = 0

        def views(i):
            r = regions[i]
            return {k: self.buffers[i % B][k][: r.numel] for k in self.kinds}

        def issue_read(j):
            prev = j - B                # the region that last used this buffer
            if prev >= 0:
                for f in writes.pop(prev, []):
                    f.result()
                live.discard(prev)
            r = regions[j]
            reads[j] = [self.store.read(k, v, r.offset) for k, v in views(j).items()]
            live.add(j)
            self.max_live = max(self.max_live, len(live))

        try:
            issued = 0
            for i in range(n):
                while issued < n and issued <= i + ahead:
                    issue_read(issued)
                    issued += 1
                for f in reads.pop(i):
                    f.result()
                tensors = views(i)
                step_fn(i, regions[i], tensors)
                writes[i] = [self.store.write(k, tensors[k], regions[i].offset) for k in self.write_kinds]
        finally:
            errors = []
            for fs in list(reads.values()) + list(writes.values()):
                for f in fs:            # never leave a transfer running into a reused buffer
                    try:
                        f.result()
                    except BaseException as e:  # noqa: BLE001 - reported below
                        errors.append(e)
            reads.clear()
            writes.clear()
        if errors:
            raise errors[0]
