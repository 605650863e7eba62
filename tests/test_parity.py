"""Stages 0-3 at world sizes 1, 2 and 3 give the weights of an unsharded single-process run.

Each world size is one launch of real gloo processes that trains every case; the reference
runs here, unsharded, on the same global batches (see models.reference_run).

Tolerance, fp32: the sharded run sums the same gradients in a different order (per rank and
micro-step, then across ranks) than the reference, so gradients differ in the last bits
(~1e-7 relative). SGD carries that through linearly: weights agree to 1e-6. Adam divides by the
root of the second moment, which turns last-bit noise of near-zero gradients into visible
differences (up to ~1e-4 of a weight at lr 1e-2 after three steps, measured ~3e-5), so AdamW
cases use atol 2e-4. Losses agree to 1e-5. Mixed precision (SGD, weights moved ~1e-2): bf16
within 3e-4 (measured 9e-5), fp16 within 1e-4 (measured 1e-5).
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from launch import launch
from models import batches, reference_run
from scenarios import case_id

MODELS = ["llama", "gpt2", "mixtral", "sparse_moe"]
BASE = [dict(model=m, stage=s, opt=o, clip=0.5, accum=2) for m in MODELS for s in (0, 1, 2, 3) for o in ("adamw", "sgd")]
EXTRA = [
    # activation checkpointing, both torch flavours, at the stages that move parameters
    dict(model="llama", stage=3, opt="sgd", clip=0.5, accum=2, checkpointing="reentrant"),
    dict(model="llama", stage=3, opt="sgd", clip=0.5, accum=2, checkpointing="nonreentrant"),
    dict(model="llama", stage=2, opt="adamw", clip=0.5, accum=2, checkpointing="nonreentrant"),
    # frozen parameters (embeddings), in the root unit and inside layers
    dict(model="llama", stage=3, opt="adamw", clip=0.5, accum=2, freeze="embed_tokens"),
    dict(model="gpt2", stage=2, opt="sgd", clip=0.5, accum=2, freeze="attn.c_attn"),
    dict(model="llama", stage=1, opt="sgd", clip=0.5, accum=2, freeze="mlp"),
]
# Mixed precision (bf16 / fp16 weights, fp32 master, fp16 loss scaling) against the fp32
# reference. SGD only: Adam turns low-precision gradient noise into sign flips of whole updates.
MIXED = [dict(model="llama", stage=s, opt="sgd", clip=0.5, accum=2, dtype=d) for s in (0, 1, 2, 3) for d in ("bf16", "fp16")]
CASES = BASE + EXTRA + MIXED
TOLERANCE = {"bf16": 3e-4, "fp16": 1e-4}
WORLDS = [1, 2, 3]


@pytest.fixture(scope="module", params=WORLDS, ids=lambda w: f"world{w}")
def run(request, tmp_path_factory):
    world = request.param
    out = tmp_path_factory.mktemp(f"parity{world}")
    results = launch(world, "parity", {"cases": CASES}, out, timeout=900)
    return world, out, results


def _reference(case, world, cache={}):
    key = (case_id(case), world)
    if key not in cache:
        freeze = case.get("freeze")
        cache[key] = reference_run(case["model"], case["opt"], batches(3, case["accum"], world), case["clip"],
                                   freeze=(lambda n: freeze in n) if freeze else None)
    return cache[key]


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_weights_match_unsharded_reference(run, case):
    world, out, results = run
    ref_model, ref_losses = _reference(case, world)
    got = load_file(str(out / f"{case_id(case)}.safetensors"))
    ref = ref_model.state_dict()
    assert set(got) == set(ref)
    atol = TOLERANCE.get(case.get("dtype"), 2e-4 if case["opt"] == "adamw" else 1e-6)
    for name, expected in ref.items():
        torch.testing.assert_close(got[name], expected.float(), atol=atol, rtol=0, msg=lambda m: f"{name}: {m}")
    # the mean loss over ranks and micro-batches equals the reference's global-batch loss
    per_rank = [r[case_id(case)]["losses"] for r in results]
    mean = [sum(x) / world for x in zip(*per_rank)]
    assert mean == pytest.approx(ref_losses, abs=1e-5 if "dtype" not in case else 2e-2)
    assert all(r[case_id(case)]["steps"] == 3 for r in results)


def test_weights_moved(run):
    """Guard against a vacuous pass: training changed the weights."""
    world, out, _ = run
    from models import build

    case = BASE[0]
    got = load_file(str(out / f"{case_id(case)}.safetensors"))
    init = build(case["model"]).state_dict()
    assert max((got[k] - init[k]).abs().max().item() for k in init) > 1e-3
