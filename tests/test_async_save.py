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


def _tensors(d: Path, rank: int) -> dict:
    from safetensors.torch import load_file

    return load_file(str(d / f"rank{rank:05d}-of-00002.safetensors"))


def _unstaged_bytes(d: Path, rank: int) -> int:
    """The bytes of a rank file's tensors that a snapshot makes new each time: the RNG states."""
    return sum(t.numel() * t.element_size() for k, t in _tensors(d, rank).items() if k.startswith("rng."))


@pytest.mark.parametrize("stage,keep", [(2, True), (3, True), (3, None)])
def test_async_equals_sync_and_training_does_not_leak(tmp_path, stage, keep):
    """``keep``: hf_zero.async_save_keep_staging (None: the default, which on the CPU does not
    keep the snapshot's memory)."""
    sync, asyn = tmp_path / "sync", tmp_path / "async"
    payload = {"stage": stage, "sync": str(sync), "async": str(asyn), "delay": 1.0,
               "config_extra": {"hf_zero": {"async_save_keep_staging": keep}}}
    keep = bool(keep)
    out = launch(2, "async_scenarios:compare", payload, tmp_path / "run")
    # the write was held back 1 s: the call returned long before, and nothing was published early
    assert all(o["blocked"] < 1.0 and not o["published_early"] for o in out), out
    # the second snapshot went into the first one's memory (kept while t2 was being written, so
    # the byte-for-byte comparison below also shows t4's snapshot did not overwrite t2's write),
    # and that memory is the size of the tensors of the rank's file; a load and destroy() release it
    for rank, o in enumerate(out):
        assert o["staging_reused"] is keep and o["staging_after_destroy"] is False and o["staging_after_load"] is False
        tensors_bytes = sum(t.numel() * t.element_size() for t in _tensors(asyn / "t2", rank).values())
        assert o["staging_bytes"] == (tensors_bytes - _unstaged_bytes(asyn / "t2", rank) if keep else 0)
    for tag in ("t2", "t4"):  # byte for byte: rank files (tensors, RNG) and index (steps, scheduler, hashes)
        assert _files(asyn / tag) == _files(sync / tag), tag
        Index.read(asyn / tag).check_files()
    assert (asyn / "latest").read_text() == "t5"
    assert sorted(p.name for p in asyn.iterdir()) == ["latest", "t2", "t4", "t5"]  # no partial dir, no marker


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


@pytest.mark.slow
def test_trainer_async_save_rotates_safely_and_resumes(tmp_path):
    """ZeroTrainer with ``hf_zero.async_save``, save_steps 2, save_total_limit 1: each save
    returns while its write is in flight (held back 5 s) and training goes on with the losses of
    a synchronous run; rotation keeps the previous complete checkpoint while the newest is
    written; ``resume_from_checkpoint=True`` continues the curve; the checkpoint equals the
    synchronous run's byte for byte."""
    S = "async_scenarios:trainer_async"
    sync = launch(2, S, {"stage": 3, "async": False, "output_dir": str(tmp_path / "sync")}, tmp_path / "l1")[0]
    first = launch(2, S, {"stage": 3, "async": True, "stop_at": 4, "delay": 5.0, "output_dir": str(tmp_path / "a")},
                   tmp_path / "l2")[0]
    rest = launch(2, S, {"stage": 3, "async": True, "resume": True, "output_dir": str(tmp_path / "a")},
                  tmp_path / "l3")[0]
    assert [s["in_flight"] for s in sync["saves"]] == [False, False, False]
    assert [s["in_flight"] for s in first["saves"]] == [True, True]
    for step in (1, 2, 3, 4):
        assert first["losses"][str(step)] == sync["losses"][str(step)]
    for step in (5, 6):
        assert rest["losses"][str(step)] == sync["losses"][str(step)]
    # the synchronous run keeps 1 folder; the async one keeps the complete previous one as well
    assert [s["folders"] for s in sync["saves"]] == [["checkpoint-2"], ["checkpoint-4"], ["checkpoint-6"]]
    assert [s["folders"] for s in first["saves"]] == [["checkpoint-2"], ["checkpoint-2", "checkpoint-4"]]
    assert [s["folders"] for s in rest["saves"]] == [["checkpoint-4", "checkpoint-6"]]
    assert first["folders"] == ["checkpoint-4"] and rest["folders"] == ["checkpoint-6"]  # limit applied at the end
    assert not first["pending_after_train"] and not rest["pending_after_train"]  # train() waited for the write
    a, s = tmp_path / "a" / "checkpoint-6", tmp_path / "sync" / "checkpoint-6"
    assert (a / "latest").read_text() == "global_step6"
    Index.read(a / "global_step6").check_files()
    rank_files = sorted(p.name for p in (s / "global_step6").glob("rank*.safetensors"))
    assert len(rank_files) == 2
    for name in rank_files:
        assert (a / "global_step6" / name).read_bytes() == (s / "global_step6" / name).read_bytes(), name


