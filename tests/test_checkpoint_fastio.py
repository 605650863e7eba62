"""fastio: safetensors files written and read with O_DIRECT (staging buffers, the last block
padded and truncated) or buffered are the same bytes, readable by ``safe_open``, and the sha256
computed on the fly is hashlib's of the file on disk."""

from __future__ import annotations

import hashlib
import json
import os
import struct

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
    size_b, sha_b, head_b, head_sha_b = fastio.write_file(tmp_path / "b.st", ts, metadata={"k": "v"}, direct=False)

    def no_buffered(*a, **k):
        raise AssertionError("the direct write fell back to buffered")

    monkeypatch.setattr(fastio, "_write_buffered", no_buffered)
    size_d, sha_d, head_d, head_sha_d = fastio.write_file(tmp_path / "d.st", ts, metadata={"k": "v"}, direct=True)
    raw = (tmp_path / "d.st").read_bytes()
    assert raw == (tmp_path / "b.st").read_bytes()
    assert size_d == size_b == len(raw) and sha_d == sha_b == hashlib.sha256(raw).hexdigest()
    # no lead: the lead range is the header alone
    assert head_d == head_b == 8 + int.from_bytes(raw[:8], "little")
    assert head_sha_d == head_sha_b == hashlib.sha256(raw[:head_d]).hexdigest()
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
    joined = fastio.write_file(tmp_path / "joined.st", {"s": torch.cat(pieces), **other}, direct=direct)
    parts = fastio.write_file(tmp_path / "parts.st", {"s": fastio.Parts(pieces), **other}, direct=direct)
    assert parts == joined
    assert (tmp_path / "parts.st").read_bytes() == (tmp_path / "joined.st").read_bytes()
    with safe_open(str(tmp_path / "parts.st"), framework="pt") as f:
        assert torch.equal(f.get_tensor("s"), torch.cat(pieces))
    with pytest.raises(TypeError, match="share a dtype"):
        fastio.Parts([torch.zeros(2), torch.zeros(2, dtype=torch.float16)])
    # a shaped entry (an export's parameter spanning two rank files): the joined elements in
    # row-major order, under the given shape
    shaped = fastio.Parts([torch.arange(4.0), torch.arange(4.0, 6.0)], shape=(2, 3))
    assert shaped.numel() == 6 and shaped.shape == (2, 3)
    fastio.write_file(tmp_path / "shaped.st", {"w": shaped}, direct=direct)
    with safe_open(str(tmp_path / "shaped.st"), framework="pt") as f:
        assert torch.equal(f.get_tensor("w"), torch.arange(6.0).view(2, 3))
    with pytest.raises(ValueError, match="cannot have shape"):
        fastio.Parts([torch.zeros(5)], shape=(2, 3))


def _layout(raw: bytes):
    """(data start, {name: (dtype, start, end)} in file order) of a safetensors file's bytes."""
    (n,) = struct.unpack("<Q", raw[:8])
    head = json.loads(raw[8 : 8 + n])
    head.pop("__metadata__", None)
    entries = {k: (v["dtype"], *v["data_offsets"]) for k, v in head.items()}
    return 8 + n, dict(sorted(entries.items(), key=lambda kv: kv[1][1]))


_WIDTH = {"F64": 8, "F32": 4, "BF16": 2, "U8": 1}


def _export_like(bf16_numel: int) -> dict:
    """A rank file's kinds of entries in mixed widths, the export's (lead) ones first by name:
    masters (fp32, several chunks), a frozen bf16 param, a uint8 buffer; then optimizer states
    (fp32, and a float64 one, wider than the lead's bf16), RNG bytes."""
    g = torch.Generator().manual_seed(bf16_numel)
    return {"rng.torch": torch.randint(0, 255, (37,), dtype=torch.uint8, generator=g),
            "u0.f0.state.exp_avg": torch.randn(5000, generator=g),
            "u0.f0.state.wide": torch.randn(301, generator=g).double(),
            "u0.f0.master": torch.randn(5000, generator=g),
            "u0.f1.param": torch.randn(bf16_numel, generator=g).bfloat16(),
            "buffer.mask": torch.randint(0, 2, (24,), dtype=torch.uint8, generator=g),
            "u0.f2.master": fastio.Parts([torch.randn(7, generator=g), torch.zeros(9)])}


