"""ZeroTrainer checkpoint-N folders: resume at another world size and stage continues the same
loss curve; save_total_limit rotates folders; load_best_model_at_end restores the best weights.
Real gloo processes."""

from __future__ import annotations

import json
import os

import pytest

from launch import launch

S = "integration_scenarios:trainer_checkpoints"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("trainer_ckpt")
    out = {}
    out["full"] = launch(2, S, {"stage": 2, "max_steps": 6, "output_dir": str(root / "full")}, root / "l1")[0]
    # the first run (same schedule: 6 steps) stops after step 4 (its checkpoints: 2 and 4)
    out["first"] = launch(2, S, {"stage": 2, "max_steps": 6, "stop_at": 4, "output_dir": str(root / "part")},
                          root / "l2")[0]
    out["resumed"] = launch(3, S, {"stage": 3, "max_steps": 6, "output_dir": str(root / "part"),
                                   "resume": str(root / "part" / "checkpoint-4")}, root / "l3")[0]
    out["best"] = launch(2, S, {"stage": 2, "max_steps": 6, "output_dir": str(root / "best"), "best": True},
                         root / "l4")[0]
    return root, out


def test_resume_on_three_ranks_at_stage3_continues_the_curve(runs):
    _, out = runs
    full = {int(k): v for k, v in out["full"]["losses"].items()}
    resumed = {int(k): v for k, v in out["resumed"]["losses"].items()}
    assert sorted(resumed) == [1, 2, 3, 4, 5, 6]  # steps 1-4 come back from trainer_state.json
    for step in (5, 6):
        assert resumed[step] == pytest.approx(full[step], abs=1e-5)
    assert out["resumed"]["global_step"] == 6
    assert out["resumed"]["weights_sum"] == pytest.approx(out["full"]["weights_sum"], rel=1e-6)


def test_save_total_limit_rotates_checkpoint_folders(runs):
    root, _ = runs
    kept = sorted(d for d in os.listdir(root / "full") if d.startswith("checkpoint-"))
    assert kept == ["checkpoint-4", "checkpoint-6"]
    inside = set(os.listdir(root / "full" / "checkpoint-6"))
    assert {"latest", "model.safetensors", "trainer_state.json"} <= inside


def test_best_model_is_loaded_at_the_end(runs):
    root, out = runs
    assert out["best"]["best"] is not None
    state = json.loads((root / "best" / "checkpoint-6" / "trainer_state.json").read_text())
    assert state["best_model_checkpoint"] == out["best"]["best"]
    assert out["best"]["best_diff"] < 1e-6  # the live weights are the best checkpoint's


def test_accelerate_save_state_load_state(tmp_path):
    """save_state after 2 of 3 updates, load_state in a new launch: the third update is the
    same as in a run that never stopped."""
    R = "integration_scenarios:accelerate_resume"
    full = launch(2, R, {"stage": 3}, tmp_path / "a")[0]
    first = launch(2, R, {"stage": 3, "save": str(tmp_path / "state"), "stop_after": 2}, tmp_path / "b")[0]
    # 2 updates x accumulation 2 = 4 micro-batches per rank already consumed
    rest = launch(2, R, {"stage": 3, "load": str(tmp_path / "state"), "skip_batches": 4}, tmp_path / "c")[0]
    assert len(full["losses"]) == 3
    assert first["losses"] + rest["losses"] == full["losses"]
    assert rest["lr"] == full["lr"]
    assert rest["weights_sum"] == full["weights_sum"]
