"""Safetensors files written and read in one pass at disk speed, their sha256 computed on the fly.

Note:
    * The files are plain safetensors (8-byte little-endian header length, a JSON header padded
      with spaces to a multiple of 8 bytes, then the tensors' bytes back to back in header
      order), so ``safetensors.safe_open`` reads them; the sha256 is that of the whole file, as
      ``format.sha256_of`` computes it.
    * File order: the entries ``lead`` names first (the file's "lead range": the header and
      those entries, e.g. what an export reads), then the rest, each group widest element first,
      so every tensor starts aligned to its element size (offsets count from the data's start,
      which the header's padding puts at a multiple of 8 bytes). Widths are powers of two, so
      the lead's end is aligned to the lowest set bit of the lead entries' byte count; a rest
      entry wider than that joins the lead (the end keeps its alignment: the entry's bytes are a
      multiple of a larger power of two), and every rest entry then starts aligned. Without a
      lead the order is widest first, as before. No gaps, no extra entries: plain safetensors.
    * ``write_file`` returns the size and sha256 of the file and of its lead range, both from one
      hashing pass: the running sha256 is copied when the hashed byte count reaches the lead's
      end (a chunk spanning it is hashed in two updates). ``hash_file(path, length=n)`` hashes a
      file's first ``n`` bytes, to check a lead range without reading the rest.
    * Direct I/O (``O_DIRECT``) for files of at least ``DIRECT_MIN`` bytes when the file system
      accepts it, buffered I/O otherwise (tmpfs, small files). Buffered writes of gigabytes go
      through the page cache's dirty-page throttling (``balance_dirty_pages``): the writer is
      paused to the kernel's estimate of the disk's writeback rate and then waits again in
      ``fsync``; direct writes move each chunk from user memory to the device as ``dd
      oflag=direct`` does, with nothing left to flush.
    * An entry may be a :class:`Parts`: several 1-D tensors of one dtype written end to end as
      one tensor, so a caller never joins them into a new buffer first (a checkpoint's optimizer
      state of a shard is its pieces, one per parameter group, in place in the optimizer).
    * Writing (direct): the header and the tensors' bytes are copied, in file order, into
      ``NBUF`` 4 KiB-aligned staging buffers of ``CHUNK`` bytes (``Tensor.copy_`` releases the
      GIL). A full buffer is handed to a writer thread (``os.pwrite``) and to a hash thread
      (``hashlib`` releases the GIL) at once, while the next buffer is filled: copy, write and
      hash of consecutive chunks overlap, and the hash covers exactly the bytes written. The
      last chunk is written padded to 4 KiB and the file truncated to its size; then fsynced.
    * Writing (buffered): each tensor's bytes go to the file straight from the tensor's memory
      in chunks of ``CHUNK`` bytes, hashed in a helper thread while the next chunk is written;
      fsynced before ``write_file`` returns.
    * Reading: ``read_file`` reads a whole file into one 4 KiB-aligned buffer (direct: straight
      from the device into it), hashing chunk i in a helper thread while chunk i+1 is read, and
      faulting in the pages of chunk i+2 in another meanwhile (a direct read into never-touched
      memory faults its pages inside the read call, serialized with the transfer: two ranks
      reading at once ran at about half of ``dd``'s speed that way, at ``dd``'s with the pages
      touched); the caller compares the digest with the index before using any byte. Tensors
      are then views of that buffer (no second copy). ``hash_file`` is the same read pipeline
      into two buffers.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import struct
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Dict, Iterator, List, NamedTuple, Optional, Tuple

import torch

CHUNK = 32 << 20          # bytes per write / read call and per hash update
NBUF = 3                  # staging buffers of a direct write (copy, write and hash in flight)
ALIGN = 4096              # O_DIRECT alignment of memory, file offsets and lengths
DIRECT_MIN = 16 << 20     # smaller files are written and read through the page cache

_ST_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}
_TORCH_DTYPES = {v: k for k, v in _ST_DTYPES.items()}
_O_DIRECT = getattr(os, "O_DIRECT", 0)


def _round_up(n: int, a: int = ALIGN) -> int:
    return -(-n // a) * a


def aligned_bytes(nbytes: int) -> torch.Tensor:
    """A uint8 CPU tensor of ``nbytes`` whose first byte is 4 KiB-aligned and whose storage
    extends to the next 4 KiB boundary (a direct read may fill the whole last block)."""
    raw = torch.empty(_round_up(max(nbytes, 1)) + ALIGN, dtype=torch.uint8)
    skip = (-raw.data_ptr()) % ALIGN
    return raw[skip : skip + _round_up(max(nbytes, 1))][:nbytes]


def _mv(t: torch.Tensor) -> memoryview:
    """A writable memoryview of a contiguous uint8 CPU tensor (no copy)."""
    if t.numel() == 0:
        return memoryview(bytearray())
    return memoryview(t.numpy()).cast("B")


def _u8(t: torch.Tensor) -> torch.Tensor:
    """The bytes of a tensor as a flat contiguous uint8 CPU tensor (no copy when it already is
    contiguous on the CPU)."""
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous().reshape(-1)
    if t.numel() == 0:
        return torch.empty(0, dtype=torch.uint8)
    return t.view(torch.uint8)


class Parts:
    """One safetensors entry made of several tensors of one dtype, flattened and written end to
    end (by default a 1-D tensor of ``numel()`` elements; ``shape``: the entry's shape, whose
    elements the parts hold in row-major order). The parts are not copied or joined in memory."""

    def __init__(self, parts, shape=None):
        self.parts = [p.detach().reshape(-1) for p in parts]
        if not self.parts:
            raise ValueError("Parts needs at least one tensor")
        dtypes = {p.dtype for p in self.parts}
        if len(dtypes) != 1:
            raise TypeError(f"Parts of one entry must share a dtype, got {sorted(map(str, dtypes))}")
        self.dtype = self.parts[0].dtype
        self._numel = sum(p.numel() for p in self.parts)
        self.shape = (self._numel,) if shape is None else tuple(shape)
        if math.prod(self.shape) != self._numel:
            raise ValueError(f"Parts of {self._numel} elements cannot have shape {list(self.shape)}")

    def numel(self) -> int:
        return self._numel

    def element_size(self) -> int:
        return self.parts[0].element_size()


def _sources(t) -> List[torch.Tensor]:
    """The bytes of an entry (a tensor or :class:`Parts`) as uint8 CPU tensors, in file order."""
    return [_u8(p) for p in t.parts] if isinstance(t, Parts) else [_u8(t)]


def _bytes_of(t: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor, without copying them."""
    return _mv(_u8(t))


