"""Switching between the stock Trainer and ZeroTrainer mid-run (issue 16). Real gloo processes.

A stock Trainer run (DDP over 2 processes) saves checkpoint-N folders; ZeroTrainer resumes one
at stage 3 with its optimizer and scheduler state and continues the stock run's own curve. The
other way, a stock Trainer handed a ZeroTrainer checkpoint fails naming hf_zero's marker instead
of silently starting a fresh optimizer."""

from __future__ import annotations

import pytest

from hf_zero.checkpoint.detect import detect
from hf_zero.checkpoint.trainer_format import MARKER_GLOBAL, is_marker
from launch import launch

S = "migrate_scenarios:trainer_switch"
pytestmark = pytest.mark.slow  # three launches of a Trainer: ~1.5 minutes on the 2-core box


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("switch")
    out = {"root": root}
    out["stock"] = launch(2, S, {"kind": "stock", "output_dir": str(root / "run")}, root / "l1")[0]
    # ZeroTrainer takes over from the stock run's step-4 checkpoint (and writes checkpoint-6 in the same dir)
    out["zero"] = launch(2, S, {"kind": "zero", "stage": 3, "output_dir": str(root / "zrun"),
                                "resume": str(root / "run" / "checkpoint-4")}, root / "l2")[0]
    out["back"] = launch(1, S, {"kind": "stock", "output_dir": str(root / "back"), "expect_error": True,
                                "resume": str(root / "zrun" / "checkpoint-6")}, root / "l3")[0]
    return out


def test_zero_trainer_continues_the_stock_run(runs):
    stock, zero = runs["stock"], runs["zero"]
    assert detect(runs["root"] / "run" / "checkpoint-4").kind == "trainer"
    assert zero["global_step"] == 6
    for step in ("5", "6"):
        assert zero["losses"][step] == pytest.approx(stock["losses"][step], abs=1e-5, rel=0)
        assert zero["lr"][step] == pytest.approx(stock["lr"][step], rel=1e-9)  # scheduler.pt, not a fresh one


def test_stock_trainer_refuses_a_zero_trainer_checkpoint(runs):
    ck = runs["root"] / "zrun" / "checkpoint-6"
    assert detect(ck).kind == "hf_zero"
    assert is_marker(ck / "optimizer.pt") and is_marker(ck / "scheduler.pt")
    assert runs["back"]["error"] is not None and MARKER_GLOBAL in runs["back"]["error"]
