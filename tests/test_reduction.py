"""The reduction rule against the unsharded reference (issue 12, items 2-4).

A unit used twice in one forward, two forwards before one backward, several backward() calls
before one step(), activation checkpointing on top, stage 3 with the CPU optimizer step run
eagerly during backward, and ranks that run different units: every case is trained in real
gloo processes at world 2 and 3 and its final weights compared with one unsharded process on
the same global batches (tests/reduction_scenarios.py). Tolerances as in tests/test_parity.py:
fp32 SGD to 1e-6, AdamW to 2e-4.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
from safetensors.torch import load_file

from launch import launch
from reduction_scenarios import make_model, reference
from scenarios import case_id

REUSE_TWICE = [0, 1, 0, 2]  # block 0 re-run after block 1: shared weights, non-adjacent uses
REUSE_BACKWARDS = [2, 1, 0, 1]  # against module order, block 1 twice

CASES = [
    # a unit used twice in one forward (stage 1 as the control that always worked)
    *[dict(model="reuse", stage=s, plan=REUSE_TWICE) for s in (1, 2, 3)],
    *[dict(model="reuse", stage=s, plan=REUSE_BACKWARDS, opt="adamw") for s in (2, 3)],
    # two forwards before one backward: loss = f(x) + f(x')
    *[dict(model="llama", stage=s, pattern="two_forwards") for s in (2, 3)],
    dict(model="reuse", stage=3, pattern="two_forwards", plan=REUSE_TWICE, accum=1),
    # several backward() before one step(): both forwards first, or each before its backward
    *[dict(model="llama", stage=s, pattern="two_backwards") for s in (2, 3)],
    dict(model="reuse", stage=3, pattern="interleaved", plan=REUSE_TWICE, accum=1),
    # with Hugging Face activation checkpointing, both torch flavours
    dict(model="llama", stage=3, pattern="two_forwards", checkpointing="reentrant"),
    dict(model="llama", stage=3, pattern="two_forwards", checkpointing="nonreentrant"),
    dict(model="llama", stage=2, pattern="two_backwards", checkpointing="reentrant"),
    # an MoE whose experts get tokens on some ranks only, recomputed inside backward
    dict(model="mixtral", stage=3, pattern="two_forwards", checkpointing="reentrant", opt="adamw"),
    # stage 3 + CPU optimizer offload, eager per-unit step: accumulation, two backward() calls
    dict(model="llama", stage=3, offload="cpu", eager=True),
    dict(model="llama", stage=3, offload="cpu", eager=True, pattern="two_backwards", accum=1),
    dict(model="llama", stage=3, offload="cpu", eager=True, pattern="two_backwards"),
    dict(model="reuse", stage=2, offload="cpu", eager=True, plan=REUSE_TWICE),
    # what the use counting cannot see comes late and is reduced at the end of backward: a
    # block's weight used by the root before the block runs; the same graph backwarded twice
    dict(model="reuse", stage=2, outside=True),
    dict(model="reuse", stage=2, outside=True, plan=REUSE_TWICE, pattern="two_forwards", accum=1),
    dict(model="reuse", stage=3, pattern="retain", plan=REUSE_TWICE, accum=1),
    dict(model="llama", stage=2, pattern="retain"),
    # rank-dependent control flow: rank 0 leaves out block 1 (stage 2: supported)
    dict(model="reuse", stage=2, skip_on=0),
    dict(model="reuse", stage=2, skip_on=1, plan=REUSE_TWICE, pattern="two_forwards", opt="adamw"),
    # stage 1 reduce-scatters each unit during the boundary micro-step's backward, by the same
    # rule; its full buffers hold the whole window, so a unit that changes after its reduction
    # (a late gradient, a second backward()) is reduced again, replacing the first result
    *[dict(model="llama", stage=1, pattern=p) for p in ("two_forwards", "two_backwards", "retain")],
    dict(model="reuse", stage=1, pattern="two_backwards", plan=REUSE_BACKWARDS, accum=1, opt="adamw"),
    dict(model="reuse", stage=1, pattern="interleaved", plan=REUSE_TWICE, accum=1),
    dict(model="reuse", stage=1, outside=True),
    dict(model="reuse", stage=1, skip_on=0),
    dict(model="llama", stage=1, pattern="two_backwards", checkpointing="reentrant"),
]


def test_stage3_rank_dependent_control_flow_fails_clearly(tmp_path):
    """Stage 3 cannot pair all-gathers of ranks that run different units: every rank raises the
    same error naming both units (before any data moves), never a hang or wrong weights."""
    results = launch(2, "reduction_scenarios:stage3_rank_dependent", {}, tmp_path, timeout=300)
    for r in results:
        assert r["error"] is not None
        assert "rank 0: blocks.2, rank 1: blocks.1" in r["error"] and "use stage 2" in r["error"]


def test_second_backward_after_eager_cpu_step_fails_clearly(tmp_path):
    """Offload's eager CPU step, trusted after boundaries with one backward(), then a second
    backward() at a boundary: the clear error (its gradients cannot reach stepped units)."""
    results = launch(2, "reduction_scenarios:eager_then_two_backwards", {"stage": 3}, tmp_path, timeout=300)
    for r in results:
        assert r["error"] is not None and "a second backward() before step()" in r["error"]
        assert r["eager"], "the first backward should have stepped units eagerly"

# Stage 3 reads the block's weight outside its forward through the on-demand gather of
# hf_zero.engine.access (the "access" work); where it exists, the late gradient is exact there too.
if importlib.util.find_spec("hf_zero.engine.access") is not None:
    CASES.append(dict(model="reuse", stage=3, outside=True))


@pytest.fixture(scope="module", params=[2, 3], ids=lambda w: f"world{w}")
def run(request, tmp_path_factory):
    world = request.param
    out = tmp_path_factory.mktemp(f"reduction{world}")
    results = launch(world, "reduction_scenarios:reduction", {"cases": CASES}, out, timeout=900)
    return world, out, results


_REF = {}


def _reference(case, world):
    key = (case_id(case), world)
    if key not in _REF:
        _REF[key] = reference(case, world)
    return _REF[key]


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_matches_unsharded_reference(run, case):
    world, out, results = run
    key = case_id(case)
    ref_model, ref_losses = _reference(case, world)
    got = load_file(str(out / f"{key}.safetensors"))
    ref = ref_model.state_dict()
    assert set(got) == set(ref)
    atol = 2e-4 if case.get("opt") == "adamw" else 1e-6
    for name, expected in ref.items():
        torch.testing.assert_close(got[name], expected.float(), atol=atol, rtol=0, msg=lambda m: f"{name}: {m}")
    # guard against a vacuous pass: training moved the weights
    start = make_model(case).state_dict()
    moved = max((got[k] - start[k].float()).abs().max().item() for k in ref)
    assert moved > 1e-3, f"weights did not move ({moved})"
    per_rank = [r[key]["losses"] for r in results]
    mean = [sum(x) / world for x in zip(*per_rank)]
    assert mean == pytest.approx(ref_losses, abs=1e-5)
    assert all(r[key]["steps"] == 3 for r in results)
    if case.get("eager"):
        # the eager CPU step ran (steps 2 and 3: trusted after one boundary with one backward)
        # exactly when the boundary micro-step had a single backward()
        expected = [1, 2] if case.get("pattern", "single") == "single" else []
        assert all(r[key]["eager_steps"] == expected for r in results), [r[key]["eager_steps"] for r in results]
    # what the rule decided: only a use it cannot count comes late, and the layers are reduced
    # during backward (overlap), except in the first of two backward() calls after two forwards,
    # whose units still await the second forward's uses
    assert all(r[key]["late"] == (["blocks.2"] if case.get("outside") else []) for r in results)
    assert all(_expected_early(case, len(r[key]["early"])) in (None, r[key]["early"]) for r in results), \
        [r[key]["early"] for r in results]


def _expected_early(case, backwards):
    # the non-root units: the reuse model's 3 blocks; llama's 2 layers plus its untied
    # embeddings and head, units of their own (hf_zero.engine.units.with_embedding_units)
    layers = 3 if case["model"] == "reuse" else 4
    if case["model"] == "mixtral":
        return None  # an expert without tokens on a rank makes the count data-dependent
    pattern = case.get("pattern", "single")
    per_micro = 2 if pattern in ("two_backwards", "retain", "interleaved") else 1
    # one micro-step's backward() calls: the first of two after both forwards reduces at its end
    micro = [0, layers] if pattern == "two_backwards" else [layers] * per_micro
    if case["stage"] < 2:  # stage 1: only at the boundary micro-step (the last of ``accum``)
        accum = case.get("accum", 2)
        return ([0] * per_micro * (accum - 1) + micro) * (backwards // (per_micro * accum))
    return micro * (backwards // per_micro)


def test_check_unit_order_key():
    from hf_zero.config import ZeroConfig

    assert ZeroConfig.load({"zero_optimization": {"stage": 3}}).hf_zero.check_unit_order is True
    off = ZeroConfig.load({"zero_optimization": {"stage": 3}, "hf_zero": {"check_unit_order": False}})
    assert off.hf_zero.check_unit_order is False
    with pytest.raises(Exception, match="check_unit_order"):
        ZeroConfig.load({"hf_zero": {"check_unit_order": "sometimes"}})


def test_order_check_is_one_small_all_reduce_per_gather(tmp_path):
    """Stage 3, world 2: with the check, each all-gather of a unit adds one control all-reduce
    of 2 int64 (16 ring bytes at world 2) and nothing else; ``check_unit_order: false`` removes it."""
    results = launch(2, "reduction_scenarios:order_check_cost", {}, tmp_path, timeout=300)
    for r in results:
        on, off = r["True"], r["False"]
        assert off["checks"] == 0 and on["checks"] >= 2 * 3  # root + 2 layers, forward and backward
        assert on["control"] - off["control"] == 16 * on["checks"]
