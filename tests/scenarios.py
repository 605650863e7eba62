"""Code that runs inside launched test processes (one function per scenario)."""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.distributed as dist

import hf_zero
from hf_zero.initialize import init_distributed
from models import batches, build, grouped_params, make_optimizer


def case_id(case: dict) -> str:
    return "-".join(f"{k}={v}" for k, v in sorted(case.items()))


def engine_config(case: dict, world: int) -> dict:
    cfg = {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": case.get("accum", 2),
        "gradient_clipping": case.get("clip", 0.0),
        "zero_optimization": {"stage": case["stage"]},
    }
    if case.get("dtype") == "bf16":
        cfg["bf16"] = {"enabled": True}
    if case.get("dtype") == "fp16":
        cfg["fp16"] = {"enabled": True, "initial_scale_power": 8}
    return cfg


def train_case(case: dict, rank: int, world: int):
    model = build(case["model"])
    if case.get("freeze"):
        for n, p in model.named_parameters():
            if case["freeze"] in n:
                p.requires_grad_(False)
    if case.get("checkpointing"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": case["checkpointing"] == "reentrant"})
        model.train()
    opt = make_optimizer(case["opt"], grouped_params(model))
    engine, _, _, _ = hf_zero.initialize(model=model, optimizer=opt, config=engine_config(case, world))
    data = batches(case.get("steps", 3), case.get("accum", 2), world)
    losses = []
    for step in data:
        total = 0.0
        for micro in step:
            loss = engine(**micro[rank]).loss
            engine.backward(loss)
            engine.step()
            total += loss.item()
        losses.append(total / len(step))
    return engine, losses


def parity(payload, out_dir: Path):
    """Train every case; rank 0 writes the final full fp32 weights for the reference check."""
    rank, world = init_distributed()
    from safetensors.torch import save_file

    results = {}
    for case in payload["cases"]:
        engine, losses = train_case(case, rank, world)
        sd = engine.full_state_dict()
        if rank == 0:
            save_file({k: v.clone() for k, v in sd.items()}, str(out_dir / f"{case_id(case)}.safetensors"))
        results[case_id(case)] = {"losses": losses, "steps": engine.global_steps}
        engine.destroy()
    return results


def accounting(payload, out_dir: Path):
    """Per-rank model-state bytes and bytes sent in one step, bf16 + AdamW, accumulation 1."""
    rank, world = init_distributed()
    out = {}
    for stage in (0, 1, 2, 3):
        model = build(payload.get("model", "llama"))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        cfg = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
               "bf16": {"enabled": True}, "zero_optimization": {"stage": stage}}
        engine, _, _, _ = hf_zero.initialize(model=model, optimizer=opt, config=cfg)
        data = batches(2, 1, world)
        for step in data:
            loss = engine(**step[0][rank]).loss
            engine.backward(loss)
            engine.step()
        rep = engine.memory_report()
        rep["padded_numel"] = sum(f.padded_numel for u in engine.units for f in u.flats)
        out[str(stage)] = rep
        engine.destroy()
    return out


def fp16_overflow(payload, out_dir: Path):
    """Inject an inf gradient on rank 0 only at step ``bad_step``; report what each rank did."""
    rank, world = init_distributed()
    bad_step = payload["bad_step"]
    model = build("llama")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    cfg = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "gradient_clipping": 1.0,
           "fp16": {"enabled": True, "initial_scale_power": 10}, "zero_optimization": {"stage": payload["stage"]}}
    engine, _, _, _ = hf_zero.initialize(model=model, optimizer=opt, config=cfg)
    victim = engine.module.model.layers[0].mlp.down_proj.weight
    state = {"inject": False}

    def poison(grad):
        if state["inject"]:
            grad = grad.clone()
            grad.view(-1)[0] = float("inf")
        return grad

    victim.register_hook(poison)
    data = batches(payload["steps"], 1, world)
    record = []
    for i, step in enumerate(data):
        state["inject"] = i == bad_step and rank == 0
        before = {k: v.clone() for k, v in engine.full_state_dict().items()}
        loss = engine(**step[0][rank]).loss
        engine.backward(loss)
        engine.step()
        after = engine.full_state_dict()
        changed = any(not torch.equal(before[k], after[k]) for k in after)
        record.append({"scale_after": engine.loss_scale, "changed": changed, "skipped": engine.skipped_steps,
                       "grad_norm": engine.get_global_grad_norm()})
    return record
