"""WarmupLR / WarmupDecayLR give, at every optimizer step, the lr DeepSpeed's would (issue 12.6).

The reference below restates DeepSpeed's lr_schedules.py semantics: at construction the lr is
warmup_min_lr (last_batch_iteration -1); each scheduler.step() after an optimizer step raises
last_batch_iteration by one and sets lr = min + (max - min) * gamma(last_batch_iteration), with
warmup_num_steps raised to at least 2 and WarmupDecayLR decaying towards warmup_min_lr.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from hf_zero.engine.schedulers import build_scheduler


def deepspeed_lrs(n_steps, lo, hi, warmup, kind, total=None):
    warmup = max(2, warmup)
    lrs, it = [], -1
    for _ in range(n_steps):
        if it < 0:
            lr = lo
        else:
            if total is not None and it >= warmup:
                gamma = max(0.0, (total - it) / max(1, total - warmup))
            elif it < warmup:
                gamma = math.log(it + 1) / math.log(warmup) if kind == "log" else it / warmup
            else:
                gamma = 1.0
            lr = lo + (hi - lo) * gamma
        lrs.append(lr)  # the lr this optimizer step uses
        it += 1         # engine.step() then steps the scheduler
    return lrs


@pytest.mark.parametrize("kind", ["linear", "log"])
@pytest.mark.parametrize("sched, total", [("WarmupLR", None), ("WarmupDecayLR", 12)])
@pytest.mark.parametrize("warmup", [1, 4])
def test_lr_at_every_step_matches_deepspeed(kind, sched, total, warmup):
    lo, hi = 1e-5, 1e-3
    params = {"warmup_min_lr": lo, "warmup_max_lr": hi, "warmup_num_steps": warmup, "warmup_type": kind}
    if total is not None:
        params["total_num_steps"] = total
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=hi)
    s = build_scheduler(SimpleNamespace(type=sched, params=params), opt)
    got = []
    for _ in range(15):
        got.append(opt.param_groups[0]["lr"])
        opt.step()
        s.step()
    assert got == pytest.approx(deepspeed_lrs(15, lo, hi, warmup, kind, total), rel=1e-12, abs=1e-15)
    if total is not None:
        assert got[-1] == pytest.approx(lo)  # decays to warmup_min_lr, not to 0


RECORDED = json.loads((Path(__file__).resolve().parent / "data" / "deepspeed_schedules.json").read_text())


@pytest.mark.parametrize("case", RECORDED["cases"], ids=lambda c: f"{c['type']}-" + "-".join(
    f"{k}={v}" for k, v in sorted(c["params"].items())))
def test_lr_at_every_step_matches_recorded_deepspeed(case):
    """Against the learning rates DeepSpeed 0.19.8's own schedulers gave (recorded by
    scripts/deepspeed_schedule_traces.py in DeepSpeed's venv), read before each optimizer step."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=RECORDED["base_lr"])
    s = build_scheduler(SimpleNamespace(type=case["type"], params=case["params"]), opt)
    got = []
    for _ in range(RECORDED["steps"]):
        got.append(opt.param_groups[0]["lr"])
        opt.step()
        s.step()
    assert got == pytest.approx(case["lrs"], rel=1e-9, abs=1e-15)
