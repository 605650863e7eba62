"""Launched processes for tests/test_stage3_memory.py: the stage-3 gathered-bytes bound, read
from the engine's own counters (``StageRuntime.gathered_bytes`` / ``reset_gather_peak``)
during real training steps of tiny Llama (untied embeddings) over gloo."""

from __future__ import annotations

from pathlib import Path

import hf_zero
from hf_zero.initialize import init_distributed
from models import batches, build, grouped_params, make_optimizer


def _unit_bytes(unit) -> int:
    return sum(f.padded_numel * f.full.element_size() for f in unit.flats)


def gather_bound(payload, out_dir: Path):
    rank, world = init_distributed()
    model = build("llama")
    opt = make_optimizer("sgd", grouped_params(model))
    cfg = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
           "zero_optimization": {"stage": 3}}
    engine, _, _, _ = hf_zero.initialize(model=model, optimizer=opt, config=cfg)
    rt = engine.runtime
    steps = []
    for (micro,) in batches(payload["steps"], 1, world):
        rt.reset_gather_peak()
        loss = engine(**micro[rank]).loss
        fwd = rt.reset_gather_peak()
        engine.backward(loss)
        bwd = rt.reset_gather_peak()
        engine.step()
        steps.append({"forward_peak": fwd, "backward_peak": bwd, "after_step": rt.gathered_bytes,
                      "forward_order": [u.name for u in rt.forward_order],
                      "pool_free_bytes": engine.gather_pool.free_bytes if engine.gather_pool else None})
    res = {"steps": steps, "unit_bytes": {u.name: _unit_bytes(u) for u in engine.units},
           "root": rt.root.name, "units": [u.name for u in engine.units],
           "pool_keep": engine.gather_pool.keep if engine.gather_pool else None}
    engine.destroy()
    return res
