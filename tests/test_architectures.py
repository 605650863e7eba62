"""Eleven more architectures (tests/arch_scenarios.py) at stages 2 and 3 on 2 gloo processes give
the losses and weights of an unsharded single-process run of the same global batches.

Tolerance as tests/test_parity.py: fp32 SGD, weights to 1e-6, losses to 1e-5 (measured on the
2-core box: losses within 2.4e-7, weights within 3e-8). Slow: one launch of about 30 s."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from arch_scenarios import ARCHITECTURES, STEPS, batch, optimizer, tiny
from launch import launch

STAGES = [2, 3]
WORLD = 2


def _reference(name: str):
    model = tiny(name)
    opt = optimizer(model)
    losses = []
    for step in range(STEPS):
        total = 0.0
        for rank in range(WORLD):
            loss = model(**batch(name, step, rank)).loss
            (loss / WORLD).backward()
            total += loss.item() / WORLD
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        losses.append(total)
    return losses, model.state_dict()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("architectures")
    return out, launch(WORLD, "arch_scenarios:train", {"architectures": ARCHITECTURES, "stages": STAGES}, out,
                       timeout=900)[0]


@pytest.mark.slow
@pytest.mark.parametrize("name", ARCHITECTURES)
def test_architecture_matches_unsharded(run, name):
    out, results = run
    ref_losses, ref_sd = _reference(name)
    for stage in STAGES:
        assert results[f"{name}-{stage}"] == pytest.approx(ref_losses, abs=1e-5), stage
        got = load_file(str(out / f"{name}-{stage}.safetensors"))
        assert set(got) == set(ref_sd), (stage, sorted(set(ref_sd) ^ set(got))[:5])
        for key, value in ref_sd.items():
            torch.testing.assert_close(got[key], value, atol=1e-6, rtol=0, msg=f"stage {stage}: {key}")
