"""Swap files changed on disk under a running job (issue 13, items 2 and 8): a truncated or
overwritten NVMe swap file fails with an error naming the file and the cause (size, checksum),
never NaN weights or ``preadv read 0 bytes``. Store level, then engine level (optimizer states
on NVMe, and stage-3 parameter shards on NVMe)."""

from __future__ import annotations

import os

import pytest
import torch

import hf_zero
from hf_zero.offload import NvmeSwapStore, SwapIntegrityError
from hf_zero.offload.nvme import ALIGN
from models import build

N = 3 * 4096 + 5  # fp32 elements: several 4 KiB blocks and a partial last one


def _values(n=N, seed=0):
    return torch.randn(n, generator=torch.Generator().manual_seed(seed))


def _overwrite(path: str, pos: int, data: bytes = b"\xff" * 64) -> None:
    """Another process's write into our file (ordinary buffered I/O, then on disk)."""
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, data, pos)
        os.fsync(fd)
    finally:
        os.close(fd)


@pytest.mark.parametrize("threads", [1, 3])
def test_overwritten_bytes_fail_naming_file_and_checksum(tmp_path, threads):
    with NvmeSwapStore(str(tmp_path), 0, {"master": 2 * N}, threads=threads, block_size=ALIGN) as store:
        store.write_from("master", _values(), 0)
        out = torch.empty(N)
        assert torch.equal(store.read_into("master", out, 0), _values())  # intact: reads back
        _overwrite(store.files["master"], 2 * ALIGN + 100)
        with pytest.raises(SwapIntegrityError) as e:
            store.read_into("master", torch.empty(N), 0)
        msg = str(e.value)
        assert store.files["master"] in msg and "checksum" in msg and "overwritten or corrupted" in msg, msg
        assert "resume from the last checkpoint" in msg
        store.write_from("master", _values(seed=1), 0)  # a new write is the new truth
        assert torch.equal(store.read_into("master", out, 0), _values(seed=1))


def test_truncated_file_fails_naming_file_and_sizes(tmp_path):
    with NvmeSwapStore(str(tmp_path), 0, {"exp_avg": N}) as store:
        store.write_from("exp_avg", _values(), 0)
        size = os.path.getsize(store.files["exp_avg"])
        os.truncate(store.files["exp_avg"], 0)
        with pytest.raises(SwapIntegrityError) as e:
            store.read_into("exp_avg", torch.empty(N), 0)
        msg = str(e.value)
        assert store.files["exp_avg"] in msg and "truncated" in msg and f"{size:,}" in msg, msg
        assert "preadv" not in msg


def test_regions_rewritten_with_another_layout_are_checked_against_the_last_write(tmp_path):
    """A range's checksum is always the last write's, whatever the earlier spans were."""
    with NvmeSwapStore(str(tmp_path), 0, {"k": 4 * N}, threads=4, block_size=ALIGN) as store:
        store.write_from("k", _values(4 * N), 0)            # 4 spans
        store.write_from("k", _values(N, seed=2), 0)        # overlaps the first spans, other layout
        assert torch.equal(store.read_into("k", torch.empty(N), 0), _values(N, seed=2))
        whole = store.read_into("k", torch.empty(4 * N), 0)  # other spans: not checked, still read
        assert torch.equal(whole[:N], _values(N, seed=2))


def test_checksums_off_reads_whatever_is_there(tmp_path):
    with NvmeSwapStore(str(tmp_path), 0, {"k": N}, checksums=False) as store:
        store.write_from("k", _values(), 0)
        _overwrite(store.files["k"], 0, b"\0" * 8)
        got = store.read_into("k", torch.empty(N), 0)
        assert torch.equal(got[2:], _values()[2:]) and not torch.equal(got, _values())


def _engine(tmp_path, zo):
    cfg = {"train_micro_batch_size_per_gpu": 2, "zero_optimization": zo,
           "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}}
    return hf_zero.initialize(model=build("llama"), config=cfg)[0]


def _step(engine, seed=0):
    ids = torch.randint(0, 96, (2, 8), generator=torch.Generator().manual_seed(seed))
    loss = engine(input_ids=ids, labels=ids).loss
    engine.backward(loss)
    engine.step()


def _weights(engine):
    return {k: v.clone() for k, v in engine.full_state_dict().items()}


@pytest.mark.parametrize("fault", ["overwrite", "truncate"])
def test_engine_optimizer_swap_fault_is_named_and_weights_stay_finite(tmp_path, fault):
    engine = _engine(tmp_path, {"stage": 2, "offload_optimizer": {"device": "nvme", "nvme_path": str(tmp_path)}})
    try:
        _step(engine)
        before = _weights(engine)
        path = engine.host.store.files["exp_avg"]
        if fault == "overwrite":
            _overwrite(path, 0, os.urandom(4096))
        else:
            os.truncate(path, 4096)
        with pytest.raises(SwapIntegrityError) as e:
            _step(engine, seed=1)
        assert path in str(e.value), str(e.value)
        assert ("checksum" if fault == "overwrite" else "truncated") in str(e.value)
        after = engine.module.state_dict()
        assert all(torch.isfinite(v).all() for v in after.values())
        assert set(after) == set(before)
    finally:
        engine.destroy()


def test_engine_parameter_swap_overwritten_is_named_not_nan(tmp_path):
    engine = _engine(tmp_path, {"stage": 3, "offload_optimizer": {"device": "cpu"},
                                "offload_param": {"device": "nvme", "nvme_path": str(tmp_path),
                                                  "buffer_count": 2}})
    try:
        _step(engine)
        swap = engine.param_swap
        swap.flush()  # every write landed; read ahead holds one unit, the others are only on disk
        region = max(i for i in range(len(swap.offsets)) if i not in swap._held)
        path = swap.store.files["param"]
        _overwrite(path, swap.offsets[region] * 4, b"\xff" * 4096)  # NaN bit patterns
        with pytest.raises(SwapIntegrityError) as e:
            _step(engine, seed=1)
        assert path in str(e.value) and "checksum" in str(e.value), str(e.value)
    finally:
        engine.destroy()
