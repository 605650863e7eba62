"""The learning-rate schedules a DeepSpeed config's ``scheduler`` section can name.

Note:
    * Each is a ``torch.optim.lr_scheduler.LambdaLR`` over the optimizer's groups, stepped once
      per optimizer step, so its state is a plain dict (no pickle needed to checkpoint it).
    * The multiplier is relative to each group's ``lr`` at construction; WarmupLR and
      WarmupDecayLR express absolute rates, converted by dividing by that ``lr``.
    * Definitions (ours, documented in docs/config.md):
      - WarmupLR: from ``warmup_min_lr`` to ``warmup_max_lr`` over ``warmup_num_steps``
        (raised to at least 2, as DeepSpeed does; "log": logarithmic in the step, "linear":
        linear), then constant.  Timed exactly as DeepSpeed's: after n scheduler steps the lr is
        that of DeepSpeed's ``last_batch_iteration = max(n - 1, 0)``, so the first two optimizer
        steps both use ``warmup_min_lr`` (tests/test_schedulers.py).
      - WarmupDecayLR: WarmupLR, then linear decay to ``warmup_min_lr`` at ``total_num_steps``.
      - WarmupCosineLR: from ``warmup_min_ratio`` x lr to lr over ``warmup_num_steps`` (at least
        2), then a cosine to ``cos_min_ratio`` x lr at ``total_num_steps``; timed as DeepSpeed's
        (the lr of ``last_batch_iteration = n - 1``), which makes the very first update use lr 0.
      All three are checked step by step against traces recorded from DeepSpeed 0.19.8 itself
      (tests/data/deepspeed_schedules.json, scripts/deepspeed_schedule_traces.py).
"""

from __future__ import annotations

import math

import torch


def _warmup_fraction(step: int, warmup: int, kind: str) -> float:
    if warmup <= 0 or step >= warmup:
        return 1.0
    if kind == "log":
        return math.log(step + 1) / math.log(warmup)
    return step / warmup


def build_scheduler(cfg, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
    params = dict(cfg.params)
    kind = cfg.type
    warmup = int(params.get("warmup_num_steps", 1000))
    wtype = params.get("warmup_type", "log")
    base_lrs = [g["lr"] for g in optimizer.param_groups]

    if kind in ("WarmupLR", "WarmupDecayLR"):
        lo = float(params.get("warmup_min_lr", 0.0))
        hi = float(params.get("warmup_max_lr", 0.001))
        total = int(params.get("total_num_steps", 0)) if kind == "WarmupDecayLR" else None
        if total is not None and total <= warmup:
            raise ValueError(f"scheduler.params.total_num_steps ({total}) must exceed warmup_num_steps ({warmup})")

        warmup = max(2, warmup)  # DeepSpeed raises warmup_num_steps to at least 2

        def make(base):
            def f(n):
                it = max(n - 1, 0)  # DeepSpeed's last_batch_iteration after n scheduler steps
                if total is not None and it >= warmup:
                    gamma = max(0.0, (total - it) / max(1, total - warmup))
                else:
                    gamma = _warmup_fraction(it, warmup, wtype)
                lr = lo + (hi - lo) * gamma  # decays to warmup_min_lr, as DeepSpeed's does
                return lr / base if base else 0.0
            return f

        return torch.optim.lr_scheduler.LambdaLR(optimizer, [make(b) for b in base_lrs])

    if kind == "WarmupCosineLR":
        total = int(params["total_num_steps"])
        lo_ratio = float(params.get("warmup_min_ratio", 0.0))
        cos_min = float(params.get("cos_min_ratio", 0.0001))
        warmup = max(2, warmup)  # as DeepSpeed's

        def f(n):
            it = n - 1  # DeepSpeed's last_batch_iteration after n scheduler steps
            if it < 0:
                return 0.0  # DeepSpeed's ratio before its first step: the first update uses lr 0
            if it < warmup:
                return lo_ratio + (1 - lo_ratio) * _warmup_fraction(it, warmup, wtype)
            progress = min(1.0, (it - warmup + 1) / max(1, total - warmup))
            return max(0.0, cos_min + (1 - cos_min) * 0.5 * (1 + math.cos(math.pi * progress)))

        return torch.optim.lr_scheduler.LambdaLR(optimizer, f)
    raise ValueError(f"scheduler type {kind!r} is not supported; use WarmupLR, WarmupDecayLR or WarmupCosineLR")
