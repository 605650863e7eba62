"""Launched-process scenarios for the fault tests (tests/test_faults.py): each injects one fault
into a real gloo run and reports what every rank saw."""

from __future__ import annotations

import errno
import os
import signal
import time
from pathlib import Path

import torch
import torch.distributed as dist

import hf_zero
from hf_zero.initialize import init_distributed
from models import VOCAB, build, grouped_params

GLOBAL_BATCH = 8


def batch(step: int, rank: int, world: int, seq: int = 8):
    g = torch.Generator().manual_seed(500 + step)
    ids = torch.randint(0, VOCAB, (GLOBAL_BATCH, seq), generator=g)
    per = GLOBAL_BATCH // world
    return ids[rank * per : (rank + 1) * per]


def make_engine(payload, seed: int = 0):
    model = build(payload.get("model", "llama"), seed=seed)
    opt = torch.optim.AdamW(grouped_params(model), lr=1e-2)
    cfg = {"train_batch_size": GLOBAL_BATCH, "gradient_accumulation_steps": 1,
           "zero_optimization": {"stage": payload.get("stage", 2)}, **payload.get("config", {})}
    engine, _, _, _ = hf_zero.initialize(model=model, optimizer=opt, config=cfg, **payload.get("init", {}))
    return engine


def train_steps(engine, start: int, stop: int, rank: int, world: int):
    for step in range(start, stop):
        ids = batch(step, rank, world)
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        engine.step()


def failed_save(payload, out_dir: Path):
    """Save a good checkpoint, then one whose write fails (ENOSPC) on ``fail_rank`` only; the
    caller catches the error (as a retry loop would) and both ranks save again afterwards."""
    rank, world = init_distributed()
    engine = make_engine(payload)
    train_steps(engine, 0, 1, rank, world)
    engine.save_checkpoint(payload["save"])
    train_steps(engine, 1, 2, rank, world)
    import hf_zero.checkpoint.sharded as sharded

    real = sharded._write_rank_file
    if rank == payload["fail_rank"]:
        def full_disk(path, tensors):
            with open(path, "wb") as f:
                f.write(b"\0" * 100)  # a few bytes land, then the disk is full
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

        sharded._write_rank_file = full_disk
    t0 = time.time()
    error = None
    try:
        engine.save_checkpoint(payload["save"])
    except Exception as exc:  # noqa: BLE001 - the test inspects the type and message
        error = f"{type(exc).__name__}: {exc}"
    seconds = time.time() - t0
    sharded._write_rank_file = real
    latest_after_failure = (Path(payload["save"]) / "latest").read_text()
    leftovers = sorted(p.name for p in Path(payload["save"]).iterdir())
    # the same processes go on: train and save successfully
    train_steps(engine, 2, 3, rank, world)
    engine.save_checkpoint(payload["save"])
    return {"error": error, "seconds": seconds, "latest_after_failure": latest_after_failure,
            "leftovers": leftovers, "latest_final": (Path(payload["save"]) / "latest").read_text()}


def tag_mismatch(payload, out_dir: Path):
    rank, world = init_distributed()
    engine = make_engine(payload)
    train_steps(engine, 0, 1, rank, world)
    try:
        engine.save_checkpoint(payload["save"], tag=f"tag_of_rank{rank}")
        error = None
    except Exception as exc:  # noqa: BLE001
        error = f"{type(exc).__name__}: {exc}"
    return {"error": error, "exists": Path(payload["save"]).exists() and sorted(p.name for p in Path(payload["save"]).iterdir())}


def _full_weights(engine):
    return {k: v.float().clone() for k, v in engine.full_state_dict().items()}


