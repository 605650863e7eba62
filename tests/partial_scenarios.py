"""Launched-process scenarios for partial optimizer offload (tests/test_partial_offload.py)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import torch

import hf_zero
from hf_zero.initialize import init_distributed
from models import batches, build, grouped_params, make_optimizer
from scenarios import case_id, engine_config, run_steps


def partial_config(case: dict, world: int) -> dict:
    cfg = engine_config(case, world)
    if "ratio" in case:
        cfg["zero_optimization"]["offload_optimizer"]["ratio"] = case["ratio"]
    return cfg


def _poison_hook(engine, rank: int, case: dict, counter: dict):
    """fp16 cases with ``overflow_step``: an inf in one gradient element on rank 0 only, in the
    micro-steps of that optimizer step (every rank must skip it)."""
    victim = engine.module.model.layers[0].mlp.down_proj.weight

    def poison(grad):
        if rank == 0 and counter["micro"] == case["overflow_step"] * case.get("accum", 2):
            grad = grad.clone()
            grad.view(-1)[0] = float("inf")
        return grad

    victim.register_hook(poison)


def _watch_overlap(engine, log: list):
    """Record when the host step and the device step run (the test checks they overlap): the
    host step of the first update waits, up to 5 s, for the device step to start, so the
    overlap is seen even on a loaded machine when the two really run at once (and only then)."""
    started = threading.Event()
    host, device_update = engine.host.step, engine._device_update

    def host_step(*a, **k):
        t0 = time.monotonic()
        saw = started.wait(timeout=5.0)
        out = host(*a, **k)
        log.append(("host", t0, time.monotonic(), saw))
        return out

    def device_step(grads, coef, indices=None):
        t0 = time.monotonic()
        started.set()
        device_update(grads, coef, indices)
        log.append(("device", t0, time.monotonic(), indices is not None))

    engine.host.step = host_step
    engine._device_update = device_step


def parity(payload, out_dir: Path):
    """Train every case; rank 0 writes the final full fp32 weights."""
    rank, world = init_distributed()
    from safetensors.torch import save_file

    results = {}
    for case in payload["cases"]:
        model = build(case["model"])
        opt = make_optimizer(case["opt"], grouped_params(model))
        engine, _, _, _ = hf_zero.initialize(model=model, optimizer=opt, config=partial_config(case, world))
        counter = {"micro": 0}
        if "overflow_step" in case:
            _poison_hook(engine, rank, case, counter)
        overlap: list = []
        if engine.host is not None and engine._device_flat_indices():
            _watch_overlap(engine, overlap)
        data = batches(case.get("steps", 3), case.get("accum", 2), world)

        def count():
            counter["micro"] += case.get("accum", 2)

        scales = []
        losses = run_steps(engine, data, rank, between=lambda: (count(), scales.append(engine.loss_scale)))
        rep = engine.memory_report()
        sd = engine.full_state_dict()
        if rank == 0:
            save_file({k: v.clone() for k, v in sd.items()}, str(out_dir / f"{case_id(case)}.safetensors"))
        results[case_id(case)] = {
            "losses": losses, "steps": engine.global_steps, "skipped": engine.skipped_steps, "scales": scales,
            "host_fraction": rep["optimizer_host_fraction"], "device_bytes": rep["device_model_state_bytes"],
            "host_flats": sorted(engine._host_flats), "flats": len(engine._trainable_flats), "overlap": overlap,
        }
        engine.destroy()
    return results


def _train(engine, data, rank, steps):
    return run_steps(engine, [data[s] for s in steps], rank)


def checkpoint_save(payload, out_dir: Path):
    """World 2, for each of ``payload['runs']`` (name, stage, ratio or None for no offload):
    train ``first`` steps, save ``<out>/<name>/ck``, train the rest of ``steps``; rank 0 writes
    that uninterrupted run's final weights as ``<out>/<name>/uninterrupted.safetensors``."""
    rank, world = init_distributed()
    from safetensors.torch import save_file

    out = {}
    for run in payload["runs"]:
        case = dict(model="llama", stage=run["stage"], opt="adamw", clip=0.5, accum=2)
        if run["ratio"] is not None:
            case.update(offload="cpu", ratio=run["ratio"])
        model = build("llama")
        opt = make_optimizer("adamw", grouped_params(model))
        engine, _, _, _ = hf_zero.initialize(model=model, optimizer=opt, config=partial_config(case, world))
        data = batches(payload["steps"], 2, world)
        where = out_dir / run["name"]
        first = _train(engine, data, rank, range(payload["first"]))
        engine.save_checkpoint(where / "ck", tag="t")
        rest = _train(engine, data, rank, range(payload["first"], payload["steps"]))
        sd = engine.full_state_dict()
        if rank == 0:
            save_file({k: v.clone() for k, v in sd.items()}, str(where / "uninterrupted.safetensors"))
        engine.destroy()
        out[run["name"]] = {"first": first, "rest": rest}
    return out
