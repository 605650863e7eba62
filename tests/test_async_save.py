"""Asynchronous checkpoint save: the files equal a synchronous save of the same state, training
after the snapshot does not leak into them, a crash during the background write leaves the
previous checkpoint as ``latest`` (and it resumes at another world size), failures are raised.
Real gloo processes."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
import torch

import hf_zero
import hf_zero.checkpoint.sharded as sharded
from hf_zero.checkpoint import CheckpointError
from hf_zero.checkpoint.format import Index, resolve_tag
from launch import launch
from models import build, grouped_params


def _files(d: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


@pytest.mark.parametrize("stage", [2, 3])
def test_async_equals_sync_and_training_does_not_leak(tmp_path, stage):
    sync, asyn = tmp_path / "sync", tmp_path / "async"
    out = launch(2, "async_scenarios:compare", {"stage": stage, "sync": str(sync), "async": str(asyn), "delay": 1.0},
                 tmp_path / "run")
    # the write was held back 1 s: the call returned long before, and nothing was published early
    assert all(o["blocked"] < 1.0 and not o["published_early"] for o in out), out
    for tag in ("t2", "t4"):  # byte for byte: rank files (tensors, RNG) and index (steps, scheduler, hashes)
        assert _files(asyn / tag) == _files(sync / tag), tag
        Index.read(asyn / tag).check_files()
    assert (asyn / "latest").read_text() == "t4"
    assert sorted(p.name for p in asyn.iterdir()) == ["latest", "t2", "t4"]  # no partial dir, no marker


def test_crash_during_background_write_keeps_previous_latest(tmp_path):
    save = tmp_path / "save"
    with pytest.raises(AssertionError, match=r"failed on rank\(s\) \[\(0, -9\)\]"):
        launch(2, "async_scenarios:crash", {"stage": 2, "save": str(save), "kill_rank": 0}, tmp_path / "crash")
    # rank 0 died after writing its file for global_step3: that checkpoint was never published
    assert (save / "latest").read_text() == "global_step2"
    assert not (save / "global_step3").exists()
    Index.read(resolve_tag(save, None)).check_files()
    # the asynchronous checkpoint resumes at another world size and stage, and training matches
    # a run that never stopped (the same global batch split differently: summation order only)
    full = launch(2, "checkpoint_scenarios:train", {"stage": 2, "start": 0, "stop": 4}, tmp_path / "full")[0]
    resumed = launch(1, "checkpoint_scenarios:train", {"stage": 1, "start": 2, "stop": 4, "load": str(save)},
                     tmp_path / "resume")[0]
    assert resumed["loaded"].endswith("global_step2")
    assert resumed["losses"] == pytest.approx(full["losses"][2:], abs=2e-5)
    assert resumed["lr"] == full["lr"]


def test_background_failure_raises_at_next_save_on_every_rank(tmp_path):
    save = tmp_path / "save"
    out = launch(2, "async_scenarios:failure", {"stage": 2, "save": str(save), "fail_rank": 1}, tmp_path / "run")
    for o in out:
        msg = o["at_save"]
        assert msg and msg.startswith("CheckpointError") and "rank 1" in msg and "No space left on device" in msg, msg
        assert "rank00001-of-00002.safetensors" in msg, msg
        assert o["latest"] == "good" and o["entries"] == ["good", "latest"], o  # partial removed
        assert o["latest_final"] == "next"


def _engine():
    model = build("llama")
    opt = torch.optim.AdamW(grouped_params(model), lr=1e-2)
    engine, *_ = hf_zero.initialize(model=model, optimizer=opt, config={
        "train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": 2}, "hf_zero": {"async_save": True}})
    return engine


def _step(engine):
    ids = torch.arange(24).view(2, 12) % 96
    engine.backward(engine(input_ids=ids, labels=ids).loss)
    engine.step()


def test_failure_is_raised_at_the_next_step_and_destroy_waits(tmp_path, monkeypatch):
    engine = _engine()
    _step(engine)
    engine.save_checkpoint(tmp_path / "ok")  # the config's async_save: true
    assert engine._pending_save is not None
    engine.wait_for_checkpoint()
    assert (tmp_path / "ok" / "latest").read_text() == "global_step1"

    def full_disk(path, tensors):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(sharded, "_write_rank_file", full_disk)
    engine.save_checkpoint(tmp_path / "ok", tag="bad")
    engine._pending_save.thread.join()
    ids = torch.arange(24).view(2, 12) % 96
    engine.backward(engine(input_ids=ids, labels=ids).loss)
    with pytest.raises(CheckpointError, match="No space left on device"):
        engine.step()  # raised before the step runs ...
    engine.step()  # ... once
    with pytest.raises(CheckpointError, match="asynchronous save"):
        engine.save_checkpoint(tmp_path / "ok", tag="next")  # and agreed at the next save
    assert (tmp_path / "ok" / "latest").read_text() == "global_step1"
    monkeypatch.undo()
    engine.save_checkpoint(tmp_path / "ok", tag="last")
    engine.destroy()  # waits for the pending write
    assert (tmp_path / "ok" / "latest").read_text() == "last"
    Index.read(tmp_path / "ok" / "last").check_files()
