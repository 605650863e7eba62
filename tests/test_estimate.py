"""hf-zero estimate / plan: the ZeRO paper's figures, agreement with measured per-rank bytes,
the planner's decisions, and the command's output."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from hf_zero.cli import main
from hf_zero.config import ZeroConfig
from hf_zero.estimate import (GB, ActivationSpec, EstimateError, Setup, estimate, paper_model_states_gb, plan,
                              resolve_model, shape_from_count)
from launch import launch

HERE = Path(__file__).resolve().parent


def test_7b_on_4_gpus_matches_the_zero_paper():
    gb = paper_model_states_gb(7e9, 4)
    assert gb == pytest.approx({0: 112.0, 1: 49.0, 2: 38.5, 3: 28.0})
    shape = shape_from_count(7e9)
    for stage, want in gb.items():
        e = estimate(shape, Setup(stage), 4, activations=None)
        assert e.states_gpu / GB == pytest.approx(want)
    # stage 3's live units are not in the 28 GB: without an architecture they are unknown
    assert estimate(shape, Setup(3), 4).live_gpu is None


def test_offload_moves_master_and_optimizer_states():
    shape = shape_from_count(7e9)
    e = estimate(shape, Setup(2, "cpu"), 4, activations=None)
    assert e.states_gpu / GB == pytest.approx(14 + 3.5)      # bf16 params + gradient shard
    assert e.cpu / GB == pytest.approx(12 * 7 / 4)          # fp32 master + 2 Adam states, this rank's shard
    assert e.node(e.cpu) / GB == pytest.approx(84)
    e = estimate(shape, Setup(3, "nvme", "nvme"), 4, activations=None)
    assert e.nvme / GB == pytest.approx(14 * 7 / 4) and e.cpu == 0


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    """Stage 0 in this process at world size 1; stages 1-3 on 2 gloo processes."""
    sys.path.insert(0, str(HERE))
    import estimate_scenarios

    tmp = tmp_path_factory.mktemp("est")
    one = estimate_scenarios.measure({"stages": [0]}, tmp)
    two = launch(2, "estimate_scenarios:measure", {"stages": [1, 2, 3]}, tmp / "w2", timeout=300)
    cfg = tmp / "config.json"
    estimate_scenarios.build().config.to_json_file(str(cfg))
    return {0: (1, one["0"]), **{s: (2, two[0][str(s)]) for s in (1, 2, 3)}}, two, cfg


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_cli_estimate_matches_measured_bytes(measured, stage, capsys):
    data, two, cfg = measured
    world, rep = data[stage]
    assert main(["estimate", str(cfg), "--gpus", str(world), "--json", "--no-activations"]) == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    row = next(r for r in rows if r["stage"] == stage and r["offload_optimizer"] == "none")
    predicted = row["per_gpu_gb"]["model_states"] * GB
    assert rep["model_state_bytes"] == pytest.approx(predicted, rel=0.05)
    if stage:
        assert two[1][str(stage)]["model_state_bytes"] == pytest.approx(predicted, rel=0.05)


def test_plan_decisions():
    seven = shape_from_count(7e9)
    p = plan(seven, 4, 80, activations=None)
    assert p.setup == Setup(2) and p.fits
    assert any("stage 1" in r for r in p.reasons)
    # 112 GB of states on one GPU: offload, only as much as needed. Full offload keeps 28 GB
    # on the GPU, 44 GB of the 72 usable unused: 1 - 44/84 = 0.476 of the 84 GB of fp32 states go
    p = plan(seven, 1, 80, activations=None)
    assert p.setup == Setup(2, "cpu", offload_ratio=0.48)
    assert p.estimate.cpu == pytest.approx(0.48 * 84e9) and p.estimate.gpu_total <= 72e9
    p = plan(seven, 1, 80, activations=None, cpu_memory_gb=64)  # 40 GB of CPU states <= 90% of 64
    assert p.setup == Setup(2, "cpu", offload_ratio=0.48)
    p = plan(seven, 1, 80, activations=None, cpu_memory_gb=32)  # 40 GB of CPU states > 90% of 32
    assert p.setup == Setup(2, "nvme", offload_ratio=0.48)
    p = plan(seven, 8, 24, activations=None)                  # stage 2 needs 26.25 GB > 21.6
    assert p.setup == Setup(3)
    p = plan(shape_from_count(70e9), 1, 24, activations=None)
    assert p.setup.offload_param != "none"
    # 70B on 8 x 24 GB: 140 GB of bf16 shards + 840 GB of fp32 Adam states leave the GPUs
    p = plan(shape_from_count(70e9), 8, 24, activations=None, cpu_memory_gb=1024)  # 980 GB > 90%
    assert p.setup == Setup(3, "nvme", "cpu", 0.97)   # 140 GB fits; 3% of the states fit on the GPUs
    p = plan(shape_from_count(70e9), 8, 24, activations=None, cpu_memory_gb=128)   # 140 GB > 115 GB
    assert p.setup == Setup(3, "nvme", "nvme", 0.97) and p.fits
    assert p.zero_config("/nvme")["zero_optimization"]["offload_param"]["nvme_path"] == "/nvme"
    assert plan(resolve_model("mistral-7b-8gpu-stage3"), 8, 24).setup == Setup(3)
    assert plan(resolve_model("qwen2.5-7b-4gpu-stage2"), 4, 80).setup == Setup(2)
    # the recipe offloads everything; the planner keeps 2% of the states on the GPU's spare room
    assert plan(resolve_model("qwen2.5-14b-1gpu-nvme"), 1, 80, cpu_memory_gb=64).setup == Setup(2, "nvme", "none", 0.98)


def test_plan_writes_a_loadable_zero_config(tmp_path, capsys):
    out = tmp_path / "zero.json"
    assert main(["plan", "7B", "--gpus", "8", "--gpu-memory", "24", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "recommended: stage 3" in text
    cfg = ZeroConfig.load(str(out))
    assert cfg.stage == 3
    resolved = cfg.resolve(world_size=8, values={"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 4,
                                                  "hidden_size": 4096})
    assert resolved.train_batch_size == 32


def test_estimate_table_and_errors(tmp_path, capsys):
    assert main(["estimate", "tiny", "--gpus", "2"]) == 0
    out = capsys.readouterr().out
    assert "stage 2 + optimizer->cpu" in out and "activations: seq 2048" in out
    with pytest.raises(EstimateError, match="not in the local Hugging Face cache"):
        resolve_model("nonexistent-org-xyz/not-a-model")
    assert main(["estimate", "nonexistent-org-xyz/not-a-model", "--gpus", "1"]) == 2
    assert "pass the path of its config.json" in capsys.readouterr().err


def test_activation_formula_and_recompute():
    shape = resolve_model("mistral-7b-8gpu-stage3")
    on = estimate(shape, Setup(3), 8, activations=ActivationSpec(seq_len=2048, recompute=True)).activations
    off = estimate(shape, Setup(3), 8, activations=ActivationSpec(seq_len=2048, recompute=False)).activations
    h, i, L, V, hkv, s = 4096, 14336, 32, 32768, 1024, 2048
    per_layer = 18 * h + 6 * hkv + 8 * i
    assert off == s * (L * per_layer + 10 * V)
    assert on == s * (L * 2 * h + per_layer + 10 * V)


@pytest.mark.parametrize("gpus,gpu_gb,params", [(1, 80, 7e9), (1, 40, 3e9), (2, 24, 7e9), (8, 24, 70e9), (1, 141, 8e9)])
def test_planned_ratio_is_the_smallest_that_fits_the_formula(gpus, gpu_gb, params):
    """An offloading plan keeps as much of the optimizer state on the GPU as fits: its ratio
    fits the usable memory, one step less does not (the memory formula, re-evaluated)."""
    from hf_zero.estimate import GPU_USABLE_FRACTION, RATIO_STEP, estimate, fitting_ratio

    shape = shape_from_count(params)
    p = plan(shape, gpus, gpu_gb, activations=None)
    usable = gpu_gb * GB * GPU_USABLE_FRACTION
    assert p.setup.offload_optimizer != "none" and p.fits
    r = p.setup.offload_ratio
    assert estimate(shape, p.setup, gpus, activations=None).gpu_total <= usable
    if r - RATIO_STEP >= 0:
        less = estimate(shape, Setup(p.setup.stage, p.setup.offload_optimizer, p.setup.offload_param, r - RATIO_STEP),
                        gpus, activations=None)
        assert less.gpu_total > usable
    # the estimate splits the fp32 states by the ratio, the rest of the formula unchanged
    full = estimate(shape, Setup(p.setup.stage, p.setup.offload_optimizer, p.setup.offload_param), gpus, activations=None)
    opt = full.breakdown["master+optimizer"]
    part = estimate(shape, p.setup, gpus, activations=None)
    assert part.gpu_total == pytest.approx(full.gpu_total + (1 - r) * opt)
    assert part.cpu + part.nvme == pytest.approx(full.cpu + full.nvme - (1 - r) * opt)
    assert fitting_ratio(full, usable) == r
    if r < 1:
        assert p.zero_config()["zero_optimization"]["offload_optimizer"]["ratio"] == r
        assert "ratio" in p.setup.label
