"""Faults a long run meets (issue 13): every rank fails loudly and at once, nothing hangs, and
nothing already saved is lost. Real gloo processes with the fault injected into one rank."""

from __future__ import annotations

import pytest
import torch

from hf_zero.checkpoint.format import Index, resolve_tag
from launch import launch


def test_failed_save_on_one_rank_raises_everywhere_and_keeps_latest(tmp_path):
    save = tmp_path / "ck"
    out = launch(2, "fault_scenarios:failed_save", {"save": str(save), "fail_rank": 1}, tmp_path / "run",
                 timeout=120)
    for rank, r in enumerate(out):
        assert r["error"] is not None, rank
        assert "CheckpointError" in r["error"] and "rank(s) [1]" in r["error"], r["error"]
        assert "rank00001-of-00002.safetensors" in r["error"] and "No space left" in r["error"], r["error"]
        assert "bytes into" in r["error"] and "free there" in r["error"], r["error"]
        assert r["seconds"] < 30, r  # no wait in a collective
        assert r["latest_after_failure"] == "global_step1"
        assert r["leftovers"] == ["global_step1", "latest"], r["leftovers"]  # no .partial-* left
        assert r["latest_final"] == "global_step3"
    Index.read(resolve_tag(save, "global_step1")).check_files()
    Index.read(resolve_tag(save, None)).check_files()


def test_different_tags_on_ranks_fail_clearly_on_all(tmp_path):
    out = launch(2, "fault_scenarios:tag_mismatch", {"save": str(tmp_path / "ck")}, tmp_path / "run", timeout=120)
    for r in out:
        assert "rank 0: 'tag_of_rank0'" in r["error"] and "rank 1: 'tag_of_rank1'" in r["error"], r["error"]
        assert not r["exists"]


def _final(out_dir):
    from safetensors.torch import load_file

    return load_file(str(out_dir / "final.safetensors"))


PRECISIONS = {
    "fp32": {},
    "bf16": {"bf16": {"enabled": True}},
    "fp16": {"fp16": {"enabled": True, "loss_scale": 256}},  # static: a skip leaves the scale as it was
}


@pytest.mark.parametrize("precision", sorted(PRECISIONS))
@pytest.mark.parametrize("bad", ["nan", "inf"])
def test_non_finite_step_is_skipped_everywhere(tmp_path, precision, bad):
    """A NaN/inf loss on rank 1 only: the step is skipped on both ranks, the weights stay as they
    were, and the run continues exactly as a run that never saw that batch."""
    cfg = {"config": PRECISIONS[precision], "steps": 5}
    out = launch(2, "fault_scenarios:nonfinite", {**cfg, "bad_steps": [2], "bad": bad}, tmp_path / "bad", timeout=120)
    ref = launch(2, "fault_scenarios:nonfinite", {**cfg, "omit": [2]}, tmp_path / "ref", timeout=120)
    for r in out:
        assert r["error"] is None, r["error"]
        assert r["unchanged"] == [True] and r["skipped"] == 1 and r["finite"], r
    got, want = _final(tmp_path / "bad"), _final(tmp_path / "ref")
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=0, msg=k)
    assert "step 3 skipped: non-finite gradients" in (tmp_path / "bad" / "rank0.log").read_text() or precision == "fp16"


def test_fp32_stops_after_consecutive_skips(tmp_path):
    out = launch(2, "fault_scenarios:nonfinite",
                 {"config": {"hf_zero": {"max_consecutive_skipped_steps": 3}}, "steps": 8, "bad_steps": [2, 3, 4, 5, 6, 7]},
                 tmp_path / "run", timeout=120)
    for r in out:
        assert r["error"] and "NonFiniteError" in r["error"] and "3 optimizer steps in a row" in r["error"], r
        assert "max_consecutive_skipped_steps=3" in r["error"]
        assert r["skipped"] == 3 and r["unchanged"] == [True, True] and r["finite"]  # the 3rd raised


