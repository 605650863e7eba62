"""Beyond one node, on a simulated cluster of 2 nodes x 2 ranks (two torchrun agents on
localhost, c10d rendezvous; tests/launch.py:launch_cluster), one launch for the module.

* Topology: the engine's node of every rank is torchrun's GROUP_RANK.
* Exact modes (MiCS at stages 1-3, hpZ at stage 3): the weights and losses of the unsharded
  single-process reference (models.reference_run) on the same global batches, with the
  tolerances of tests/test_parity.py (fp32, SGD: 1e-6; AdamW: 2e-4).
* Bytes: every step's bytes, summed over the 4 ranks and split by link, equal
  hf_zero.memory.link_bytes_per_step; hpZ's backward all-gather sends nothing across nodes
  and MiCS with a shard group per node sends only the replica all-reduce across them.
* Quantized modes (qwZ, qgZ, both with hpZ): within the tolerance measured over 3 steps here
  (the 200-step loss-curve measurement is tests/test_scale_quantized.py and docs/scale.md).
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from hf_zero.memory import link_bytes_per_step
from launch import launch_cluster
from models import batches, reference_run
from scenarios import case_id

NODES, PER_NODE = 2, 2
WORLD = NODES * PER_NODE
BASE = dict(model="llama", opt="sgd", clip=0.5, accum=2)
EXACT = [
    dict(BASE, stage=3),
    *[dict(BASE, stage=s, mics_shard_size=2) for s in (1, 2, 3)],
    dict(BASE, stage=3, mics_shard_size=2, opt="adamw"),
    dict(BASE, stage=3, zero_hpz_partition_size=2),
]
QUANTIZED = [
    dict(BASE, stage=3, zero_quantized_weights=True),
    dict(BASE, stage=3, zero_quantized_gradients=True),
    dict(BASE, stage=3, zero_quantized_weights=True, zero_quantized_gradients=True, zero_hpz_partition_size=2),
]
CASES = EXACT + QUANTIZED
#: measured at 3 steps on this recipe (on the 2-core box): max |weight - reference| 7.0e-5 (qwZ),
#: 6.7e-5 (qgZ), 8.5e-5 (qwZ + qgZ + hpZ); mean losses within 6.5e-5 of the reference. The
#: bounds leave about 5x that; the exact modes are at 7e-9, so a bound this size still catches a
#: quantization that does not happen (diff 0) or that breaks (diffs of 1e-2 and more).
QUANT_WEIGHT_ATOL = 5e-4
QUANT_LOSS_ATOL = 5e-4

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("scale2x2")
    results = launch_cluster(NODES, PER_NODE, "scale_scenarios:train", {"cases": CASES}, out, timeout=900)
    return out, results


def _reference(case, cache={}):
    key = case_id({k: v for k, v in case.items() if k in ("model", "opt", "clip", "accum")})
    if key not in cache:
        cache[key] = reference_run(case["model"], case["opt"], batches(3, case["accum"], WORLD), case["clip"])
    return cache[key]


def _max_diff(out, case):
    got = load_file(str(out / f"{case_id(case)}.safetensors"))
    ref = _reference(case)[0].state_dict()
    assert set(got) == set(ref)
    return max((got[k] - ref[k].float()).abs().max().item() for k in ref)


def test_topology_is_torchruns(run):
    _, results = run
    for rank, res in enumerate(results):
        where = res["where"]
        assert where["rank"] == rank and where["world"] == WORLD
        assert where["GROUP_RANK"] == str(rank // PER_NODE) and where["LOCAL_WORLD_SIZE"] == str(PER_NODE)
        assert where["node"] == rank // PER_NODE and where["ranks_per_node"] == PER_NODE


@pytest.mark.parametrize("case", EXACT, ids=case_id)
def test_exact_modes_match_unsharded_reference(run, case):
    out, results = run
    got = load_file(str(out / f"{case_id(case)}.safetensors"))
    ref_model, ref_losses = _reference(case)
    atol = 2e-4 if case["opt"] == "adamw" else 1e-6
    for name, expected in ref_model.state_dict().items():
        torch.testing.assert_close(got[name], expected.float(), atol=atol, rtol=0, msg=lambda m: f"{name}: {m}")
    mean = [sum(x) / WORLD for x in zip(*[r["cases"][case_id(case)]["losses"] for r in results])]
    assert mean == pytest.approx(ref_losses, abs=1e-5)
    expected_shard = case.get("mics_shard_size", WORLD)
    assert all(r["cases"][case_id(case)]["shard_world"] == expected_shard for r in results)


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_bytes_by_link_match_formula(run, case):
    _, results = run
    res = [r["cases"][case_id(case)] for r in results]
    flats = [padded for _numel, padded, _b, trainable, _unit in res[0]["flats"] if trainable]
    assert len(flats) == len(res[0]["flats"])  # no frozen flats in these cases
    # stage 3 does not gather lm_head (carried from forward) nor the embedding again in backward;
    # the run's first micro-step has no earlier forward to carry lm_head by, so it gathers it
    units = [unit for *_, unit in res[0]["flats"]]
    again = [u not in ("lm_head", "model.embed_tokens") for u in units]
    first = [u != "model.embed_tokens" for u in units]

    def formula(accum, backward_gathered):
        return link_bytes_per_step(
            flats, case["stage"], NODES, PER_NODE, accum=accum, param_bytes=4, grad_bytes=4,
            mics_shard_size=case.get("mics_shard_size", -1), hpz_partition_size=case.get("zero_hpz_partition_size", 1),
            quantized_weights=case.get("zero_quantized_weights", False),
            quantized_gradients=case.get("zero_quantized_gradients", False), backward_gathered=backward_gathered)

    expected = formula(case["accum"], again)
    if case["stage"] == 3:  # (stage-3 bytes add up per micro-step)
        a, b = formula(1, first), formula(case["accum"] - 1, again)
        expected_first = {k: a[k] + b[k] for k in a}
        assert sum(expected_first.values()) > sum(expected.values())
    else:
        expected_first = expected
    steps = len(res[0]["comm"])
    assert steps == 3
    for step in range(steps):
        want = expected_first if step == 0 else expected
        cross = sum(r["comm"][step]["cross_node"]["data"] for r in res)
        intra = sum(r["comm"][step]["intra_node"]["data"] for r in res)
        # counters round each collective to whole bytes (all-reduce volumes are fractional)
        assert cross == pytest.approx(want["cross_node"], abs=64)
        assert intra == pytest.approx(want["intra_node"], abs=64)
        assert cross + intra == sum(r["comm"][step]["data"] for r in res)


def test_cross_node_savings(run):
    """The point of each mode, in measured cross-node bytes per step against plain stage 3."""
    _, results = run

    def cross(case):
        return sum(r["cases"][case_id(case)]["comm"][-1]["cross_node"]["data"] for r in results)

    def kind(case, k):
        return sum(r["cases"][case_id(case)]["comm"][-1]["cross_node"][k] for r in results)

    base = cross(EXACT[0])
    hpz = EXACT[-1]
    # hpZ: the backward all-gather stays in the node, so only the forward's crosses nodes; plain
    # stage 3 gathers again in backward the share r of the elements that is not lm_head (carried
    # from forward) or the embedding: its cross-node all-gather bytes are (1 + r) x the forward's
    flats = results[0]["cases"][case_id(EXACT[0])]["flats"]
    r = (sum(padded for _n, padded, _b, _t, unit in flats if unit not in ("lm_head", "model.embed_tokens"))
         / sum(padded for _n, padded, *_ in flats))
    assert 0.5 < r < 1
    assert kind(hpz, "all_gather") == pytest.approx(kind(EXACT[0], "all_gather") / (1 + r), rel=1e-9)
    # MiCS with one shard group per node: no all-gather or reduce-scatter crosses nodes
    mics3 = EXACT[3]
    assert kind(mics3, "all_gather") == 0 and kind(mics3, "reduce_scatter") == 0
    assert kind(mics3, "all_reduce") > 0
    # qwZ + qgZ + hpZ: less than a third of plain stage 3's cross-node bytes (fp32 here)
    assert cross(QUANTIZED[-1]) < base / 3


@pytest.mark.parametrize("case", QUANTIZED, ids=case_id)
def test_quantized_modes_within_tolerance(run, case):
    out, results = run
    diff = _max_diff(out, case)
    assert 0 < diff <= QUANT_WEIGHT_ATOL  # > 0: the quantization really ran
    mean = [sum(x) / WORLD for x in zip(*[r["cases"][case_id(case)]["losses"] for r in results])]
    assert mean == pytest.approx(_reference(case)[1], abs=QUANT_LOSS_ATOL)
