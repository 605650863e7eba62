"""Launched-process scenarios for the checkpoint tests."""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.distributed as dist

import hf_zero
from hf_zero.initialize import init_distributed
from models import VOCAB, build, grouped_params

GLOBAL_BATCH = 12  # divisible by world sizes 1, 2, 3


def global_batch(step: int, seq: int = 10):
    g = torch.Generator().manual_seed(100 + step)
    ids = torch.randint(0, VOCAB, (GLOBAL_BATCH, seq), generator=g)
    return ids


def engine_for(payload, world):
    model = build(payload.get("model", "llama"))
    opt = torch.optim.AdamW(grouped_params(model), lr=1e-2, weight_decay=0.1)
    cfg = {"train_batch_size": GLOBAL_BATCH, "gradient_accumulation_steps": payload.get("accumulate", 1),
           "gradient_clipping": 1.0,
           "zero_optimization": {"stage": payload["stage"], **payload.get("zero_extra", {})},
           **payload.get("config_extra", {})}
    sched = lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.5)  # noqa: E731
    engine, _, _, _ = hf_zero.initialize(model=model, optimizer=opt, lr_scheduler=sched, config=cfg)
    return engine


def train(payload, out_dir: Path):
    """Optionally resume, train steps [start, stop), optionally save; report the global losses."""
    rank, world = init_distributed()
    engine = engine_for(payload, world)
    info = {}
    if payload.get("load"):
        path, client = engine.load_checkpoint(payload["load"])
        info["loaded"] = str(path)
        info["client_state"] = client
        assert engine.global_steps == payload["start"], (engine.global_steps, payload["start"])
    per = GLOBAL_BATCH // world
    losses = []
    for step in range(payload["start"], payload["stop"]):
        t = torch.zeros(())
        for ids in global_batch(step)[rank * per : (rank + 1) * per].chunk(engine.gradient_accumulation_steps):
            loss = engine(input_ids=ids, labels=ids).loss
            engine.backward(loss)
            engine.step()
            t += loss.detach() / engine.gradient_accumulation_steps
        if world > 1:
            dist.all_reduce(t)
        losses.append(t.item() / world)
    info["losses"] = losses
    info["lr"] = engine.optimizer.param_groups[0]["lr"]
    if payload.get("save"):
        if payload.get("crash_rank") == rank:
            import hf_zero.checkpoint.sharded as sharded

            real = sharded._write_rank_file

            def crash(path, tensors):
                real(path, tensors)
                with open(path, "r+b") as f:  # half-written, then the process dies
                    f.truncate(os.path.getsize(path) // 2)
                os._exit(17)

            sharded._write_rank_file = crash
        engine.save_checkpoint(payload["save"], client_state={"epoch": 1, "note": "resume me"})
    if payload.get("export"):
        engine.save_pretrained(payload["export"], max_shard_size=payload.get("max_shard_size", "5GB"))
        sd = engine.full_state_dict()
        if rank == 0:
            from safetensors.torch import save_file

            save_file({k: v.clone() for k, v in sd.items()}, str(Path(payload["export"]) / "reference_full.safetensors"))
    return info


def dataloader_resume(payload, out_dir: Path):
    """initialize(training_data=...): train, or resume and train; report the samples seen."""
    rank, world = init_distributed()
    model = build("llama")
    rows = [{"input_ids": torch.full((6,), i % VOCAB), "labels": torch.full((6,), i % VOCAB)} for i in range(40)]
    cfg = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 2, "zero_optimization": {"stage": 2},
           "optimizer": {"type": "SGD", "params": {"lr": 0.01}}}
    engine, _, loader, _ = hf_zero.initialize(model=model, training_data=rows, config=cfg)
    if payload.get("load"):
        engine.load_checkpoint(payload["load"])
    seen = []
    while engine.micro_steps < payload["stop"]:
        for batch in loader:
            seen.append(batch["input_ids"][:, 0].tolist())
            loss = engine(**batch).loss
            engine.backward(loss)
            engine.step()
            if payload.get("save") and engine.micro_steps == payload["save_at"]:
                engine.save_checkpoint(payload["save"])
                return {"seen": seen}
            if engine.micro_steps >= payload["stop"]:
                break
    return {"seen": seen}
