"""fastio: safetensors files written and read with O_DIRECT (staging buffers, the last block
padded and truncated) or buffered are the same bytes, readable by ``safe_open``, and the sha256
computed on the fly is hashlib's of the file on disk."""

from __future__ import annotations

import hashlib
import os

import pytest
import torch
from safetensors import safe_open

from hf_zero.checkpoint import fastio


def _tensors(n: int) -> dict:
    g = torch.Generator().manual_seed(n)
    return {"a": torch.randn(n, generator=g), "b": torch.arange(7, dtype=torch.int64),
            "c": torch.randn(n // 3 + 5, generator=g).half(), "e": torch.empty(0), "m": torch.randn(3, 5, generator=g)}


def _direct_ok(d) -> bool:
    fd = fastio._open_direct(d / "probe", os.O_WRONLY | os.O_CREAT)
    if fd is None:
        return False
    os.close(fd)
    return True


# sizes around the staging buffer: empty-ish, below a block, 3 chunks and a tail, exact chunks
@pytest.mark.parametrize("n", [1, 1023, (3 * fastio.CHUNK + 4100) // 4, 2 * fastio.CHUNK // 4 - 20])
def test_direct_and_buffered_write_the_same_file(tmp_path, n, monkeypatch):
    if not _direct_ok(tmp_path):
        pytest.skip(f"{tmp_path}: the file system refuses O_DIRECT")
    ts = _tensors(n)
    size_b, sha_b = fastio.write_file(tmp_path / "b.st", ts, metadata={"k": "v"}, direct=False)

    def no_buffered(*a, **k):
        raise AssertionError("the direct write fell back to buffered")

    monkeypatch.setattr(fastio, "_write_buffered", no_buffered)
    size_d, sha_d = fastio.write_file(tmp_path / "d.st", ts, metadata={"k": "v"}, direct=True)
    raw = (tmp_path / "d.st").read_bytes()
    assert raw == (tmp_path / "b.st").read_bytes()
    assert size_d == size_b == len(raw) and sha_d == sha_b == hashlib.sha256(raw).hexdigest()
    with safe_open(str(tmp_path / "d.st"), "pt") as f:
        for k, v in ts.items():
            assert torch.equal(f.get_tensor(k), v), k
    for direct in (True, False):
        buf, sha = fastio.read_file(tmp_path / "d.st", direct=direct)
        assert bytes(buf.numpy()) == raw and sha == sha_d
        assert fastio.hash_file(tmp_path / "d.st", direct=direct) == sha_d
        loaded = fastio.LoadedFile(tmp_path / "d.st", buf)
        for k, v in ts.items():
            assert torch.equal(loaded.get_tensor(k), v), k


def test_direct_buffers_are_aligned_and_large_files_go_direct(tmp_path, monkeypatch):
    b = fastio.aligned_bytes(5000)
    assert b.data_ptr() % fastio.ALIGN == 0 and b.numel() == 5000
    if not _direct_ok(tmp_path):
        pytest.skip(f"{tmp_path}: the file system refuses O_DIRECT")
    opened = []
    real = fastio._open_direct
    monkeypatch.setattr(fastio, "_open_direct", lambda p, fl: opened.append(p) or real(p, fl))
    monkeypatch.setattr(fastio, "DIRECT_MIN", 1 << 20)
    fastio.write_file(tmp_path / "small.st", {"x": torch.zeros(1000)})
    fastio.write_file(tmp_path / "big.st", {"x": torch.zeros(1 << 19)})
    assert opened == [tmp_path / "big.st"]  # the default: direct from DIRECT_MIN bytes on


@pytest.mark.parametrize("direct", [False, None])
def test_parts_are_written_as_the_joined_tensor(tmp_path, direct):
    """An entry given as Parts (a shard's optimizer state as its pieces in place, zeros for the
    padding) is the same file, byte for byte, as the joined tensor written plainly."""
    g = torch.Generator().manual_seed(0)
    pieces = [torch.randn(fastio.CHUNK // 4 + 17, generator=g), torch.zeros(3), torch.randn(1000, generator=g)]
    other = {"z": torch.arange(5, dtype=torch.int64)}
    size_j, sha_j = fastio.write_file(tmp_path / "joined.st", {"s": torch.cat(pieces), **other}, direct=direct)
    size_p, sha_p = fastio.write_file(tmp_path / "parts.st", {"s": fastio.Parts(pieces), **other}, direct=direct)
    assert (size_p, sha_p) == (size_j, sha_j)
    assert (tmp_path / "parts.st").read_bytes() == (tmp_path / "joined.st").read_bytes()
    with safe_open(str(tmp_path / "parts.st"), framework="pt") as f:
        assert torch.equal(f.get_tensor("s"), torch.cat(pieces))
    with pytest.raises(TypeError, match="share a dtype"):
        fastio.Parts([torch.zeros(2), torch.zeros(2, dtype=torch.float16)])
