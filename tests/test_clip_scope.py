"""Gradient clipping counts the optimizer's parameters only (issue 12 item 5), as DeepSpeed's
does: a trainable parameter left out of the optimizer gets a gradient but neither enters the
norm nor moves. Reference: an unsharded single-process run that clips over the optimizer's
parameters with ``torch.nn.utils.clip_grad_norm_``."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from clip_scenarios import CLIP, EXCLUDED, optimized_groups
from launch import launch
from models import batches, build, make_optimizer

STAGES = [0, 1, 2, 3]


def _reference(world: int):
    model = build("llama")
    opt = make_optimizer("sgd", optimized_groups(model))
    optimized = [p for g in opt.param_groups for p in g["params"]]
    norms = []
    for step in batches(3, 2, world):
        n = len(step) * len(step[0])
        for micro in step:
            for batch in micro:
                (model(**batch).loss / n).backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(optimized, CLIP)))
        opt.step()
        opt.zero_grad()
    return model, norms


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("clip_scope")
    return out, launch(2, "clip_scenarios:clip_scope", {"stages": STAGES}, out)[0]


@pytest.mark.parametrize("stage", STAGES)
def test_clipping_counts_only_the_optimizers_parameters(run, stage):
    out, results = run
    reference, ref_norms = _reference(2)
    assert results[str(stage)] == pytest.approx(ref_norms, rel=1e-5)
    got = load_file(str(out / f"stage{stage}.safetensors"))
    initial = dict(build("llama").named_parameters())
    for name, p in reference.named_parameters():
        torch.testing.assert_close(got[name], p.detach(), atol=1e-6, rtol=0, msg=name)
        if EXCLUDED in name:  # held out of the optimizer: unchanged
            torch.testing.assert_close(got[name], initial[name].detach(), atol=0, rtol=0, msg=name)


def test_reference_clips_actively():
    """The case can fail: every step's norm is above the threshold, and counting the excluded
    parameters would give a different norm."""
    model, norms = _reference(2)
    assert min(norms) > CLIP
