"""Safetensors files written and read in one pass, their sha256 computed on the fly.

Note:
    * The files are plain safetensors (8-byte little-endian header length, a JSON header padded
      with spaces to a multiple of 8 bytes, then the tensors' bytes back to back in header
      order), so ``safetensors.safe_open`` reads them; the sha256 is that of the whole file, as
      ``format.sha256_of`` computes it: the index format is unchanged.
    * Writing: every tensor's bytes go to the file straight from the tensor's memory in chunks
      of ``CHUNK`` bytes (no serialized copy of the file); while chunk i is written (``os.write``
      releases the GIL) a helper thread hashes it (``hashlib`` releases the GIL too), so hashing
      costs no pass of its own. The file is fsynced before ``write_file`` returns.
    * Reading: ``read_file`` reads a whole file into one buffer with ``readinto``, hashing chunk
      i in a helper thread while chunk i+1 is read; the caller compares the digest with the
      index before using any byte. Tensors are then views of that buffer (no second copy).
    * ``hash_file`` is the same read pipeline without keeping the bytes.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

import torch

CHUNK = 32 << 20

_ST_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}
_TORCH_DTYPES = {v: k for k, v in _ST_DTYPES.items()}


def _bytes_of(t: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor, without copying them."""
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous().reshape(-1)
    if t.numel() == 0:
        return memoryview(b"")
    return memoryview(t.view(torch.uint8).numpy()).cast("B")


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


def write_file(path: Path, tensors: Dict[str, torch.Tensor], metadata: Optional[Dict[str, str]] = None,
               fsync: bool = True, hash_bytes: bool = True) -> Tuple[int, Optional[str]]:
    """Write ``tensors`` as a safetensors file at ``path``; returns (size in bytes, sha256 hex or
    None). OSError (disk full, permissions) propagates with ``filename`` set."""
    # widest elements first: every tensor then starts aligned to its element size
    tensors = dict(sorted(tensors.items(), key=lambda kv: -kv[1].element_size()))
    header = _header(tensors, metadata)
    views = [_bytes_of(t) for t in tensors.values()]
    h = hashlib.sha256() if hash_bytes else None
    size = len(header)
    fd = os.open(str(path), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        try:
            _write_all(fd, memoryview(header))
            if h is not None:
                h.update(header)
            with ThreadPoolExecutor(1, thread_name_prefix="hf_zero-hash") as pool:
                pending = None
                for chunk in _chunks(views):
                    if pending is not None:
                        pending.result()
                    pending = pool.submit(h.update, chunk) if h is not None else None
                    _write_all(fd, chunk)
                    size += len(chunk)
                if pending is not None:
                    pending.result()
            if fsync:
                os.fsync(fd)
        except OSError as exc:
            if exc.filename is None:
                exc.filename = str(path)
            raise
    finally:
        os.close(fd)
    return size, (h.hexdigest() if h is not None else None)


def _read_into(f, out: memoryview) -> int:
    got = 0
    while got < len(out):
        n = f.readinto(out[got:])
        if not n:
            break
        got += n
    return got


def read_file(path: Path, hash_bytes: bool = True) -> Tuple[torch.Tensor, Optional[str]]:
    """The whole file as a uint8 tensor, and its sha256 (hashed while it is read)."""
    size = os.stat(path).st_size
    buf = torch.empty(size, dtype=torch.uint8)
    view = memoryview(buf.numpy()).cast("B") if size else memoryview(bytearray())
    h = hashlib.sha256() if hash_bytes else None
    with open(path, "rb", buffering=0) as f, ThreadPoolExecutor(1, thread_name_prefix="hf_zero-hash") as pool:
        pending = None
        pos = 0
        while pos < size:
            chunk = view[pos : min(size, pos + CHUNK)]
            n = _read_into(f, chunk)
            if pending is not None:
                pending.result()
            if n == 0:
                break
            pending = pool.submit(h.update, chunk[:n]) if h is not None else None
            pos += n
        if pending is not None:
            pending.result()
    if pos != size:
        buf = buf[:pos]
    return buf, (h.hexdigest() if h is not None else None)


def hash_file(path: Path) -> str:
    """sha256 of a file, reading chunk i+1 while chunk i is hashed (two buffers)."""
    h = hashlib.sha256()
    bufs = [bytearray(CHUNK), bytearray(CHUNK)]
    with open(path, "rb", buffering=0) as f, ThreadPoolExecutor(1, thread_name_prefix="hf_zero-hash") as pool:
        pending = None
        i = 0
        while True:
            mv = memoryview(bufs[i % 2])
            n = _read_into(f, mv)
            if pending is not None:
                pending.result()
            if n == 0:
                break
            pending = pool.submit(h.update, mv[:n])
            i += 1
        if pending is not None:
            pending.result()
    return h.hexdigest()


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
