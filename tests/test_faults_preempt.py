"""Preemption (issue 13): ``hf_zero.save_on_signal``. A real 2-process gloo run gets SIGTERM
mid-epoch (on every rank, as a scheduler sends it, or on one rank only), every rank finishes the
step, saves and exits 0; a restarted run (world 2, or world 1) resumes from the checkpoint and
its per-step losses equal those of a run that was never interrupted."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hf_zero.checkpoint.format import Index, resolve_tag
from launch import HERE, free_port, launch

STEPS = 8
BASE = {"stage": 2, "steps": STEPS}


def spawn(world: int, payload: dict, out_dir: Path, scenario: str = "fault_scenarios:preempt_train"):
    """Start the ranks of ``fault_scenarios:preempt_train`` as tests/launch.py does, without
    waiting (the test signals them), returning the Popen objects."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "payload.json").write_text(json.dumps(payload))
    port, procs = free_port(), []
    for rank in range(world):
        e = dict(os.environ)
        e.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                 MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1",
                 PYTHONPATH=os.pathsep.join([str(HERE.parent), str(HERE), e.get("PYTHONPATH", "")]))
        log = open(out_dir / f"rank{rank}.log", "w")
        procs.append(subprocess.Popen([sys.executable, str(HERE / "_worker.py"), scenario, str(out_dir)],
                                      env=e, stdout=log, stderr=subprocess.STDOUT))
        log.close()
    return procs


def wait_all(procs, out_dir: Path, timeout: float = 120.0):
    deadline, codes = time.time() + timeout, []
    try:
        for p in procs:
            codes.append(p.wait(timeout=max(1.0, deadline - time.time())))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    logs = "\n".join(f"--- rank {r} ---\n" + (out_dir / f"rank{r}.log").read_text()[-3000:] for r in range(len(procs)))
    return codes, logs


def losses(out_dir: Path):
    return {(r := json.loads(line))["step"]: r["loss"] for line in (out_dir / "losses.jsonl").read_text().splitlines()}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run: world 2, no signal (save_on_signal on, so its flag all-reduce runs too)."""
    d = tmp_path_factory.mktemp("reference")
    out = launch(2, "fault_scenarios:preempt_train", {**BASE, "save_on_signal": str(d / "unused")}, d / "run",
                 timeout=120)
    assert not (d / "unused").exists()  # no signal, no checkpoint
    return dict(enumerate(out[0]["losses"]))


def _check_stopped(save: Path, run: Path, codes, logs, world: int = 2):
    assert codes == [0] * world, logs
    assert "SIGTERM received: saving a checkpoint after step" in (run / "rank0.log").read_text() \
        or "a peer's signal received" in (run / "rank0.log").read_text(), logs
    ck = resolve_tag(save, None)
    Index.read(ck).check_files()
    stopped_after = int(ck.name.removeprefix("global_step"))
    assert 0 < stopped_after < STEPS, (stopped_after, logs)  # mid-run, not at the end
    seen = losses(run)
    assert sorted(seen) == list(range(stopped_after)), (sorted(seen), stopped_after)  # finished its step, no more
    assert not any(p.name.startswith(".partial") for p in save.iterdir())
    return stopped_after, seen


def _check_resumed(reference, save: Path, world: int, tmp: Path, stopped_after: int, seen: dict):
    out = launch(world, "fault_scenarios:preempt_train", {**BASE, "resume": str(save)}, tmp / "resume", timeout=120)
    assert out[0]["start"] == stopped_after
    curve = {**seen, **{stopped_after + i: v for i, v in enumerate(out[0]["losses"])}}
    assert sorted(curve) == list(range(STEPS))
    for step in range(STEPS):
        assert abs(curve[step] - reference[step]) <= 1e-6, (step, curve[step], reference[step])


@pytest.mark.slow
def test_sigterm_to_every_rank_saves_exits_0_and_resumes_at_world_1(tmp_path, reference):
    """The scheduler's case: SIGTERM from outside to both processes while they train; the new
    job has one process (another world size) and resumes exactly."""
    save, run = tmp_path / "preempt", tmp_path / "run"
    procs = spawn(2, {**BASE, "save_on_signal": str(save), "sleep": 0.3}, run)
    t_end = time.time() + 90
    while time.time() < t_end and not all((run / f"progress{r}").exists() and int((run / f"progress{r}").read_text()) >= 2
                                          for r in range(2)):
        assert all(p.poll() is None for p in procs), wait_all(procs, run)[1]
        time.sleep(0.05)
    t0 = time.time()
    for p in procs:
        p.send_signal(signal.SIGTERM)
    codes, logs = wait_all(procs, run)
    print(f"SIGTERM to exit: {time.time() - t0:.2f} s")
    stopped_after, seen = _check_stopped(save, run, codes, logs)
    _check_resumed(reference, save, 1, tmp_path, stopped_after, seen)


@pytest.mark.slow
def test_sigterm_to_one_rank_stops_both_at_the_same_step(tmp_path, reference):
    """The signal reaches rank 1 only, between its forward and backward of step 3: both ranks
    agree at the end of step 3 (the flag all-reduce), save global_step4, exit 0; world 2 resumes."""
    save, run = tmp_path / "preempt", tmp_path / "run"
    procs = spawn(2, {**BASE, "save_on_signal": str(save), "self_signal": [3, [1]]}, run)
    codes, logs = wait_all(procs, run)
    stopped_after, seen = _check_stopped(save, run, codes, logs)
    assert stopped_after == 4
    assert "a peer's signal received" in (run / "rank0.log").read_text(), logs
    _check_resumed(reference, save, 2, tmp_path, stopped_after, seen)


def test_without_save_on_signal_sigterm_keeps_its_meaning(tmp_path):
    """Off by default: SIGTERM ends the process as before (killed by the signal), nothing saved."""
    run = tmp_path / "run"
    procs = spawn(2, {**BASE, "self_signal": [1, [0, 1]]}, run)
    codes, logs = wait_all(procs, run)
    assert codes[0] == -signal.SIGTERM, logs
    assert not (tmp_path / "preempt").exists()


@pytest.mark.slow
def test_trainer_run_stops_after_the_update_and_exits_0(tmp_path):
    """Through the Trainer (the engine's apply_update hook): SIGTERM on rank 1 at the start of
    update 3 (of 6) -> both ranks finish that update, save global_step3, exit 0."""
    save, run = tmp_path / "preempt", tmp_path / "run"
    procs = spawn(2, {"save_on_signal": str(save), "at": 2}, run, scenario="fault_scenarios:preempt_trainer")
    codes, logs = wait_all(procs, run, timeout=180)
    assert codes == [0, 0], logs
    assert resolve_tag(save, None).name == "global_step3", logs
    Index.read(resolve_tag(save, None)).check_files()
    assert (run / "progress0").read_text() == "2"  # no later update began
    assert not (run / "rank0.json").exists()  # train() never returned
