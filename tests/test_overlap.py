"""Stage 1-2 communication off the critical path (issue 14), in real gloo processes at world 2
(tests/overlap_scenarios.py), against the unsharded reference of tests/models.py:

* stage 1 reduce-scatters each layer during the boundary micro-step's backward, before the last
  gradient of that backward (the embedding's) arrives, as stage 2 does; nothing before it;
* the post-step all-gathers are left in flight (the parameters are ``PendingParameter``) and
  every reader waits: a weight read right after ``step()``, ``model.state_dict()``, an eval
  forward; each equals the unsharded run's value after the same number of steps.
Tolerance as tests/test_parity.py for fp32 SGD (1e-6); losses to 1e-5.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from launch import launch
from models import batches, reference_run
from overlap_scenarios import PROBE, STEPS

CASES = [dict(stage=1, accum=1), dict(stage=1, accum=2), dict(stage=2, accum=2)]
LAYERS = 2  # the tiny Llama of tests/models.py
# its units: the two layers, the untied embedding and head (units of their own), and the root
# (the final norm); the root is reduced at the end of backward, every other unit before it
UNITS = LAYERS + 3


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("overlap")
    return out, launch(2, "overlap_scenarios:run", {"cases": CASES}, out, timeout=600)


def _key(case):
    return f"stage{case['stage']}-accum{case['accum']}"


def _ref(steps, accum):
    model, losses = reference_run("llama", "sgd", batches(STEPS, accum, 2)[:steps], 0.0)
    return model, losses


@pytest.mark.parametrize("case", CASES, ids=_key)
def test_reductions_overlap_backward(run, case):
    _, results = run
    for r in results:
        micro = r[_key(case)]["micro"]
        assert r[_key(case)]["units"] == UNITS
        assert len(micro) == STEPS * case["accum"]
        for m in micro:
            if case["stage"] == 2 or m["boundary"]:
                # every layer's reduce-scatter went out before backward reached the embedding
                assert m["before_end"] >= LAYERS, micro
                assert m["reduced_early"] == UNITS - 1, micro
                assert m["issued"] == m["in_backward"] > m["before_end"], micro  # the root's at the end
            else:  # stage 1 between boundaries: gradients only accumulate
                assert m["issued"] == 0 and m["reduced_early"] == 0, micro


@pytest.mark.parametrize("case", CASES, ids=_key)
def test_reads_after_step_see_updated_weights(run, case):
    out, results = run
    key = _key(case)
    for r in results:  # the lazy path ran: every step left its gathers in flight
        assert all(e["pending"] and e["pending_units"] == UNITS and e["plain_after"]
                   for e in r[key]["after_step"]), r[key]["after_step"]
    got = load_file(str(out / f"{key}.safetensors"))
    ref1, _ = _ref(1, case["accum"])
    torch.testing.assert_close(got["probe"], ref1.state_dict()[PROBE], atol=1e-6, rtol=0)
    ref2, _ = _ref(2, case["accum"])
    for k, v in ref2.state_dict().items():
        torch.testing.assert_close(got[f"state_dict.{k}"], v, atol=1e-6, rtol=0, msg=lambda m: f"{k}: {m}")
    ref3, _ = _ref(3, case["accum"])
    for k, v in ref3.state_dict().items():
        torch.testing.assert_close(got[f"final.{k}"], v, atol=1e-6, rtol=0, msg=lambda m: f"{k}: {m}")
    # guard against a vacuous pass: the weights moved between the reads
    assert (got["probe"] - ref2.state_dict()[PROBE]).abs().max() > 1e-4
    ref3.eval()
    with torch.no_grad():
        expected = float(ref3(**batches(STEPS, case["accum"], 2)[0][0][0]).loss)
    assert results[0][key]["eval_loss"] == pytest.approx(expected, abs=1e-5)
