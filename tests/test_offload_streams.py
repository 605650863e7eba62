"""The copy stream (hf_zero/offload/streams.py) on CPU, where its streams and events are
no-ops, and how the offloaded step uses it: every gradient shard of a host flat goes down and
every updated shard goes up through it, bf16 gradients land in their own dtype, the upward
staging buffers are reused. CUDA-only assertions (real streams, overlap) are in test_cuda.py."""

from __future__ import annotations

import pytest
import torch

import hf_zero
from hf_zero.offload.streams import DONE, CopyEvent, CopyStream
from models import batches, build
from scenarios import run_steps


def test_cpu_copy_is_synchronous_and_its_event_complete():
    cs = CopyStream(torch.device("cpu"))
    assert cs.stream is None and not cs.cuda
    src, dst = torch.arange(6, dtype=torch.bfloat16), torch.zeros(6)
    ev = cs.copy(dst, src)
    assert torch.equal(dst, src.float())  # landed before copy() returned
    assert ev is DONE and ev.done() and not ev.on_gpu
    ev.synchronize()
    ev.wait_compute()  # no current CUDA stream is touched
    assert (cs.issued, cs.async_issued) == (1, 0)
    assert CopyEvent().done()


def _engine(ratio, dtype=None, stage=2, delayed=False):
    model = build("llama")
    cfg = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "gradient_clipping": 0.5,
           "zero_optimization": {"stage": stage, "offload_optimizer": {"device": "cpu", "ratio": ratio,
                                                                       "delayed_update": delayed}},
           "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}}
    if dtype:
        cfg[dtype] = {"enabled": True}
    return hf_zero.initialize(model=model, config=cfg)[0]


@pytest.mark.parametrize("stage", [2, 3])
@pytest.mark.parametrize("delayed", [False, True], ids=["exact", "delayed"])
def test_offloaded_step_moves_every_host_shard_through_the_copy_stream(stage, delayed):
    engine = _engine(0.3, "bf16", stage=stage, delayed=delayed)
    host = engine.host
    n_host = len(engine._host_flats)
    assert 0 < n_host < len(engine._trainable_flats)
    run_steps(engine, batches(2, 1, 1), 0)
    engine.flush_pending_update()
    # per step: one gradient copy down and one weight copy up per host flat
    assert host.copies.issued == 2 * 2 * n_host
    assert sorted(host._grad_copy) == sorted(engine._host_flats) == sorted(host.staging)
    for i in engine._host_flats:
        assert host.host_grad_low[i].dtype == torch.bfloat16  # came down in bf16, widened on the host
        assert host.staging[i].dtype == torch.bfloat16
        assert host.host_grad[i].dtype == torch.float32
    ptrs = {i: host.staging[i].data_ptr() for i in host.staging}
    run_steps(engine, batches(1, 1, 1), 0)
    engine.flush_pending_update()
    assert {i: host.staging[i].data_ptr() for i in host.staging} == ptrs  # reused, not reallocated
    # the device shards hold the published weights
    for i in engine._host_flats:
        f = engine._trainable_flats[i]
        assert torch.equal(engine.read_shard(f), f.master.to(f.dtype))
    engine.destroy()


def test_fp32_cpu_master_in_the_shard_needs_no_upward_copy():
    engine = _engine(1.0)
    run_steps(engine, batches(1, 1, 1), 0)
    assert all(f.master_is_shard for f in engine._trainable_flats)
    assert engine.host.copies.issued == len(engine._trainable_flats)  # gradients only
    assert engine.host.staging == {}
    engine.destroy()


def test_gpu_offload_benchmark_runs_on_cpu(tmp_path):
    """scripts/bench_offload_gpu.py (run on a GPU by scripts/gpu_check.sh) on the CPU with a tiny
    shape: every mode it measures there, partial ratios included, runs and reports the split."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parent.parent
    out = tmp_path / "bench.json"
    res = subprocess.run([sys.executable, str(repo / "scripts" / "bench_offload_gpu.py"), "--device", "cpu",
                          "--shapes", "tiny", "--seq", "16", "--micro", "1", "--steps", "1", "--json", str(out)],
                         capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-2000:]
    runs = {r["mode"]: r for r in json.loads(out.read_text())["runs"]}
    assert sorted(runs) == sorted(["none", "offload", "delayed", "ratio0.3", "ratio0.5"])
    assert runs["none"]["optimizer_host_fraction"] == 0.0 and runs["offload"]["optimizer_host_fraction"] == 1.0
    assert 0.3 <= runs["ratio0.3"]["optimizer_host_fraction"] < runs["ratio0.5"]["optimizer_host_fraction"] < 1.0
    assert runs["ratio0.3"]["copies"]["issued"] > 0 and runs["none"]["copies"] is None
    assert all(r["tokens_per_s"] > 0 for r in runs.values())