def test_trainer_resume_true_skips_an_interrupted_async_save(tmp_path):
    """A crash during checkpoint-6's background write leaves it without an engine checkpoint:
    resume_from_checkpoint=True picks checkpoint-4."""
    from hf_zero.integrations.trainer import newest_complete_checkpoint

    for n, complete in ((2, True), (4, True), (6, False)):
        d = tmp_path / f"checkpoint-{n}"
        (d / f".partial-global_step{n}").mkdir(parents=True)
        (d / "trainer_state.json").write_text("{}")
        if complete:
            (d / f".partial-global_step{n}").rename(d / f"global_step{n}")
            (d / f"global_step{n}" / "index.json").write_text("{}")
            (d / "latest").write_text(f"global_step{n}")
    assert newest_complete_checkpoint(tmp_path) == str(tmp_path / "checkpoint-4")
    (tmp_path / "checkpoint-6" / ".partial-global_step6").rename(tmp_path / "checkpoint-6" / "global_step6")
    (tmp_path / "checkpoint-6" / "global_step6" / "index.json").write_text("{}")
    assert newest_complete_checkpoint(tmp_path) == str(tmp_path / "checkpoint-6")
    assert newest_complete_checkpoint(tmp_path / "none") is None


@pytest.mark.slow
@pytest.mark.parametrize("how", ["config", "keyword"])
def test_accelerate_save_state_async(tmp_path, how):
    """accelerator.save_state under the plugin honours ``hf_zero.async_save`` (and the
    ``async_save=True`` keyword): it returns with the write in flight, the loop goes on, and
    load_state of that checkpoint in a new launch continues exactly as the loop did."""
    saved = launch(2, "async_scenarios:accelerate_async", {"how": how, "save": str(tmp_path / "state")},
                   tmp_path / "a")[0]
    assert saved["in_flight"] is True
    assert len(saved["losses"]) == 3
    # integration_scenarios.accelerate_resume: load_state, skip the 4 micro-batches seen, run on
    rest = launch(2, "integration_scenarios:accelerate_resume", {"stage": 3, "load": str(tmp_path / "state"),
                                                                 "skip_batches": 4}, tmp_path / "b")[0]
    assert rest["losses"] == saved["losses"][2:]
    assert rest["lr"] == saved["lr"] and rest["weights_sum"] == saved["weights_sum"]


def test_snapshot_staging_refills_its_memory_and_never_aliases_the_source():
    from hf_zero.checkpoint.staging import SnapshotStaging

    staging = SnapshotStaging()
    src = torch.arange(6, dtype=torch.float32)
    staging.begin()
    a = staging.copy("m", src)
    b = staging.copy("s", src.to(torch.bfloat16), torch.float32)  # converted on the way in
    staging.end()
    assert a.data_ptr() != src.data_ptr() and torch.equal(a, src) and torch.equal(b, src)
    src.add_(1)  # training changes the source: the snapshot does not move
    assert torch.equal(a, torch.arange(6, dtype=torch.float32))
    staging.begin()
    a2 = staging.copy("m", src)  # same shape and dtype: the same memory, refilled
    c = staging.copy("m2", src[:4])
    staging.end()
    assert a2.data_ptr() == a.data_ptr() and torch.equal(a2, src)
    assert set(staging._held) == {"m", "m2"}  # "s" was not part of this snapshot: dropped
    assert staging.nbytes() == (6 + 4) * 4
    staging.begin()
    a3 = staging.copy("m", src[:3])  # a new shape: new memory
    staging.end()
    assert a3.shape == (3,) and torch.equal(a3, src[:3]) and set(staging._held) == {"m"}
    assert c.shape == (4,)