def _header(tensors: Dict[str, torch.Tensor], metadata: Optional[Dict[str, str]]) -> bytes:
    head: Dict[str, object] = {}
    if metadata:
        head["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    for name, t in tensors.items():
        if t.dtype not in _ST_DTYPES:
            raise TypeError(f"tensor {name!r}: dtype {t.dtype} cannot be stored in safetensors here")
        n = t.numel() * t.element_size()
        head[name] = {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    text = json.dumps(head, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


def _chunks(views: List[memoryview]) -> Iterator[memoryview]:
    for v in views:
        for start in range(0, len(v), CHUNK):
            yield v[start : start + CHUNK]


def _write_all(fd: int, data: memoryview) -> None:
    while len(data):
        n = os.write(fd, data)
        data = data[n:]


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    while len(data):
        n = os.pwrite(fd, data, offset)
        data, offset = data[n:], offset + n


def _open_direct(path: Path, flags: int) -> Optional[int]:
    """``path`` opened with ``O_DIRECT``, or None where the file system refuses it."""
    if not _O_DIRECT:
        return None
    try:
        return os.open(str(path), flags | _O_DIRECT, 0o644)
    except OSError as exc:
        if exc.errno == errno.EINVAL:  # e.g. tmpfs
            return None
        raise


class Written(NamedTuple):
    """What ``write_file`` wrote: the file's size and sha256, and those of its lead range (the
    header and the lead entries; the header alone without a ``lead``). The digests are None
    when the bytes were not hashed."""

    size: int
    sha256: Optional[str]
    lead_bytes: int
    lead_sha256: Optional[str]


class _LeadHash:
    """sha256 of a byte stream fed in order, and of its first ``mark`` bytes, in one pass."""

    def __init__(self, mark: int):
        self.h = hashlib.sha256()
        self.mark = mark
        self.seen = 0
        self.lead: Optional[str] = None

    def update(self, data) -> None:
        cut = self.mark - self.seen
        if self.lead is None and 0 <= cut <= len(data):
            self.h.update(data[:cut])
            self.lead = self.h.copy().hexdigest()
            self.h.update(data[cut:])
        else:
            self.h.update(data)
        self.seen += len(data)

    def digests(self) -> Tuple[str, Optional[str]]:
        return self.h.hexdigest(), self.lead


def _nbytes(t) -> int:
    return t.numel() * t.element_size()


def _file_order(tensors: Dict[str, "torch.Tensor | Parts"],
                lead: Optional[Callable[[str], bool]]) -> Tuple[Dict[str, "torch.Tensor | Parts"], List[str]]:
    """``tensors`` in file order (see the module note), and the names of the lead group."""
    chosen = {n for n in tensors if lead is not None and lead(n)}
    first, rest = [n for n in tensors if n in chosen], [n for n in tensors if n not in chosen]
    end = sum(_nbytes(tensors[n]) for n in first)
    if end:  # the lead ends at a multiple of its byte count's lowest set bit: wider entries join it
        joins = {n for n in rest if tensors[n].element_size() > end & -end}
        first += [n for n in rest if n in joins]
        rest = [n for n in rest if n not in joins]
    first, rest = (sorted(g, key=lambda n: -tensors[n].element_size()) for g in (first, rest))  # stable
    return {n: tensors[n] for n in first + rest}, first


def write_file(path: Path, tensors: Dict[str, "torch.Tensor | Parts"], metadata: Optional[Dict[str, str]] = None,
               fsync: bool = True, hash_bytes: bool = True, direct: Optional[bool] = None,
               lead: Optional[Callable[[str], bool]] = None) -> Written:
    """Write ``tensors`` as a safetensors file at ``path``; returns its :class:`Written` (sizes
    and sha256 of the file and of its lead range). ``lead``: the names (``lead(name)`` true)
    whose bytes come first, after the header. ``direct``: None = ``O_DIRECT`` when the file has
    at least ``DIRECT_MIN`` bytes and the file system accepts it; False = buffered. OSError
    (disk full, permissions) propagates with ``filename`` set."""
    tensors, first = _file_order(tensors, lead)
    header = _header(tensors, metadata)
    sources = [src for t in tensors.values() for src in _sources(t)]
    total = len(header) + sum(s.numel() for s in sources)
    lead_bytes = len(header) + sum(_nbytes(tensors[n]) for n in first)
    try:
        digests, done = (None, None), False
        fd = None
        if direct is not False and (direct or total >= DIRECT_MIN):
            fd = _open_direct(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        if fd is not None:
            try:
                digests = _write_direct(fd, header, sources, total, _LeadHash(lead_bytes) if hash_bytes else None)
                if fsync:
                    os.fsync(fd)
                done = True
            except OSError as exc:
                if exc.errno != errno.EINVAL:  # EINVAL: O_DIRECT opened, direct transfers refused
                    raise
            finally:
                os.close(fd)
        if not done:
            digests = _write_buffered(path, header, sources, fsync, _LeadHash(lead_bytes) if hash_bytes else None)
    except OSError as exc:
        if exc.filename is None:
            exc.filename = str(path)
        raise
    return Written(total, digests[0], lead_bytes, digests[1])


def _write_buffered(path: Path, header: bytes, sources: List[torch.Tensor], fsync: bool,
                    h: Optional[_LeadHash]) -> Tuple[Optional[str], Optional[str]]:
    """Write the file through the page cache; (sha256 of the file, of its lead range) from ``h``."""
    fd = os.open(str(path), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        _write_all(fd, memoryview(header))
        if h is not None:
            h.update(memoryview(header))
        with ThreadPoolExecutor(1, thread_name_prefix="hf_zero-hash") as pool:
            pending = None
            for chunk in _chunks([_mv(s) for s in sources]):
                if pending is not None:
                    pending.result()
                pending = pool.submit(h.update, chunk) if h is not None else None
                _write_all(fd, chunk)
            if pending is not None:
                pending.result()
        if fsync:
            os.fsync(fd)
    finally:
        os.close(fd)
    return h.digests() if h is not None else (None, None)


def _write_direct(fd: int, header: bytes, sources: List[torch.Tensor], total: int,
                  h: Optional[_LeadHash]) -> Tuple[Optional[str], Optional[str]]:
    """The direct-I/O pipeline (see the module note): fill staging buffer k while buffers k-1,
    k-2 are written and hashed (in file order, by one hash thread); returns ``h``'s digests."""
    stages = [aligned_bytes(CHUNK) for _ in range(min(NBUF, max(1, -(-total // CHUNK))))]
    views = [_mv(s) for s in stages]
    busy: List[List[Future]] = [[] for _ in stages]
    with ThreadPoolExecutor(1, thread_name_prefix="hf_zero-write") as writer, \
            ThreadPoolExecutor(1, thread_name_prefix="hf_zero-hash") as hasher:
        k, fill, offset = 0, 0, 0  # staging buffer being filled, bytes in it, file offset of it

        def emit(n: int) -> None:
            nonlocal k, fill, offset
            mv = views[k]
            if n < CHUNK:
                stages[k][n : _round_up(n)].zero_()  # the padding of the last block (truncated)
            busy[k] = [writer.submit(_pwrite_all, fd, mv[: _round_up(n)], offset)]
            if h is not None:
                busy[k].append(hasher.submit(h.update, mv[:n]))
            offset += n
            k, fill = (k + 1) % len(stages), 0
            for fut in busy[k]:  # the next buffer to fill must be written and hashed
                fut.result()
            busy[k] = []

        head = torch.frombuffer(bytearray(header), dtype=torch.uint8)
        for src in [head] + sources:
            pos, n = 0, src.numel()
            while pos < n:
                take = min(CHUNK - fill, n - pos)
                stages[k][fill : fill + take].copy_(src[pos : pos + take])
                fill, pos = fill + take, pos + take
                if fill == CHUNK:
                    emit(fill)
        if fill:
            emit(fill)
        for futs in busy:
            for fut in futs:
                fut.result()
    if offset % ALIGN:
        os.ftruncate(fd, total)
    return h.digests() if h is not None else (None, None)


def _read_into(f, out: memoryview) -> int:
    got = 0
    while got < len(out):
        n = f.readinto(out[got:])
        if not n:
            break
        got += n
    return got


def _pread_into(fd: int, out: memoryview, offset: int, expect: int) -> int:
    """Read at least ``expect`` bytes (at most ``len(out)``) into ``out`` from ``offset``, fewer
    if the file ends first. Direct: ``out`` and ``offset`` are 4 KiB-aligned and ``len(out)``
    a 4 KiB multiple; a file's data comes in whole blocks until its last one, so every call
    starts aligned."""
    got = 0
    while got < expect:
        n = os.preadv(fd, [out[got:]], offset + got)
        if not n:
            break
        got += n
    return got


class _Source:
    """A file opened for one sequential pass: direct when possible (``read(out, offset)``)."""

    def __init__(self, path: Path, size: int, direct: Optional[bool]):
        self.fd = None
        if direct is not False and (direct or size >= DIRECT_MIN):
            self.fd = _open_direct(path, os.O_RDONLY)
        self.direct = self.fd is not None
        if self.fd is None:
            self.fd = os.open(str(path), os.O_RDONLY)

    def close(self) -> None:
        os.close(self.fd)


def read_file(path: Path, hash_bytes: bool = True, direct: Optional[bool] = None) -> Tuple[torch.Tensor, Optional[str]]:
    """The whole file as a uint8 tensor, and its sha256 (hashed while it is read)."""
    try:
        return _read_file(path, hash_bytes, direct)
    except OSError as exc:
        if exc.errno != errno.EINVAL or direct is False:  # EINVAL: O_DIRECT opened, transfers refused
            raise
        return _read_file(path, hash_bytes, False)


def _read_file(path: Path, hash_bytes: bool, direct: Optional[bool]) -> Tuple[torch.Tensor, Optional[str]]:
    size = os.stat(path).st_size
    buf = aligned_bytes(size)
    raw = buf.as_strided((_round_up(max(size, 1)),), (1,))  # the last block may be filled
    whole = _mv(raw)
    h = hashlib.sha256() if hash_bytes else None
    src = _Source(Path(path), size, direct)

    def touch(at: int) -> None:  # fault in the pages of the chunk at ``at`` (see the module note)
        raw[at : at + CHUNK].zero_()

    try:
        with ThreadPoolExecutor(1, thread_name_prefix="hf_zero-hash") as pool, \
                ThreadPoolExecutor(1, thread_name_prefix="hf_zero-touch") as toucher:
            pending, pos = None, 0
            touched = toucher.submit(touch, 0)
            while pos < size:
                want = min(CHUNK, _round_up(size - pos))
                touched.result()
                touched = toucher.submit(touch, pos + CHUNK)  # the next chunk, while this one is read
                n = min(_pread_into(src.fd, whole[pos : pos + want], pos, min(CHUNK, size - pos)), size - pos)
                if pending is not None:
                    pending.result()
                if n <= 0:
                    break
                pending = pool.submit(h.update, whole[pos : pos + n]) if h is not None else None
                pos += n
            if pending is not None:
                pending.result()
    finally:
        src.close()
    if pos != size:
        buf = buf[:pos]
    return buf, (h.hexdigest() if h is not None else None)


def hash_file(path: Path, direct: Optional[bool] = None, length: Optional[int] = None) -> str:
    """sha256 of a file, or of its first ``length`` bytes (all of it when shorter), reading
    chunk i+1 while chunk i is hashed (two buffers)."""
    try:
        return _hash_file(path, direct, length)
    except OSError as exc:
        if exc.errno != errno.EINVAL or direct is False:
            raise
        return _hash_file(path, False, length)


def _hash_file(path: Path, direct: Optional[bool], length: Optional[int]) -> str:
    h = hashlib.sha256()
    size = os.stat(path).st_size
    if length is not None:
        size = min(size, length)
    bufs = [_mv(aligned_bytes(CHUNK)) for _ in range(2)]
    src = _Source(Path(path), size, direct)
    try:
        with ThreadPoolExecutor(1, thread_name_prefix="hf_zero-hash") as pool:
            pending, pos, i = None, 0, 0
            while True:
                mv = bufs[i % 2]
                # a direct read fills whole blocks: it may pass ``size``, which is not hashed
                n = min(_pread_into(src.fd, mv, pos, min(len(mv), size - pos)), size - pos)
                if pending is not None:
                    pending.result()
                if n <= 0:
                    break
                pending = pool.submit(h.update, mv[:n])
                pos, i = pos + n, i + 1
            if pending is not None:
                pending.result()
    finally:
        src.close()
    return h.hexdigest()


def map_file(path: Path) -> "LoadedFile":
    """A safetensors file mapped into memory (a private, copy-on-write mapping of the page
    cache: nothing is read until a tensor's pages are touched, nothing is ever written back),
    with :class:`LoadedFile`'s interface; its tensors are views of the mapping. For readers
    that pass bytes on without keeping them (an export): no anonymous memory, no copy."""
    size = os.stat(path).st_size
    if size == 0:
        raise ValueError(f"{path}: empty file, too short for a safetensors header")
    return LoadedFile(Path(path), torch.from_file(str(path), shared=False, size=size, dtype=torch.uint8))


class LoadedFile:
    """A safetensors file held in memory (``read_file``), with the part of ``safe_open``'s
    interface the readers use: ``keys()``, ``get_tensor(name)``, ``get_slice(name)[a:b]``."""

    def __init__(self, path: Path, data: torch.Tensor):
        self.path = path
        if data.numel() < 8:
            raise ValueError(f"{path}: {data.numel()} bytes, too short for a safetensors header")
        (n,) = struct.unpack("<Q", bytes(data[:8].numpy()))
        if 8 + n > data.numel():
            raise ValueError(f"{path}: header of {n} bytes runs past the end of the file")
        head = json.loads(bytes(data[8 : 8 + n].numpy()).decode("utf-8"))
        head.pop("__metadata__", None)
        self._data = data[8 + n :]
        self._entries = head

    def keys(self) -> List[str]:
        return list(self._entries)

    def get_tensor(self, name: str) -> torch.Tensor:
        """A copy, as ``safe_open`` gives (e.g. ``torch.set_rng_state`` needs its own storage)."""
        return self._view(name).clone()

    def get_slice(self, name: str) -> torch.Tensor:
        """A 1-D view of the buffer: slice it, then copy the slice where it belongs."""
        return self._view(name).reshape(-1)

    def _view(self, name: str) -> torch.Tensor:
        e = self._entries[name]
        start, end = e["data_offsets"]
        dtype = _TORCH_DTYPES[e["dtype"]]
        raw = self._data[start:end]
        if end - start == 0:
            return torch.empty(e["shape"], dtype=dtype)
        try:
            return raw.view(dtype).view(e["shape"])
        except RuntimeError:  # not aligned for its dtype (a writer that did not order by size)
            return raw.clone().view(dtype).view(e["shape"])
