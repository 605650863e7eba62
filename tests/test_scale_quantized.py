"""qwZ / qgZ over 200 steps of the tiny recipe on the simulated 2x2 cluster: the loss curve
against the same run with fp32 communication (plain stage 3), within the tolerance measured
and documented in docs/scale.md ("Quantized communication: measured tolerance")."""

from __future__ import annotations

import pytest

from launch import launch_cluster

STEPS = 200
MODES = {
    "fp32": {},
    # the control: exact, only the gradient summation order differs (MiCS), so its distance to
    # "fp32" is what any last-bit change does to this trajectory
    "fp32-MiCS": {"mics_shard_size": 2},
    "qwZ": {"zero_quantized_weights": True},
    "qgZ": {"zero_quantized_gradients": True},
    "qwZ+qgZ+hpZ": {"zero_quantized_weights": True, "zero_quantized_gradients": True, "zero_hpz_partition_size": 2},
}
#: measured on the 2-core box (docs/scale.md). The trajectory is chaotic: the exact control
#: (fp32-MiCS) ends 0.28 away from fp32 on the held-out batch and its 20-step training-loss
#: windows differ by up to 0.054. Quantized: window gaps 0.133 (qwZ), 0.161 (qgZ), 0.145
#: (qwZ+qgZ+hpZ); held-out gaps at most 0.20, 0.39, 0.36. Bounds: about 1.5x the measured.
WINDOW_GAP = 0.25
EVAL_GAP = 0.6

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def curves(tmp_path_factory):
    out = tmp_path_factory.mktemp("scale_curve")
    return launch_cluster(2, 2, "scale_scenarios:loss_curve", {"steps": STEPS, "modes": MODES}, out, timeout=1200)[0]


def _windows(losses, size=20):
    return [sum(losses[i : i + size]) / size for i in range(0, len(losses), size)]


@pytest.mark.parametrize("mode", [m for m in MODES if m != "fp32"])
def test_loss_curve_within_tolerance(curves, mode):
    ref, got = curves["fp32"], curves[mode]
    assert len(got["losses"]) == len(ref["losses"]) == STEPS
    for run in (ref, got):  # both learn: the comparison is not between two flat lines
        w = _windows(run["losses"])
        assert w[-1] < 0.6 * w[0]
        assert run["evals"][-1] < 0.5 * run["evals"][0]
    gaps = [abs(a - b) for a, b in zip(_windows(got["losses"]), _windows(ref["losses"]))]
    assert max(gaps) <= WINDOW_GAP
    assert max(abs(a - b) for a, b in zip(got["evals"], ref["evals"])) <= EVAL_GAP
    assert max(gaps) > 0  # the mode changed something
    if mode != "fp32-MiCS":
        assert got["cross_node"] < ref["cross_node"]