def test_fp16_at_min_loss_scale_stops_like_deepspeed(tmp_path):
    """Dynamic fp16 from scale 4 with min 1: overflows halve it to 2, then 1; the next overflow at
    the minimum stops the run (DeepSpeed's DynamicLossScaler raises there too)."""
    fp16 = {"fp16": {"enabled": True, "initial_scale_power": 2, "min_loss_scale": 1, "hysteresis": 1}}
    out = launch(2, "fault_scenarios:nonfinite", {"config": fp16, "steps": 10, "bad_steps": list(range(1, 10))},
                 tmp_path / "run", timeout=120)
    for r in out:
        assert r["error"] and "NonFiniteError" in r["error"] and "min_loss_scale=1" in r["error"], r
        assert r["skipped"] == 3 and r["scale"] == 1.0 and r["finite"], r


def test_frozen_peer_ends_within_the_timeout(tmp_path):
    import json

    with pytest.raises(AssertionError, match="failed on rank"):
        launch(2, "fault_scenarios:frozen_peer", {"timeout": 10}, tmp_path / "run", timeout=120)
    r = json.loads((tmp_path / "run" / "frozen0.json").read_text())
    assert r["error"] and "CollectiveTimeout: rank 0:" in r["error"] and "timeout" in r["error"], r
    assert r["seconds"] < 30, r


@pytest.mark.parametrize("route", ["accelerate", "trainer"])
def test_frozen_peer_ends_within_the_integrations_timeout(tmp_path, route):
    """ZeroPlugin(timeout=10) (Accelerate) and TrainingArguments(ddp_timeout=10) (Trainer) reach
    the engine's collectives: a peer frozen with SIGSTOP ends rank 0 with CollectiveTimeout
    naming the rank and the operation, after about 10 s, not torch's default 1800 s."""
    import json

    with pytest.raises(AssertionError, match="failed on rank"):
        launch(2, f"fault_scenarios:frozen_peer_{route}", {"timeout": 10}, tmp_path / "run", timeout=180)
    r = json.loads((tmp_path / "run" / "frozen0.json").read_text())
    assert r["error"] and "CollectiveTimeout: rank 0:" in r["error"] and "timeout" in r["error"], r
    assert "reduce_scatter" in r["error"] or "all_reduce" in r["error"] or "all_gather" in r["error"], r
    assert 9 <= r["seconds"] < 40, r
    print(f"{route}: {r['seconds']:.1f} s: {r['error'][:160]}")


def test_zero_plugin_timeout_is_checked():
    """ZeroPlugin(timeout=) takes seconds or a timedelta; a contradicting InitProcessGroupKwargs
    in the Accelerator's kwargs_handlers is refused naming both values."""
    from datetime import timedelta

    from accelerate.utils import InitProcessGroupKwargs

    import hf_zero
    from hf_zero.integrations.accelerate import _with_timeout

    cfg = {"train_batch_size": 2}
    assert hf_zero.ZeroPlugin(cfg, timeout=7).timeout == timedelta(seconds=7)
    assert hf_zero.ZeroPlugin(cfg, timeout=timedelta(minutes=1)).timeout == timedelta(seconds=60)
    assert hf_zero.ZeroPlugin(cfg).timeout is None
    for bad in ("10", -1, 0, float("nan"), True):
        with pytest.raises(ValueError, match=r"ZeroPlugin\(timeout="):
            hf_zero.ZeroPlugin(cfg, timeout=bad)
    plugin = hf_zero.ZeroPlugin(cfg, timeout=10)
    kwargs = _with_timeout(plugin, {"cpu": True})
    [handler] = kwargs["kwargs_handlers"]
    assert isinstance(handler, InitProcessGroupKwargs) and handler.timeout == timedelta(seconds=10)
    with pytest.raises(ValueError, match=r"timeout=10\) and kwargs_handlers=\[InitProcessGroupKwargs\(timeout=60"):
        hf_zero.ZeroAccelerator(zero_plugin=plugin, cpu=True,
                                kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=60))])