def _is_lead(name: str) -> bool:
    return name.endswith((".master", ".param")) or name.startswith("buffer.")


# 333 bf16 elements: the lead's bytes end 2-aligned, so the fp32 and fp64 states join the lead;
# 1000: it ends 8-aligned, and the fp64 state stays behind it though wider than the bf16 param
@pytest.mark.parametrize("bf16_numel,joined", [(333, {"u0.f0.state.exp_avg", "u0.f0.state.wide"}), (1000, set())])
@pytest.mark.parametrize("direct", [True, False])
def test_lead_range_digest_is_that_of_the_leading_bytes(tmp_path, monkeypatch, bf16_numel, joined, direct):
    """The lead entries (and the wider entries that must join them) come first; the digest of
    the leading bytes, taken in the same hashing pass, is hashlib's of the file's first
    ``lead_bytes`` bytes as read back from disk, with a lead boundary inside a chunk of the
    pipeline (CHUNK shrunk to one block); every tensor is aligned and reads back equal."""
    if direct and not _direct_ok(tmp_path):
        pytest.skip(f"{tmp_path}: the file system refuses O_DIRECT")
    monkeypatch.setattr(fastio, "CHUNK", fastio.ALIGN)
    if direct:
        monkeypatch.setattr(fastio, "_write_buffered", lambda *a, **k: pytest.fail("direct write fell back"))
    ts = _export_like(bf16_numel)
    w = fastio.write_file(tmp_path / "f.st", ts, metadata={"format": "x"}, direct=direct, lead=_is_lead)
    raw = (tmp_path / "f.st").read_bytes()
    assert w.size == len(raw) and w.sha256 == hashlib.sha256(raw).hexdigest()
    assert w.lead_sha256 == hashlib.sha256(raw[: w.lead_bytes]).hexdigest()
    assert w.lead_bytes % fastio.CHUNK and w.lead_bytes < len(raw)  # the boundary falls inside a chunk

    data, entries = _layout(raw)
    lead = {k for k in ts if _is_lead(k)} | joined
    nbytes = lambda t: t.numel() * t.element_size()  # noqa: E731
    assert w.lead_bytes == data + sum(nbytes(ts[k]) for k in lead)
    assert set(list(entries)[: len(lead)]) == lead  # the lead group first, then the rest
    pos = 0
    for name, (dtype, start, end) in entries.items():
        assert start == pos and start % _WIDTH[dtype] == 0, (name, start)  # no gap, aligned
        pos = end
    assert data + pos == len(raw)
    widths = [_WIDTH[d] for k, (d, _, _) in entries.items() if k in lead]
    assert widths == sorted(widths, reverse=True)  # each group widest first
    with safe_open(str(tmp_path / "f.st"), "pt") as f:
        assert set(f.keys()) == set(ts)
        for k, v in ts.items():
            want = torch.cat(v.parts) if isinstance(v, fastio.Parts) else v
            assert torch.equal(f.get_tensor(k), want), k
    for d in (True, False) if direct else (False,):
        assert fastio.hash_file(tmp_path / "f.st", direct=d, length=w.lead_bytes) == w.lead_sha256
        assert fastio.hash_file(tmp_path / "f.st", direct=d, length=len(raw) + 5) == w.sha256


def test_map_file_gives_views_of_a_private_mapping(tmp_path):
    """``map_file``: the tensors are views of the mapping (no copy), equal to what safe_open
    reads, and writing into one never reaches the file."""
    g = torch.Generator().manual_seed(1)
    tensors = {"a": torch.randn(3, 5, generator=g), "b": torch.arange(7, dtype=torch.int64)}
    fastio.write_file(tmp_path / "m.st", tensors, direct=False)
    before = (tmp_path / "m.st").read_bytes()
    mapped = fastio.map_file(tmp_path / "m.st")
    a = mapped.get_slice("a")
    assert torch.equal(a, tensors["a"].reshape(-1)) and torch.equal(mapped.get_tensor("b"), tensors["b"])
    assert mapped.get_slice("a").data_ptr() == a.data_ptr()  # the same bytes twice: a view
    a.zero_()
    assert (tmp_path / "m.st").read_bytes() == before
    (tmp_path / "empty.st").write_bytes(b"")
    with pytest.raises(ValueError, match="empty file"):
        fastio.map_file(tmp_path / "empty.st")
