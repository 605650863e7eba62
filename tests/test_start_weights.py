"""Ranks that disagree at start train from rank 0's weights, and rank 0 says so (issue 13.11)."""

import pytest

from launch import launch


@pytest.mark.parametrize("seeds,warned", [((0, 1), True), ((0, 0), False)])
def test_rank0_weights_win_and_a_difference_is_logged(tmp_path, seeds, warned):
    results = launch(2, "start_scenarios:different_seeds", {"seeds": list(seeds), "stage": 3}, tmp_path)
    assert all(r["max_diff_from_rank0_model"] == 0.0 for r in results)
    log0 = (tmp_path / "rank0.log").read_text()
    assert ("differ from rank 0's" in log0) is warned
