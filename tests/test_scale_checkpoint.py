"""Checkpoints under MiCS / hpZ resume without them at another world size, and the reverse.

The run of tests/test_checkpoint.py (AdamW, StepLR, global batch 12, 6 steps) split at step 3:
written on the simulated 2x2 cluster under MiCS (shard groups of 2, one per node) and read by a
plain stage-2 world of 3; written by a plain stage-3 world of 2 and read on the 2x2 cluster
under hpZ and under MiCS at stage 1. Every continuation gives the uninterrupted run's losses
(equal up to summation order, as test_checkpoint.py's cross-world resumes).
"""

from __future__ import annotations

import pytest

from hf_zero.checkpoint.format import Index, resolve_tag
from launch import launch, launch_cluster

S = "checkpoint_scenarios:train"
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("scale_ckpt")
    out = {"full": launch(2, S, {"stage": 2, "start": 0, "stop": 6}, root / "l_full")[0]}
    mics, plain = root / "ck_mics", root / "ck_plain"
    out["mics_save"] = launch_cluster(2, 2, S, {"stage": 3, "start": 0, "stop": 3, "save": str(mics),
                                                "zero_extra": {"mics_shard_size": 2}}, root / "l_mics")[0]
    out["mics_to_3"] = launch(3, S, {"stage": 2, "start": 3, "stop": 6, "load": str(mics)}, root / "l_m3")[0]
    out["plain_save"] = launch(2, S, {"stage": 3, "start": 0, "stop": 3, "save": str(plain)}, root / "l_plain")[0]
    out["plain_to_hpz"] = launch_cluster(2, 2, S, {"stage": 3, "start": 3, "stop": 6, "load": str(plain),
                                                   "zero_extra": {"zero_hpz_partition_size": 2}}, root / "l_hpz")[0]
    out["plain_to_mics1"] = launch_cluster(2, 2, S, {"stage": 1, "start": 3, "stop": 6, "load": str(plain),
                                                     "zero_extra": {"mics_shard_size": 2}}, root / "l_m1")[0]
    return root, out


def test_mics_checkpoint_layout(runs):
    root, _ = runs
    index = Index.read(resolve_tag(root / "ck_mics", None))
    assert index.world_size == 4
    # one shard group's layout: the files of ranks 0-1 hold the shards, ranks 2-3 (replicas) none
    assert {f.shard_world for f in index.flats.values()} == {2}


def test_first_halves_agree(runs):
    _, out = runs
    assert out["mics_save"]["losses"] == pytest.approx(out["full"]["losses"][:3], abs=2e-5)
    assert out["plain_save"]["losses"] == pytest.approx(out["full"]["losses"][:3], abs=2e-5)


@pytest.mark.parametrize("name", ["mics_to_3", "plain_to_hpz", "plain_to_mics1"])
def test_resume_across_modes_and_worlds(runs, name):
    _, out = runs
    assert out[name]["losses"] == pytest.approx(out["full"]["losses"][3:], abs=2e-5)
    assert out[name]["lr"] == out["full"]["lr"]
