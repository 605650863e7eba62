"""Stage-3 parameter shards in NVMe swap files (hf_zero.offload.param_swap): values read back as
written, reads never see a stale shard, read-ahead stays within its budget, files go away."""

from __future__ import annotations

import pytest
import torch

import hf_zero
from hf_zero.engine.flat import FlatParam
from hf_zero.offload.param_swap import ParamSwap
from models import batches, build


def _flat(numel: int, dtype=torch.bfloat16, seed: int = 0) -> FlatParam:
    g = torch.Generator().manual_seed(seed)
    p = torch.nn.Parameter(torch.randn(numel, generator=g).to(dtype), requires_grad=False)
    return FlatParam([p], ["w"], dtype=dtype, device=torch.device("cpu"), shard_rank=0, shard_world=1,
                     sharded=True)


def _swap(tmp_path, flats, unit_of=None, buffer_count=2):
    sizes = [(f.shard_numel, f.dtype) for f in flats]
    swap = ParamSwap(sizes, unit_of or list(range(len(flats))), nvme_path=str(tmp_path), rank=0,
                     buffer_count=buffer_count, block_size=8192, threads=2)
    expected = []
    for f in flats:
        expected.append(f.shard.clone())
        swap.adopt(f)
    return swap, expected


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_adopted_shards_read_back_exactly_and_leave_ram(tmp_path, dtype):
    flats = [_flat(n, dtype, seed=i) for i, n in enumerate((48, 5000, 16))]
    swap, expected = _swap(tmp_path, flats)
    assert all(f.shard is None and f.full.untyped_storage().nbytes() == 0 for f in flats)
    for f, want in zip(flats, expected):
        got = swap.acquire(f)
        assert got.dtype == dtype and torch.equal(got, want)
        swap.release(f)
    assert swap.nvme_bytes == sum(f.shard_numel * f.full.element_size() for f in flats)
    swap.close()
    assert list(tmp_path.iterdir()) == []


def test_a_write_is_what_the_next_read_sees_even_after_a_prefetch(tmp_path):
    flats = [_flat(4096, seed=i) for i in range(3)]
    swap, expected = _swap(tmp_path, flats, buffer_count=3)
    swap.prefetch(flats)                       # old values in flight or held
    new = torch.full((4096,), 3.5, dtype=torch.bfloat16)
    swap.write(flats[1], new)
    new.fill_(-1.0)                             # write copied its input: later changes do not leak
    assert torch.equal(swap.acquire(flats[1]), torch.full((4096,), 3.5, dtype=torch.bfloat16))
    assert torch.equal(swap.read(flats[0]), expected[0])
    swap.close()


def test_read_ahead_stays_within_its_budget(tmp_path):
    # six units of one 8 KiB flat each; buffer_count=2 -> two units' bytes of read-ahead at most
    flats = [_flat(4096, seed=i) for i in range(6)]
    swap, expected = _swap(tmp_path, flats, buffer_count=2)
    reads = swap.reads
    swap.prefetch(flats)
    assert swap.reads - reads == 2
    for f, want in zip(flats, expected):        # a demand read is never refused
        assert torch.equal(swap.acquire(f), want)
    assert swap.prefetch_hits == 2
    for f in flats:
        swap.release(f)
    assert swap.host_bytes() == 6 * 4096 * 2  # buffers are kept for reuse, none leaked
    swap.prefetch(flats[:2])                  # reuse: no new buffer
    assert swap.host_bytes() == 6 * 4096 * 2
    swap.close()


def test_planned_sizes_must_match(tmp_path):
    swap = ParamSwap([(32, torch.bfloat16)], [0], nvme_path=str(tmp_path), rank=0)
    with pytest.raises(ValueError, match="differs"):
        swap.adopt(_flat(64))
    swap.close()


def test_engine_keeps_parameter_shards_on_nvme(tmp_path):
    """Engine level: shards leave RAM, the report counts them on disk, the host buffers stay
    within the read-ahead budget plus the units being gathered, and the files go at destroy."""
    model = build("llama")
    cfg = {"train_micro_batch_size_per_gpu": 2, "bf16": {"enabled": True},
           "zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"},
                                 "offload_param": {"device": "nvme", "nvme_path": str(tmp_path),
                                                   "buffer_count": 2}},
           "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}}
    engine = hf_zero.initialize(model=model, config=cfg)[0]
    flats = [f for u in engine.units for f in u.flats]
    assert all(f.shard is None for f in flats)
    assert len(list(tmp_path.iterdir())) == 1
    for step in batches(2, 1, 1):
        loss = engine(**step[0][0]).loss
        engine.backward(loss)
        engine.step()
    report = engine.memory_report()
    shard_bytes = sum(f.shard_numel * 2 for f in flats)
    assert report["param_nvme_bytes"] == shard_bytes
    unit_bytes = max(sum(f.shard_numel * 2 for f in u.flats) for u in engine.units)
    assert 0 < report["param_host_buffer_bytes"] <= (2 + 2) * unit_bytes
    assert engine.param_swap.prefetch_hits > 0
    engine.destroy()
    assert list(tmp_path.iterdir()) == []


def test_engine_refuses_a_swap_directory_without_room_before_any_step(tmp_path, monkeypatch):
    """Too little free space for the parameter files: a clear error from initialize, no file left."""
    import hf_zero.offload.nvme as nvme
    from hf_zero.offload.nvme import OffloadError

    monkeypatch.setattr(nvme, "_free_bytes", lambda path: 1 << 20)  # 1 MiB free
    cfg = {"train_micro_batch_size_per_gpu": 2,
           "zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"},
                                 "offload_param": {"device": "nvme", "nvme_path": str(tmp_path)}},
           "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}}
    with pytest.raises(OffloadError, match="too little free space") as e:
        hf_zero.initialize(model=build("llama"), config=cfg)
    assert str(tmp_path) in str(e.value) and "Fix:" in str(e.value)
    assert list(tmp_path.iterdir()) == []
