"""Exit without SIGABRT (issue 13 item 10): hf_zero tears the process group down at exit.

See hf_zero/engine/teardown.py for the mechanism. The loop that showed the fix on the real launch
path (40 runs of the accelerate-launched Trainer: 2 aborted before, 0 after) is too slow for the
suite; these tests pin the behaviour that removes the race: by the time later ``atexit`` work and
interpreter finalization run, no process group (and so no gloo worker thread) is left.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from launch import free_port

HERE = Path(__file__).resolve().parent


def _torchrun(mode: str, out: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(HERE.parent), str(HERE)]))
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           str(HERE / "exit_scenario.py"), mode, str(out)]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


def _at_exit(out: Path, rank: int) -> dict:
    return json.loads((out / f"exit_rank{rank}.json").read_text())


@pytest.mark.parametrize("mode", ["ok", "destroy"])
def test_finished_run_leaves_no_gloo_thread_for_finalization(tmp_path, mode):
    """``destroy``: the script destroyed the group itself; the transformers import had pinned it
    (torch.distributed.nn's default arguments), so its threads outlived that destroy until
    hf_zero's exit callback released the pin. This is the residual abort of the last CI run."""
    p = _torchrun(mode, tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "terminate called" not in p.stderr
    at_exit = [_at_exit(tmp_path, r) for r in (0, 1)]
    assert [a["initialized_at_exit"] for a in at_exit] == [False, False]
    assert [a["gloo_threads_at_exit"] for a in at_exit] == [[], []]


def test_destroy_alone_leaves_pinned_gloo_threads_that_release_frees(tmp_path):
    """The reference fact the fix rests on, checked in one process group: after
    ``destroy_process_group`` the worker threads live on while torch.distributed.nn pins the group,
    and ``release_destroyed_groups`` ends them."""
    code = """
import os, torch.distributed as dist
from pathlib import Path
def gloo():
    return sorted(n for n in (Path(f"/proc/self/task/{t}/comm").read_text().strip()
                              for t in os.listdir("/proc/self/task")) if "gloo" in n)
dist.init_process_group("gloo", rank=0, world_size=1, init_method="tcp://127.0.0.1:%d")
import torch.distributed.nn.functional  # what transformers' config import pulls in
dist.destroy_process_group()
after_destroy = gloo()
from hf_zero.engine.teardown import release_destroyed_groups
n = release_destroyed_groups()
print(bool(after_destroy), n > 0, gloo())
""" % free_port()
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, PYTHONPATH=str(HERE.parent)))
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.split() == ["True", "True", "[]"]


def test_failed_rank_skips_teardown_and_the_job_still_ends(tmp_path):
    p = _torchrun("raise", tmp_path)
    assert p.returncode != 0
    assert "deliberate failure after one step" in p.stderr
    assert _at_exit(tmp_path, 1)["initialized_at_exit"] is True      # failing rank: left as it was
    assert _at_exit(tmp_path, 0)["initialized_at_exit"] is False     # the finished rank tore down


def test_install_is_idempotent():
    code = ("from hf_zero.engine.teardown import install_exit_teardown as i; "
            "import atexit; print(i(), i(), atexit._ncallbacks())")
    before = subprocess.run([sys.executable, "-c", "import atexit, hf_zero; print(atexit._ncallbacks())"],
                            capture_output=True, text=True, check=True).stdout.split()
    first, second, n = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                      check=True).stdout.split()
    assert (first, second) == ("True", "False")
    assert int(n) == int(before[0]) + 1
