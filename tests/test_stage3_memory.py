"""Stage 3's memory bound (docs/engine.md, "Stage 3 lifecycle"): at most the root unit plus two
consecutive units of the execution order (the one running and the one prefetched) are
gathered at once, in forward and in backward; nothing stays gathered after a step. Checked
from the engine's counters during real 2-process gloo training (not RSS, which is noisy), and
the unit layout that makes it small: untied embeddings and head are units of their own."""

from __future__ import annotations

import pytest

from launch import launch


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    out = tmp_path_factory.mktemp("s3mem")
    return launch(2, "stage3_memory_scenarios:gather_bound", {"steps": 3}, out, timeout=300)


def _window_bound(res, order):
    """Root + the largest sum of two consecutive units of ``order``: the formula."""
    b = res["unit_bytes"]
    pairs = [b[x] + b[y] for x, y in zip(order, order[1:])] or [b[order[0]]]
    return b[res["root"]] + max(pairs)


def test_embeddings_and_head_are_their_own_units(result):
    units = result[0]["units"]
    assert units[0] == "<root>" and units[1] == "model.embed_tokens" and units[-1] == "lm_head"
    assert all(u.startswith("model.layers.") for u in units[2:-1])


def test_gathered_bytes_peak_is_the_prefetch_window(result):
    for res in result:
        steps = res["steps"]
        order = steps[0]["forward_order"]
        assert order == res["units"][1:]  # embeddings, layers, head: every unit runs once
        # first forward: no recorded order yet, so no prefetch: root + the largest unit
        b = res["unit_bytes"]
        assert steps[0]["forward_peak"] == b[res["root"]] + max(b[u] for u in order)
        bound = _window_bound(res, order)
        for s in steps[1:]:  # later forwards prefetch the next unit of the last order
            assert s["forward_peak"] == bound, (s, bound)
        for s in steps:  # backward always knows its order (the reverse of this forward)
            assert s["backward_peak"] == bound, (s, bound)
            assert s["after_step"] == 0  # everything released after a step


def test_gather_pool_holds_at_most_keep_runs_per_size(result):
    for res in result:
        sizes = sorted(set(res["unit_bytes"].values()))
        for s in res["steps"]:
            if s["pool_free_bytes"] is not None:  # free runs are page-rounded unit sizes
                assert s["pool_free_bytes"] <= res["pool_keep"] * sum(-(-x // 4096) * 4096 for x in sizes)