def nonfinite(payload, out_dir: Path):
    """Train ``steps``; at the steps in ``bad_steps`` rank ``bad_rank``'s loss is multiplied by
    inf or NaN. Steps listed in ``omit`` are not run at all (the reference). Rank 0 writes the
    final weights; every rank reports whether a bad step changed anything."""
    rank, world = init_distributed()
    engine = make_engine(payload)
    unchanged, error = [], None
    bad_value = float(payload.get("bad", "nan"))
    try:
        for step in range(payload["steps"]):
            if step in payload.get("omit", []):
                continue
            bad = step in payload.get("bad_steps", [])
            before = _full_weights(engine) if bad else None
            ids = batch(step, rank, world)
            loss = engine(input_ids=ids, labels=ids).loss
            if bad and rank == payload.get("bad_rank", 1):
                loss = loss * bad_value
            engine.backward(loss)
            engine.step()
            if bad:
                after = _full_weights(engine)
                unchanged.append(all(torch.equal(before[k], after[k]) for k in before))
    except Exception as exc:  # noqa: BLE001 - the test inspects the message
        error = f"{type(exc).__name__}: {exc}"
    sd = _full_weights(engine)
    if rank == 0:
        from safetensors.torch import save_file

        save_file(sd, str(out_dir / "final.safetensors"))
    finite = all(bool(torch.isfinite(v).all()) for v in sd.values())
    return {"unchanged": unchanged, "skipped": engine.skipped_steps, "global_steps": engine.global_steps,
            "error": error, "finite": finite, "scale": engine.loss_scale}


def frozen_peer(payload, out_dir: Path):
    """Rank 1 stops itself (SIGSTOP) before its backward; rank 0 must fail within the timeout."""
    rank, world = init_distributed(timeout_s=payload["timeout"])
    engine = make_engine(payload)
    ids = batch(0, rank, world)
    loss = engine(input_ids=ids, labels=ids).loss
    if rank == 1:
        os.kill(os.getpid(), signal.SIGSTOP)
    t0 = time.time()
    try:
        engine.backward(loss)
        engine.step()
        error = None
    except Exception as exc:  # noqa: BLE001
        error = f"{type(exc).__name__}: {exc}"
    (out_dir / f"frozen{rank}.json").write_text(__import__("json").dumps({"error": error, "seconds": time.time() - t0}))
    os._exit(3)


def preempt_train(payload, out_dir: Path):
    """Train steps ``[start, steps)`` (start: 0, or the step after the checkpoint in ``resume``),
    rank 0 appending each step's global loss to ``out_dir/losses.jsonl`` as it goes (a preempted
    run never returns). ``save_on_signal``: the engine's preemption directory. ``self_signal``:
    ``[step, [ranks]]``: those ranks send themselves SIGTERM between that step's forward and its
    backward. ``sleep``: seconds per step (room for a signal from outside). ``progress``: each
    rank writes the last step it began to ``out_dir/progress<rank>``."""
    import json

    rank, world = init_distributed()
    cfg = dict(payload.get("config", {}))
    if payload.get("save_on_signal"):
        cfg["hf_zero"] = {**cfg.get("hf_zero", {}), "save_on_signal": payload["save_on_signal"]}
    engine = make_engine({**payload, "config": cfg})
    start = 0
    if payload.get("resume"):
        engine.load_checkpoint(payload["resume"])
        start = engine.global_steps
    at, who = payload.get("self_signal") or (None, [])
    losses = []
    log = open(out_dir / "losses.jsonl", "a") if rank == 0 else None
    for step in range(start, payload["steps"]):
        (out_dir / f"progress{rank}").write_text(str(step))
        ids = batch(step, rank, world)
        loss = engine(input_ids=ids, labels=ids).loss
        mean = loss.detach().clone()
        if world > 1:
            dist.all_reduce(mean)
            mean /= world
        losses.append(float(mean))
        if log is not None:
            log.write(json.dumps({"step": step, "loss": float(mean), "world": world}) + "\n")
            log.flush()
        if step == at and rank in who:
            os.kill(os.getpid(), signal.SIGTERM)
        engine.backward(loss)
        time.sleep(payload.get("sleep", 0.0))
        engine.step()
    return {"losses": losses, "start": start, "global_steps": engine.global_steps}


