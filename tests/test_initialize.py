"""hf_zero.initialize() used the DeepSpeed way, and its errors, over 2 real gloo processes."""

from __future__ import annotations

import pytest

from launch import launch


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("api")
    return launch(2, "several", {"api": {"stage": 3}, "errors": {}}, out, timeout=600)


def test_config_optimizer_scheduler_and_dataloader(results):
    for r in results:
        api = r["api"]
        # train_batch_size 16 = micro x accumulation 2 x world 2 -> micro 4
        assert api["micro"] == 4 and api["accum"] == 2
        # 64 samples / 2 ranks / micro 4 = 8 micro-batches per rank = 4 optimizer steps
        assert api["batch_sizes"] == [4] * 8
        assert api["micro_steps"] == 8 and api["steps"] == 4
        assert api["optimizer"] == "AdamW" and api["betas"] == [0.9, 0.95]
        assert api["sched"] == "LambdaLR"
        # linear warm-up over 4 steps from 0 to 1e-3, stepped at boundaries only; DeepSpeed
        # keeps warmup_min_lr for the first two optimizer steps (last_batch_iteration -1, then 0)
        assert api["lrs"] == pytest.approx([0.0, 0.0, 0.0, 2.5e-4, 2.5e-4, 5e-4, 5e-4, 7.5e-4])


def test_bad_batch_arithmetic(results):
    for r in results:
        msg = r["errors"]["batch"]
        assert msg and "train_batch_size" in msg and "7" in msg


def test_non_elementwise_optimizer_refused(results):
    for r in results:
        msg = r["errors"]["adafactor"]
        assert msg.startswith("OptimizerNotSupported") and "Adafactor" in msg and "AdamW" in msg


def test_untested_optimizer_needs_opt_in(results):
    for r in results:
        assert "zero_allow_untested_optimizer" in r["errors"]["untested"]
        assert r["errors"]["untested_allowed"] is None


def test_missing_optimizer(results):
    for r in results:
        assert "optimizer" in r["errors"]["no_optimizer"] and "config" in r["errors"]["no_optimizer"]


def test_parameter_offload_limits(results):
    for r in results:
        msg = r["errors"]["offload_param"]  # a missing swap directory fails before any step
        assert msg.startswith("OffloadError") and "absent" in msg and "does not exist" in msg
        msg = r["errors"]["offload_param_alone"]
        assert msg.startswith("ValueError") and "offload_optimizer" in msg
