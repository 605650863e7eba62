"""Launched-process scenarios for the asynchronous checkpoint save (tests/test_async_save.py)."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import torch.distributed as dist

import hf_zero.checkpoint.sharded as sharded
from checkpoint_scenarios import GLOBAL_BATCH, engine_for, global_batch
from hf_zero.initialize import init_distributed


def _train(engine, start: int, stop: int, rank: int, world: int) -> list:
    per = GLOBAL_BATCH // world
    losses = []
    for step in range(start, stop):
        ids = global_batch(step)[rank * per : (rank + 1) * per]
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        engine.step()
        t = loss.detach().clone()
        if world > 1:
            dist.all_reduce(t)
        losses.append(t.item() / world)
    return losses


def _slow_writes(delay: float) -> None:
    """Every rank file is written ``delay`` seconds late: training runs while the write is due."""
    real = sharded._write_rank_file

    def slow(path, tensors):
        time.sleep(delay)
        return real(path, tensors)

    sharded._write_rank_file = slow


def compare(payload, out_dir: Path):
    """The same state saved synchronously into ``sync`` and asynchronously into ``async``, at
    steps 2 and 4; training (steps 2-4) runs while the first background write is pending."""
    rank, world = init_distributed()
    engine = engine_for(payload, world)
    sync, asyn = Path(payload["sync"]), Path(payload["async"])
    losses = _train(engine, 0, 2, rank, world)
    engine.save_checkpoint(sync, tag="t2")
    _slow_writes(payload["delay"])
    t = time.perf_counter()
    engine.save_checkpoint(asyn, tag="t2", async_save=True)
    blocked = time.perf_counter() - t
    published_early = (asyn / "latest").exists() or (asyn / "t2").exists()
    staged = engine._checkpoint_staging  # the snapshot's memory (None unless kept)
    first = {k: v.data_ptr() for k, v in staged._held.items()} if staged is not None else {}
    losses += _train(engine, 2, 4, rank, world)  # changes the master and the states in place
    engine.save_checkpoint(asyn, tag="t4", async_save=True)  # waits for t2 first
    again = engine._checkpoint_staging
    reused = again is staged and {k: v.data_ptr() for k, v in again._held.items()} == first if staged else False
    engine.wait_for_checkpoint()
    engine.save_checkpoint(sync, tag="t4")
    engine.load_checkpoint(asyn, tag="t4")  # gives the snapshot memory back (room for the rank file)
    after_load = engine._checkpoint_staging is not None
    engine.save_checkpoint(asyn, tag="t5", async_save=True)
    engine.destroy()
    return {"losses": losses, "blocked": blocked, "published_early": published_early,
            "staging_bytes": staged.nbytes() if staged is not None else 0, "staging_reused": reused,
            "staging_after_load": after_load, "staging_after_destroy": engine._checkpoint_staging is not None}


def crash(payload, out_dir: Path):
    """Save ``t2`` asynchronously (completed), train, start saving ``t3`` asynchronously and
    SIGKILL rank ``kill_rank`` right after its rank file is written, while it trains on."""
    rank, world = init_distributed()
    engine = engine_for(payload, world)
    save = Path(payload["save"])
    _train(engine, 0, 2, rank, world)
    engine.save_checkpoint(save, async_save=True)
    engine.wait_for_checkpoint()
    _train(engine, 2, 3, rank, world)
    if rank == payload["kill_rank"]:
        real = sharded._write_rank_file

        def write_then_die(path, tensors):
            real(path, tensors)
            os.kill(os.getpid(), signal.SIGKILL)

        sharded._write_rank_file = write_then_die
    engine.save_checkpoint(save, async_save=True)
    _train(engine, 3, 5, rank, world)
    engine.wait_for_checkpoint()
    return {"survived": True}


def failure(payload, out_dir: Path):
    """A background write that fails (ENOSPC) on ``fail_rank``: the next save raises it on every
    rank and cleans up; the previous checkpoint stays ``latest``; a save after that works."""
    import errno

    rank, world = init_distributed()
    engine = engine_for(payload, world)
    save = Path(payload["save"])
    _train(engine, 0, 1, rank, world)
    engine.save_checkpoint(save, tag="good")
    real = sharded._write_rank_file
    if rank == payload["fail_rank"]:
        def full_disk(path, tensors):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

        sharded._write_rank_file = full_disk
    engine.save_checkpoint(save, tag="bad", async_save=True)
    engine._pending_save.thread.join()  # the failure has happened on every rank's thread
    sharded._write_rank_file = real
    at_save = None
    try:
        engine.save_checkpoint(save, tag="next")
    except Exception as exc:  # noqa: BLE001 - the test inspects it
        at_save = f"{type(exc).__name__}: {exc}"
    after = {"latest": (save / "latest").read_text(), "entries": sorted(p.name for p in save.iterdir())}
    _train(engine, 1, 2, rank, world)
    engine.save_checkpoint(save, tag="next")
    return {"at_save": at_save, **after, "latest_final": (save / "latest").read_text()}


def trainer_async(payload, out_dir: Path):
    """ZeroTrainer saving every 2 steps with ``save_total_limit`` 1; ``async``: the config key
    ``hf_zero.async_save``. Records, at every save, whether the engine's write was still in
    flight and which checkpoint folders existed; optionally stops at step ``stop_at`` or resumes
    (``resume``: a path or True)."""
    import hf_zero
    from transformers import TrainerCallback

    from integration_scenarios import build, sequential, trainer_dataset, trainer_kwargs, zero_cfg

    world = int(os.environ["WORLD_SIZE"])
    if payload.get("delay"):
        _slow_writes(payload["delay"])
    extra = {"hf_zero": {"async_save": True}} if payload["async"] else {}
    args = hf_zero.ZeroTrainingArguments(
        zero_config=zero_cfg(payload["stage"], **extra),
        **trainer_kwargs(payload["output_dir"], 12 // world, max_steps=6, save_strategy="steps", save_steps=2,
                         save_total_limit=1, gradient_accumulation_steps=1))
    trainer = sequential(hf_zero.ZeroTrainer)(model=build("llama"), args=args, train_dataset=trainer_dataset(72))
    saves = []

    class Watch(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            job = trainer.zero_engine._pending_save
            saves.append({"step": state.global_step, "in_flight": job is not None and job.thread.is_alive(),
                          "folders": sorted(d for d in os.listdir(args.output_dir) if d.startswith("checkpoint-"))})

        def on_step_end(self, args, state, control, **kwargs):
            if payload.get("stop_at") and state.global_step >= payload["stop_at"]:
                control.should_training_stop = True

    trainer.add_callback(Watch())
    trainer.train(resume_from_checkpoint=payload.get("resume"))
    res = {"losses": {int(h["step"]): h["loss"] for h in trainer.state.log_history if "loss" in h},
           "saves": saves, "pending_after_train": trainer.zero_engine._pending_save is not None,
           "folders": sorted(d for d in os.listdir(payload["output_dir"]) if d.startswith("checkpoint-"))}
    trainer.accelerator.free_memory()
    return res


def accelerate_async(payload, out_dir: Path):
    """The plain Accelerate loop of ``integration_scenarios.accelerate_resume`` (stage 3, micro 2,
    accumulation 2, 3 updates) with ``hf_zero.async_save`` in the plugin's config (or the
    ``async_save=True`` keyword): ``save_state`` after update 2 returns while its write is in
    flight (held back 1 s) and the loop runs on to update 3."""
    import hf_zero
    from torch.utils.data import DataLoader

    from integration_scenarios import CLIP, _model_optimizer_scheduler, samples, zero_cfg

    _slow_writes(1.0)
    case = {"stage": 3, "accum": 2, "micro": 2}
    cfg = zero_cfg(3, **({"hf_zero": {"async_save": True}} if payload["how"] == "config" else {}))
    accelerator = hf_zero.ZeroAccelerator(zero_plugin=hf_zero.ZeroPlugin(cfg), cpu=True, gradient_accumulation_steps=2)
    model, opt, sched = _model_optimizer_scheduler(case)
    data = [{"input_ids": x, "labels": x.clone()} for x in samples(24)]
    model, opt, dl, sched = accelerator.prepare(model, opt, DataLoader(data, batch_size=2, shuffle=False), sched)
    losses, pending, updates, in_flight = [], [], 0, None
    for batch in dl:
        with accelerator.accumulate(model):
            loss = model(**batch).loss
            accelerator.backward(loss)
            pending.append(loss.item())
            if accelerator.sync_gradients:
                accelerator.clip_grad_norm_(model.parameters(), CLIP)
            opt.step()
            sched.step()
            opt.zero_grad()
            if accelerator.sync_gradients:
                losses.append(sum(pending) / len(pending))
                pending = []
                updates += 1
                if updates == 2:
                    kw = {"async_save": True} if payload["how"] == "keyword" else {}
                    accelerator.save_state(payload["save"], **kw)
                    job = accelerator.zero_engine._pending_save
                    in_flight = job is not None and job.thread.is_alive()
    accelerator.zero_engine.wait_for_checkpoint()
    sd = accelerator.get_state_dict(model)
    res = {"losses": losses, "lr": opt.param_groups[0]["lr"], "in_flight": in_flight,
           "weights_sum": float(sum(v.double().abs().sum() for v in sd.values()))}
    accelerator.free_memory()
    return res
