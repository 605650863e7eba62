"""Launched processes for tests/test_grad_views.py: ``.grad`` as views into the flat gradient
buffers (stages 0-3), under user-side ``zero_grad``, ``create_graph=True`` and several
backwards per step; and the stage-3 gather pool's reuse and bound. The test module computes the
unsharded references itself."""

from __future__ import annotations

from pathlib import Path

import torch

import hf_zero
from models import batches, build, grouped_params, make_optimizer
from scenarios import engine_config, train_and_save

STEPS, ACCUM = 3, 2


def _in_buffer(t, buf) -> bool:
    lo = buf.data_ptr()
    return t is not None and lo <= t.data_ptr() < lo + buf.numel() * buf.element_size()


def train(case: dict, rank: int, world: int):
    """Train tiny Llama with SGD; return losses and what the gradient views looked like."""
    model = build("llama")
    opt = make_optimizer("sgd", grouped_params(model))
    cfg = engine_config({"stage": case["stage"], "accum": ACCUM}, world)
    engine, _, _, _ = hf_zero.initialize(model=model, optimizer=opt, config=cfg)
    rt = engine.runtime
    data = batches(STEPS, ACCUM, world)
    losses, views, unbound_after, pool_reused, pool_hwm = [], [], [], 0, 0
    gather_stats = []
    for si, step in enumerate(data):
        total = 0.0
        for mi, micro in enumerate(step):
            if case["mode"] == "user_clear":
                model.zero_grad(set_to_none=True)  # the user's clear: the engine's buffers keep the sum
            loss = engine(**micro[rank]).loss
            if case["mode"] == "create_graph":
                torch.autograd.backward(loss / ACCUM, create_graph=True)
            else:
                engine.backward(loss)
            if case["stage"] <= 1:  # every .grad views its unit's persistent buffer
                views.append(all(_in_buffer(p.grad, u.grad_full[fi]) for u in engine.units
                                 for fi, f in enumerate(u.flats) if f.trainable for p in f.params))
            else:  # the per-backward buffers were reduced and handed back: no view left
                unbound_after.append(all(p.grad is None for p in model.parameters())
                                     and not any(u.grad_bound for u in engine.units))
                pool_hwm = max(pool_hwm, rt.grad_pool.free_bytes)
            engine.step()
            total += loss.item()
        losses.append(total / len(step))
        if engine.gather_pool is not None:
            gp = engine.gather_pool
            gather_stats.append({"moves_in": gp.moves_in, "misses": gp.misses, "free_bytes": gp.free_bytes})
    out = {"losses": losses, "views": views, "unbound_after": unbound_after,
           "pool_taken": rt.grad_pool.taken, "pool_reused": rt.grad_pool.reused, "pool_free_hwm": pool_hwm,
           "gather": gather_stats, "trainable_flats": sum(len(u.trainable) for u in engine.units)}
    if engine.gather_pool is not None:
        spans = sorted({engine.gather_pool._span(f.full) for u in engine.units for f in u.flats})
        out["gather_spans"] = spans
        out["gather_keep"] = engine.gather_pool.keep
    return engine, out


def views(payload, out_dir: Path):
    return train_and_save(payload["cases"], out_dir, train)
