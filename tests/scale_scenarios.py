"""Scenarios for the simulated cluster (tests/test_scale*.py, launched by launch.launch_cluster)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch
import torch.distributed as dist

import hf_zero
from hf_zero.initialize import init_distributed
from models import batches, build, grouped_params, make_optimizer
from scenarios import case_id, engine_config, run_steps


def where(payload, out_dir: Path):
    """What the launcher told this worker, and the engine's topology of it."""
    rank, world = init_distributed()
    engine, *_ = hf_zero.initialize(model=build("llama"), optimizer=None,
                                    config={"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}})
    t = engine.topology
    out = {k: os.environ.get(k) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK")}
    out.update(rank=rank, world=world, node=t.node_of(rank), ranks_per_node=t.ranks_per_node)
    engine.destroy()
    return out


def _config(case: dict, world: int) -> dict:
    cfg = engine_config(case, world)
    zo = cfg["zero_optimization"]
    for key in ("mics_shard_size", "zero_hpz_partition_size", "zero_quantized_weights", "zero_quantized_gradients"):
        if key in case:
            zo[key] = case[key]
    if "ranks_per_node" in case:
        cfg["hf_zero"] = {"ranks_per_node": case["ranks_per_node"]}
    return cfg


def train(payload, out_dir: Path):
    """Train every case (models.batches data, as scenarios.parity); rank 0 writes the final fp32
    weights; every rank reports its losses and the bytes of each step (by kind and link)."""
    rank, world = init_distributed()
    from safetensors.torch import save_file

    results = {}
    env = {k: os.environ.get(k) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK")}
    for case in payload["cases"]:
        model = build(case["model"])
        opt = make_optimizer(case["opt"], grouped_params(model))
        engine, *_ = hf_zero.initialize(model=model, optimizer=opt, config=_config(case, world))
        comm, times = [], []

        def after():
            comm.append(engine.memory_report()["comm_bytes_last_step"])

        data = batches(case.get("steps", 3), case.get("accum", 2), world)
        t0 = time.perf_counter()
        losses = run_steps(engine, data, rank, between=after)
        times.append((time.perf_counter() - t0) / len(data))
        if case.get("save"):
            engine.save_checkpoint(case["save"], tag="t")
        sd = engine.full_state_dict()
        if rank == 0:
            save_file({k: v.clone() for k, v in sd.items()}, str(out_dir / f"{case_id(case)}.safetensors"))
        results[case_id(case)] = {
            "losses": losses, "comm": comm, "step_s": times[0],
            "flats": [[f.numel, f.padded_numel, f.dtype.itemsize, f.trainable, u.name]
                      for u in engine.units for f in u.flats],
            "shard_world": engine.shard_comm.world_size,
        }
        topo = engine.topology
        env.update(rank=rank, world=world, node=topo.node_of(rank), ranks_per_node=topo.ranks_per_node)
        engine.destroy()
    return {"where": env, "cases": results}


def loss_curve(payload, out_dir: Path):
    """The tiny recipe's model and data (hf_zero.recipes: random-init Llama, 2-digit addition),
    trained ``steps`` steps per mode at stage 3 with AdamW (the recipe's lr, clipping 1.0).
    Returns per mode the global mean training loss of every step, the loss on a fixed held-out
    batch (``eval_rows`` rows not trained on) every ``eval_every`` steps, the mean step time and
    the cross-node bytes of the last step summed over the ranks."""
    rank, world = init_distributed()
    from hf_zero import recipes

    recipe = recipes.load_recipe("tiny")
    tok = recipes.build_tokenizer(recipe, smoke=False)
    rows, _ = recipes.load_data(recipe, tok, smoke=False)
    collate = recipes.Collator(tok.pad_token_id)
    n_eval, every = payload.get("eval_rows", 256), payload.get("eval_every", 10)
    held, train_rows = collate(rows[-n_eval:]), rows[:-n_eval]
    micro, steps = payload.get("micro", 8), payload["steps"]
    out = {}
    for name, extra in payload["modes"].items():
        model = recipes.build_model(recipe, smoke=False, vocab_size=tok.vocab_size)
        opt = torch.optim.AdamW(model.parameters(), lr=float(recipe.training["learning_rate"]), weight_decay=0.0)
        cfg = {"train_micro_batch_size_per_gpu": micro, "gradient_accumulation_steps": 1, "gradient_clipping": 1.0,
               "zero_optimization": {"stage": 3, **extra}}
        engine, *_ = hf_zero.initialize(model=model, optimizer=opt, config=cfg)
        losses, evals = [], []
        elapsed = 0.0
        for step in range(steps + 1):
            if step % every == 0:
                with torch.no_grad():
                    evals.append(engine(**held).loss.item())
            if step == steps:
                break
            lo = (step * micro * world + rank * micro) % (len(train_rows) - micro)
            batch = collate(train_rows[lo : lo + micro])
            t0 = time.perf_counter()
            loss = engine(**batch).loss
            engine.backward(loss)
            engine.step()
            elapsed += time.perf_counter() - t0
            t = loss.detach().clone()
            dist.all_reduce(t)
            losses.append(t.item() / world)
        cross = torch.tensor([float(engine.memory_report()["comm_bytes_last_step"]["cross_node"]["data"])])
        dist.all_reduce(cross)
        out[name] = {"losses": losses, "evals": evals, "step_s": elapsed / steps, "cross_node": cross.item()}
        engine.destroy()
    return out
