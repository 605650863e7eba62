"""A config's Adam/AdamW section gets DeepSpeed's defaults, not torch's (issue 12.6)."""

from __future__ import annotations

import pytest
import torch

from hf_zero.engine.optim import build_optimizer


def _groups():
    return [{"params": [torch.nn.Parameter(torch.zeros(3))]}]


@pytest.mark.parametrize("kind", ["Adam", "AdamW", "adamw"])
def test_adam_without_weight_decay_gets_deepspeeds_zero(kind):
    opt = build_optimizer(kind, {"lr": 1e-3}, _groups())
    assert isinstance(opt, torch.optim.AdamW)
    g = opt.param_groups[0]
    # DeepSpeed FusedAdam(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    assert g["weight_decay"] == 0.0 and g["betas"] == (0.9, 0.999) and g["eps"] == 1e-8


def test_explicit_weight_decay_and_group_values_are_kept():
    assert build_optimizer("AdamW", {"weight_decay": 0.1}, _groups()).param_groups[0]["weight_decay"] == 0.1
    groups = _groups() + [{"params": [torch.nn.Parameter(torch.zeros(2))], "weight_decay": 0.5}]
    opt = build_optimizer("AdamW", {}, groups)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.0, 0.5]


def test_adam_l2_mode_is_torch_adam_with_zero_default():
    opt = build_optimizer("Adam", {"adam_w_mode": False}, _groups())
    assert type(opt) is torch.optim.Adam and opt.param_groups[0]["weight_decay"] == 0.0
