"""The benchmark harness shared by scripts/bench_*.py: launch gloo ranks, time steps, summarize.

Each benchmark script is its own launcher and worker. This module holds what they all repeat:

* the machine header (CPU, usable cores, memory, torch / transformers versions, git commit and
  whether hf_zero has uncommitted changes) and the load average;
* ``rank_env`` / ``spawn_ranks`` / ``wait_ranks``: start ``world`` copies of a command with a
  torchrun-style environment on one free localhost port, wait for all of them under one
  deadline, and kill the rest as soon as one fails;
* ``timed_step``: one step between an untimed barrier and a MAX all-reduce, so a step's time is
  the slowest rank's; ``run_rounds``: the warm-up + rotating-rounds schedule;
* ``percentile`` (linear interpolation, the median is ``percentile(xs, 0.5)``), ``per_rank``,
  ``markdown_table`` (columns padded to their widest cell) and ``write_json``.

Invariants: importing this module imports only the standard library (torch is imported inside
the functions that need it), so a launcher starts fast and a script may run under another
project's venv; nothing here reads or changes global state beyond the environment it is given.
"""

from __future__ import annotations

import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MB = 1e6


# ---------------------------------------------------------------------------------- machine
def proc_status_kb(field: str) -> int:
    """A ``/proc/self/status`` field in kB (``VmRSS``, ``VmHWM``), -1 where absent."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return -1


def malloc_stats() -> dict:
    """glibc's ``mallinfo2()`` in bytes: ``heap`` (the main arena's size, what ``brk`` holds),
    ``in_use`` and ``free`` (allocated / free chunks inside it), ``mmapped`` (blocks malloc
    mapped on their own); {} where glibc 2.33+ is not the allocator. Free heap chunks below
    the topmost one in use stay resident: ``free`` is the RSS the heap holds for nothing."""
    import ctypes

    names = ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")

    class MallInfo2(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in names]

    try:
        fn = ctypes.CDLL("libc.so.6").mallinfo2
    except (OSError, AttributeError):
        return {}
    fn.restype = MallInfo2
    m = fn()
    return {"heap": m.arena, "in_use": m.uordblks, "free": m.fordblks, "mmapped": m.hblkhd}


def _git(*cmd):
    try:
        return subprocess.run(["git", "-C", str(REPO), *cmd], capture_output=True, text=True,
                              timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def machine_info() -> dict:
    """What the figures were measured on, for the JSON header."""
    model = "unknown"
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    mem_total = None
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemTotal:"):
                    mem_total = int(line.split()[1]) * 1024
    except OSError:
        pass
    import torch
    import transformers

    return {
        "git_commit": _git("rev-parse", "HEAD"),
        "hf_zero_uncommitted_changes": bool(_git("status", "--porcelain", "--", "hf_zero")),
        "cpu_model": model,
        "logical_cpus": os.cpu_count(),
        "usable_cpus": usable,
        "mem_total_bytes": mem_total,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }


def loadavg() -> str:
    try:
        return open("/proc/loadavg").read().strip()
    except OSError:
        return "n/a"


# ---------------------------------------------------------------------------------- launch
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_env(rank: int, world: int, port: int, threads: int = 1, pythonpath=(str(REPO),), **extra) -> dict:
    """This process's environment plus torchrun's variables for ``rank`` of ``world`` on
    localhost:``port``, OMP/MKL threads, ``pythonpath`` in front of PYTHONPATH, and ``extra``."""
    env = dict(os.environ)
    env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
               OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
               PYTHONPATH=os.pathsep.join([*pythonpath, env.get("PYTHONPATH", "")]))
    env.update({k: str(v) for k, v in extra.items()})
    return env


def spawn_ranks(cmd: list, world: int, threads: int = 1, pythonpath=(str(REPO),), **extra) -> list:
    """Start ``world`` processes of ``cmd`` (one free port for all); returns the Popen objects."""
    port = free_port()
    return [subprocess.Popen(cmd, env=rank_env(r, world, port, threads, pythonpath, **extra)) for r in range(world)]


def wait_ranks(procs: list, timeout: float = None):
    """Wait for every process under one deadline (``None``: no limit); kill the rest at the first
    failure. Returns ``None`` when all exited 0, else ``(rank, exit code or "timeout")``."""
    deadline = None if timeout is None else time.time() + timeout
    failed = None
    try:
        for rank, p in enumerate(procs):
            try:
                rc = p.wait(timeout=None if deadline is None else max(1.0, deadline - time.time()))
            except subprocess.TimeoutExpired:
                rc = "timeout"
            if rc != 0:
                failed = (rank, rc)
                break
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return failed


def worker_cmd(script: str, *args) -> list:
    """``python <script> <args>``: the launcher re-running its own file as a worker."""
    return [sys.executable, str(Path(script).resolve()), *map(str, args)]


# ---------------------------------------------------------------------------------- timing
def timed_step(step):
    """Run ``step()`` on every rank between an untimed barrier and a MAX all-reduce of the
    elapsed time; returns (``step()``'s result, the slowest rank's seconds)."""
    import torch
    import torch.distributed as dist

    dist.barrier()
    t0 = time.perf_counter()
    out = step()
    dt = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
    dist.all_reduce(dt, op=dist.ReduceOp.MAX)
    return out, float(dt)


class StepBlocks:
    """A round's consecutive steps of one variant, timed as a block: one barrier before the
    block, none between its steps, and the variant's background work (hf_zero's post-step
    all-gathers at stages 1-2) completed inside the block's last step. A barrier between steps
    would complete that work outside the timed region (gloo's barrier waits for the work queued
    before it), and credit the variant with time it did spend.

    ``begin(key, size)`` -> True when a new block starts (barrier then); ``end()`` -> True when
    the step just run closed its block (settle the variant then, before stopping the clock)."""

    def __init__(self):
        self.key, self.left = None, 0

    def begin(self, key, size: int) -> bool:
        if self.key == key and self.left > 0:
            return False
        self.key, self.left = key, max(1, int(size))
        return True

    def end(self) -> bool:
        self.left -= 1
        return self.left == 0


def run_rounds(keys, run, times, args, say, tag: str, t_start: float) -> None:
    """``args.warmup`` untimed steps per variant (``run(key, timed=False)``), then
    ``args.rounds`` rounds of ``args.steps_per_round`` timed steps each, the variant order
    rotating every round so machine noise hits all variants alike."""
    for _ in range(args.warmup):
        for k in keys:
            run(k, timed=False)
    say(f"[{tag}] warm-up done ({args.warmup} step(s) per variant, {time.perf_counter() - t_start:.1f}s)")
    for r in range(args.rounds):
        order = keys[r % len(keys):] + keys[: r % len(keys)]
        for k in order:
            for _ in range(args.steps_per_round):
                run(k, timed=True)
        say(f"[{tag}] round {r + 1}/{args.rounds} ({time.perf_counter() - t_start:.0f}s); median so far: "
            + ", ".join(f"{k}={statistics.median(times[k]):.3f}s" for k in keys))


# ---------------------------------------------------------------------------------- summary
def percentile(xs, q):
    """Linear interpolation between the order statistics; ``nan`` for no data."""
    xs = sorted(xs)
    if not xs:
        return float("nan")
    pos = (len(xs) - 1) * q
    lo, hi = int(pos), min(int(pos) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def per_rank(values, scale=MB, fmt="{:.1f}") -> str:
    """One figure when every rank agrees, else ``rank0 / rank1 / ...``; ``n/a`` if any is missing."""
    if any(v is None for v in values):
        return "n/a"
    vals = [fmt.format(v / scale) for v in values]
    return vals[0] if len(set(vals)) == 1 else " / ".join(vals)


def markdown_table(rows) -> list:
    """Lines of a markdown table, header first, every column padded to its widest cell."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(rows[0], widths)) + " |",
             "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    return lines + ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in rows[1:]]


def write_json(path, obj, indent=2) -> Path:
    """Write ``obj`` as JSON to ``path``, creating its folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=indent))
    return path
