"""Gradients written by autograd straight into the flat buffers (``.grad`` as views), the
stage 2/3 gradient-buffer pool and the stage-3 gather pool (CPU), against an unsharded
single-process run (models.reference_run, SGD: weights agree to 1e-6, see test_parity.py)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from grad_view_scenarios import ACCUM, STEPS
from launch import launch
from models import batches, reference_run
from scenarios import case_id

from hf_zero.engine.pool import BufferPool, GatherPool

CASES = ([dict(stage=s, mode=m) for s in (0, 1, 2, 3) for m in ("plain", "user_clear")]
         + [dict(stage=s, mode="create_graph") for s in (0, 2)])


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("views")
    results = launch(2, "grad_view_scenarios:views", {"cases": CASES}, out, timeout=600)
    ref_model, ref_losses = reference_run("llama", "sgd", batches(STEPS, ACCUM, 2), 0.0)
    return out, results, ref_model, ref_losses


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_views_train_like_unsharded(run, case):
    out, results, ref_model, ref_losses = run
    got = load_file(str(out / f"{case_id(case)}.safetensors"))
    for name, expected in ref_model.state_dict().items():
        torch.testing.assert_close(got[name], expected, atol=1e-6, rtol=0, msg=lambda m: f"{name}: {m}")
    mean = [sum(x) / 2 for x in zip(*[r[case_id(case)]["losses"] for r in results])]
    assert mean == pytest.approx(ref_losses, abs=1e-5)
    for r in results:
        res = r[case_id(case)]
        if case["stage"] <= 1:
            assert res["views"] and all(res["views"])  # autograd wrote into the flat buffers
        else:
            assert res["unbound_after"] and all(res["unbound_after"])
            # one buffer per trainable flat per backward (root, embeddings, 2 layers, head: 5);
            # after the first backward every buffer is reused
            flats = res["trainable_flats"]
            assert flats == 5
            assert res["pool_taken"] == STEPS * ACCUM * flats and res["pool_reused"] >= res["pool_taken"] - flats


def test_weights_moved(run):
    out, _, ref_model, _ = run
    from models import build

    start = build("llama").state_dict()
    assert max(float((ref_model.state_dict()[k] - v).abs().max()) for k, v in start.items()) > 1e-3


def test_stage3_gather_pool_reuses_pages_within_the_prefetch_window(run):
    _, results, _, _ = run
    for r in results:
        res = r[case_id(dict(stage=3, mode="plain"))]
        g = res["gather"]
        # the windows' pages went to the pool when the shards were detached: no gather misses
        assert g[-1]["misses"] == 0 and g[-1]["moves_in"] > g[0]["moves_in"] > 0
        # between steps the pool holds at most `keep` free runs of each size
        assert all(s["free_bytes"] <= res["gather_keep"] * sum(res["gather_spans"]) for s in g)


def test_gather_pool_moves_pages_and_saved_views_see_the_next_gather():
    pool = GatherPool.for_cpu(keep=1)
    if pool is None:
        pytest.skip("no mremap on this platform: flats resize their storage instead")
    a = pool.window(3000, torch.float32)
    b = pool.window(3000, torch.float32)
    saved = a[5:15].view(2, 5)  # what autograd keeps of a parameter across release / gather
    a.fill_(1.5)
    pool.release(a)
    assert float(a.abs().sum()) == 0.0 and pool.free_bytes == pool._span(a)  # released: zero pages
    pool.acquire(b)  # a's resident pages, moved, not copied
    assert float(b[0]) == 1.5 and pool.free_bytes == 0 and pool.moves_in == 1
    b.fill_(2.0)
    pool.release(b)
    pool.release(a)  # a holds nothing; keep=1 is full: dropped, the pool stays bounded
    assert pool.free_bytes == pool._span(a)
    pool.acquire(a)
    a.fill_(3.0)
    assert torch.equal(saved, torch.full((2, 5), 3.0))
    pool.acquire(b)  # nothing free: a miss, b gets fresh zero pages on touch
    assert pool.misses == 1 and float(b.abs().sum()) == 0.0


def test_buffer_pool_hands_out_zeroed_buffers_and_trims():
    pool = BufferPool(keep=1)
    x = pool.take(10, torch.float32, torch.device("cpu"))
    x.fill_(4.0)
    y = pool.take(10, torch.float32, torch.device("cpu"))
    pool.give(x)
    pool.give(y)
    z = pool.take(10, torch.float32, torch.device("cpu"))
    assert z.data_ptr() in (x.data_ptr(), y.data_ptr()) and float(z.abs().sum()) == 0.0 and pool.reused == 1
    pool.give(z)
    pool.trim()
    assert pool.free_bytes == 10 * 4
