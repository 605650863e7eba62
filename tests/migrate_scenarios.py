"""Launched-process scenarios for the DeepSpeed migration tests (tests/test_migrate_deepspeed.py)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.distributed as dist

import hf_zero
from hf_zero.initialize import init_distributed
from models import build, grouped_params

FIXTURES = Path(__file__).resolve().parent / "data" / "deepspeed"


def global_batch(step: int, batch: int, seq: int):
    """The fixture script's data (scripts/make_deepspeed_fixtures.py): the same generator."""
    g = torch.Generator().manual_seed(100 + step)
    return torch.randint(0, 96, (batch, seq), generator=g)


def hf_zero_config(meta: dict, stage: int) -> dict:
    """The DeepSpeed run's config, at another stage; the micro-batch follows the world size."""
    cfg = json.loads(json.dumps(meta["ds_config"]))
    cfg.pop("train_micro_batch_size_per_gpu", None)
    cfg["zero_optimization"] = {"stage": stage}
    return cfg


def resume_deepspeed(payload, out_dir: Path):
    """Load a DeepSpeed fixture into an hf_zero engine (any world, any stage), train the steps
    DeepSpeed's own continuation trained, report the global losses and the state after loading."""
    rank, world = init_distributed()
    ds_dir = FIXTURES / payload["fixture"]
    meta = json.loads((ds_dir / "meta.json").read_text())
    model = build("llama")
    opt = torch.optim.AdamW(grouped_params(model), lr=meta["lr"], weight_decay=0.1)
    cfg = hf_zero_config(meta, payload["stage"])
    accumulate = payload.get("accumulate", 1)  # micro-batches per rank per step
    cfg["gradient_accumulation_steps"] = accumulate
    engine, _, _, _ = hf_zero.initialize(model=model, optimizer=opt, config=cfg)
    path, client = engine.load_checkpoint(payload.get("load") or ds_dir)
    info = {"loaded": str(path), "global_steps": engine.global_steps,
            "lr": [g["lr"] for g in engine.optimizer.param_groups],
            "sched_lr": engine.lr_scheduler.get_last_lr(), "scaler": engine.loss_scaler.state_dict(), "scales": []}
    batch, seq = meta["global_batch"], meta["seq"]
    per = batch // world
    losses = []
    for step in range(meta["steps_before"], meta["steps_before"] + len(meta["continuation_losses"])):
        mine = global_batch(step, batch, seq)[rank * per:(rank + 1) * per]
        t = torch.zeros(())
        info["scales"].append(engine.loss_scaler.scale)
        for ids in mine.chunk(accumulate):
            loss = engine(input_ids=ids, labels=ids).loss
            engine.backward(loss)
            engine.step()
            t += loss.detach().float() / accumulate
        if world > 1:
            dist.all_reduce(t)
        losses.append(t.item() / world)
    info["losses"] = losses
    return info


def trainer_switch(payload, out_dir: Path):
    """A stock Trainer run (``payload["kind"] == "stock"``, one process, checkpoints every 2
    steps) or a ZeroTrainer run resuming ``payload["resume"]``; reports the logged losses and lr."""
    from transformers import Trainer, TrainingArguments

    from integration_scenarios import sequential, trainer_dataset, trainer_kwargs, zero_cfg

    world = int(os.environ.get("WORLD_SIZE", "1"))  # the Trainer has not started the group yet
    extra = dict(max_steps=6, save_strategy="steps", save_steps=2, gradient_accumulation_steps=1)
    kw = trainer_kwargs(payload["output_dir"], 12 // world, **extra)
    if payload["kind"] == "stock":
        trainer = sequential(Trainer)(model=build("llama"), args=TrainingArguments(**kw),
                                      train_dataset=trainer_dataset(72))
    else:
        args = hf_zero.ZeroTrainingArguments(zero_config=zero_cfg(payload["stage"]), **kw)
        trainer = sequential(hf_zero.ZeroTrainer)(model=build("llama"), args=args, train_dataset=trainer_dataset(72))
    error = None
    try:
        trainer.train(resume_from_checkpoint=payload.get("resume"))
    except Exception as exc:  # noqa: BLE001 - the stock-resumes-hf_zero case reports it
        if not payload.get("expect_error"):
            raise
        error = f"{type(exc).__name__}: {exc}"
    return {"losses": {int(h["step"]): h["loss"] for h in trainer.state.log_history if "loss" in h},
            "lr": {int(h["step"]): h["learning_rate"] for h in trainer.state.log_history if "learning_rate" in h},
            "global_step": trainer.state.global_step, "error": error}



def trainer_resume_deepspeed(payload, out_dir: Path):
    """ZeroTrainer resuming the fixture ``Trainer(deepspeed=...)`` run's ``checkpoint-3/`` and
    training its last 3 steps on the rows that run fed (``meta["fed_rows"]``, in order); reports
    the logged losses and lr, to compare with what the DeepSpeed run itself logged."""
    from datasets import Dataset
    from transformers import TrainingArguments  # noqa: F401 - ZeroTrainingArguments extends it

    from integration_scenarios import sequential

    world = int(os.environ.get("WORLD_SIZE", "1"))  # the Trainer has not started the group yet
    run = FIXTURES / "trainer_stage2_fp32"
    meta = json.loads((run / "meta.json").read_text())
    batch, seq, before = meta["global_batch"], meta["seq"], meta["steps_before"]
    rows = torch.cat([global_batch(k, batch, seq) for k in range(len(meta["losses"]))]).tolist()
    # step k's global batch is what the DeepSpeed run's ranks were fed at step k, rank by rank
    # (the Trainer shards each global batch of the in-order dataset the same way at any world size)
    ids = [rows[i] for k in range(len(meta["losses"])) for fed in meta["fed_rows"] for i in fed[k]]
    assert len(ids) == batch * len(meta["losses"])
    data = Dataset.from_dict({"input_ids": ids, "labels": ids})
    args = hf_zero.ZeroTrainingArguments(
        zero_config={**meta["ds_config"], "zero_optimization": {"stage": payload["stage"]}},
        output_dir=str(payload["output_dir"]), per_device_train_batch_size=batch // world,
        max_steps=len(meta["losses"]), learning_rate=meta["lr"]["1"], weight_decay=0.1, max_grad_norm=1.0,
        logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, seed=0, disable_tqdm=True,
        lr_scheduler_type="linear", dataloader_num_workers=0)
    from transformers import default_data_collator

    fed = []  # the original rows this rank was fed, per step (an extra prefetched batch may follow)

    def recording_collator(features):
        fed.append([rows.index(f["input_ids"]) for f in features])
        return default_data_collator(features)

    trainer = sequential(hf_zero.ZeroTrainer)(model=build("llama"), args=args, train_dataset=data,
                                              data_collator=recording_collator)
    trainer.train(resume_from_checkpoint=str(run / f"checkpoint-{before}"))
    return {"losses": {int(h["step"]): h["loss"] for h in trainer.state.log_history if "loss" in h},
            "lr": {int(h["step"]): h["learning_rate"] for h in trainer.state.log_history if "learning_rate" in h},
            "fed": fed}
