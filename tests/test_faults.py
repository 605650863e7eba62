"""Faults a long run meets (issue 13): every rank fails loudly and at once, nothing hangs, and
nothing already saved is lost. Real gloo processes with the fault injected into one rank."""

from __future__ import annotations

import pytest

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
