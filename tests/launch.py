"""Run a scenario function in N real processes over gloo, launched as torchrun would.

Each process gets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT, imports the
scenario (``"module:function"`` from tests/, or a function name of ``tests/scenarios.py``) and
calls it with ``(payload, out_dir)``; whatever it returns (JSON) is written to
``out_dir/rank<r>.json``. One launch per test module keeps start-up cost low.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_all(procs, timeout: float, scenario: str, what: str, logs, tail: int) -> None:
    """Wait for every ``(process, log file)`` in order; on the first failure or timeout kill the
    rest and raise with the last ``tail`` characters of each log (``what``: "rank" or "node")."""
    failed = []
    try:
        for i, (p, _log) in enumerate(procs):
            try:
                rc = p.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                rc = "timeout"
            if rc != 0:
                failed.append((i, rc))
                break
    finally:
        for p, log in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
            log.close()
    if failed:
        text = "\n".join(f"--- {what} {i} ---\n" + path.read_text()[-tail:] for i, path in enumerate(logs))
        raise AssertionError(f"scenario {scenario} failed on {what}(s) {failed}\n{text}")


def launch(world_size: int, scenario: str, payload: dict, out_dir: Path, timeout: float = 600.0, env=None):
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "payload.json").write_text(json.dumps(payload))
    port = free_port()
    procs = []
    for rank in range(world_size):
        e = dict(os.environ)
        e.update(env or {})
        e.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(world_size),
                 MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1",
                 PYTHONPATH=os.pathsep.join([str(HERE.parent), str(HERE), e.get("PYTHONPATH", "")]))
        log = open(out_dir / f"rank{rank}.log", "w")
        procs.append((subprocess.Popen([sys.executable, str(HERE / "_worker.py"), scenario, str(out_dir)],
                                       env=e, stdout=log, stderr=subprocess.STDOUT), log))
    _wait_all(procs, timeout, scenario, "rank", [out_dir / f"rank{r}.log" for r in range(world_size)], 4000)
    return [json.loads((out_dir / f"rank{r}.json").read_text()) for r in range(world_size)]


def launch_cluster(nodes: int, per_node: int, scenario: str, payload: dict, out_dir: Path, timeout: float = 600.0,
                   env=None):
    """A simulated cluster: ``nodes`` torchrun agents on localhost (``--nnodes nodes
    --nproc_per_node per_node``, c10d rendezvous), each starting ``per_node`` workers that run
    ``scenario`` as :func:`launch` does. Each worker sees torchrun's own RANK, LOCAL_RANK,
    LOCAL_WORLD_SIZE and GROUP_RANK (its node); ``out_dir/node<i>.log`` holds agent ``i``'s
    output with every worker's lines (prefixed by torchrun with the worker's local rank)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "payload.json").write_text(json.dumps(payload))
    port = free_port()
    world = nodes * per_node
    procs = []
    for node in range(nodes):
        e = dict(os.environ)
        e.update(env or {})
        for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT"):
            e.pop(key, None)
        e.update(OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(HERE.parent), str(HERE), e.get("PYTHONPATH", "")]))
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nnodes={nodes}", f"--nproc_per_node={per_node}",
               "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}", f"--rdzv_id=sim{port}",
               "--max_restarts=0", "--monitor_interval=0.2", "--tee=3", str(HERE / "_worker.py"), scenario,
               str(out_dir)]
        log = open(out_dir / f"node{node}.log", "w")
        procs.append((subprocess.Popen(cmd, env=e, stdout=log, stderr=subprocess.STDOUT), log))
    _wait_all(procs, timeout, scenario, "node", [out_dir / f"node{i}.log" for i in range(nodes)], 6000)
    return [json.loads((out_dir / f"rank{r}.json").read_text()) for r in range(world)]