def _report_frozen(out_dir: Path, rank: int, run) -> None:
    """Run ``run()``, write what this rank saw to ``frozen<rank>.json`` and leave at once (a
    stopped peer cannot join the teardown)."""
    import json

    t0 = time.time()
    try:
        run()
        error = None
    except Exception as exc:  # noqa: BLE001 - the test inspects the type and message
        error = f"{type(exc).__name__}: {exc}"
    (out_dir / f"frozen{rank}.json").write_text(json.dumps({"error": error, "seconds": time.time() - t0}))
    os._exit(3)


def frozen_peer_accelerate(payload, out_dir: Path):
    """ZeroAccelerator(zero_plugin=ZeroPlugin(cfg, timeout=T)): rank 1 stops itself (SIGSTOP)
    before its backward; rank 0 must fail with CollectiveTimeout within about T seconds."""
    from integration_scenarios import samples, zero_cfg

    accelerator = hf_zero.ZeroAccelerator(zero_plugin=hf_zero.ZeroPlugin(zero_cfg(2), timeout=payload["timeout"]),
                                          cpu=True)
    rank = accelerator.process_index
    model = build("llama")
    opt = torch.optim.AdamW(grouped_params(model), lr=1e-2)
    data = [{"input_ids": x, "labels": x.clone()} for x in samples(8)]
    dl = torch.utils.data.DataLoader(data, batch_size=2, shuffle=False)
    model, opt, dl = accelerator.prepare(model, opt, dl)
    batch = next(iter(dl))
    loss = model(**batch).loss
    if rank == 1:
        os.kill(os.getpid(), signal.SIGSTOP)

    def run():
        accelerator.backward(loss)
        opt.step()

    _report_frozen(out_dir, rank, run)


def frozen_peer_trainer(payload, out_dir: Path):
    """ZeroTrainer with TrainingArguments(ddp_timeout=T): rank 1 stops itself (SIGSTOP) at the
    start of step 2; rank 0 must fail with CollectiveTimeout within about T seconds."""
    from transformers import TrainerCallback

    from integration_scenarios import sequential, trainer_dataset, trainer_kwargs, zero_cfg

    class FreezeRank1(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == 1 and dist.get_rank() == 1:
                os.kill(os.getpid(), signal.SIGSTOP)

    args = hf_zero.ZeroTrainingArguments(zero_config=zero_cfg(2), ddp_timeout=payload["timeout"],
                                         **trainer_kwargs(out_dir / "trainer", 2, max_steps=4))
    trainer = sequential(hf_zero.ZeroTrainer)(model=build("llama"), args=args, train_dataset=trainer_dataset(),
                                               callbacks=[FreezeRank1()])
    _report_frozen(out_dir, dist.get_rank(), trainer.train)


def preempt_trainer(payload, out_dir: Path):
    """ZeroTrainer with ``hf_zero.save_on_signal``: rank 1 sends itself SIGTERM at the start of
    optimizer step ``at``; rank 0 writes the step it began last to ``out_dir/progress0``."""
    from transformers import TrainerCallback

    from integration_scenarios import sequential, trainer_dataset, trainer_kwargs, zero_cfg

    class SignalRank1(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            (out_dir / f"progress{dist.get_rank()}").write_text(str(state.global_step))
            if state.global_step == payload["at"] and dist.get_rank() == 1:
                os.kill(os.getpid(), signal.SIGTERM)

    cfg = zero_cfg(2, hf_zero={"save_on_signal": payload["save_on_signal"]})
    args = hf_zero.ZeroTrainingArguments(zero_config=cfg, **trainer_kwargs(out_dir / "trainer", 2, max_steps=6))
    trainer = sequential(hf_zero.ZeroTrainer)(model=build("llama"), args=args, train_dataset=trainer_dataset(),
                                               callbacks=[SignalRank1()])
    trainer.train()
    return {"finished": True}
