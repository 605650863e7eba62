"""The engine methods DeepSpeed scripts call (hf_zero/engine/deepspeed_api.py), in a real
2-process loop: values against the config and formulas, step bookkeeping against the loop
(accumulation 2: every second micro-step is a boundary), the 16-bit export read back."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from launch import launch

WORLD = 2


@pytest.fixture(scope="module", params=[dict(stage=1), dict(stage=3, fp16=True)],
                ids=["stage1", "stage3-fp16"])
def run(request, tmp_path_factory):
    out = tmp_path_factory.mktemp("ds_api")
    results = launch(WORLD, "deepspeed_api_scenarios:engine_methods", request.param, out, timeout=600)
    return request.param, out, results


def test_settings_answer_as_methods_and_attributes(run):
    case, _, results = run
    for r, rec in enumerate(results):
        assert rec["gas_call"] == rec["gas_attr"] == 2
        assert rec["clip_call"] == 0.5
        assert rec["micro"] == 2 and rec["train_batch_size"] == 2 * 2 * WORLD
        assert rec["stage"] == case["stage"]
        assert rec["fp16"] is bool(case.get("fp16")) and rec["bf16"] is False
        assert rec["global_rank"] == r and rec["local_rank"] == r and rec["dp_world_size"] == WORLD


def test_step_bookkeeping_follows_the_loop(run):
    case, _, results = run
    steps = results[0]["steps"]
    assert len(steps) == 12
    for i, s in enumerate(steps):
        boundary = i % 2 == 1
        assert s["global_steps"] == (i + 1) // 2
        assert s["global_samples"] == s["global_steps"] * 2 * 2 * WORLD
        skipped_now = boundary and s["skipped"] > (steps[i - 2]["skipped"] if i >= 2 else 0)
        assert s["applied"] is (boundary and not skipped_now), (i, s)
        assert s["lr"] == s["group_lr"]
        assert all(m == [0.9, 0.999] for m in s["mom"])
    if case.get("fp16"):  # 2^20 overflows first: skipped steps are not applied
        assert steps[-1]["skipped"] >= 1
        assert any(s["applied"] for s in steps)
    else:
        assert steps[-1]["skipped"] == 0
    # the warm-up schedule moved the learning rate between applied steps
    assert len({s["lr"][0] for s in steps}) > 2


def test_forced_boundary_no_sync_cache_and_export(run):
    case, out, results = run
    rec = results[0]
    assert rec["forced_boundary_changed"] and rec["forced_boundary_applied"]
    assert rec["boundary_after_reset"] is True  # 13 micro-steps done: the counter makes the 14th one
    assert rec["no_sync"] == "ok"
    assert rec["pinned_kept"] and rec["gathered_after_empty"] == []
    assert rec["save_16bit"] is True
    export = {}
    for f in sorted((out / "export").glob("*.safetensors")):
        export.update(load_file(str(f)))
    expected = load_file(str(out / "expected.safetensors"))
    dtype = torch.float16 if case.get("fp16") else torch.float32
    assert set(export) <= set(expected) and export
    for k, v in export.items():
        assert v.dtype == dtype, k
        assert torch.equal(v, expected[k]), k
