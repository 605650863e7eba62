"""Code that runs inside launched test processes (one function per scenario)."""

from __future__ import annotations

import math
import os
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
    if case.get("offload"):
        off = {"device": case["offload"], "delayed_update": bool(case.get("delayed"))}
        if case["offload"] == "nvme":
            off["nvme_path"] = os.environ["HF_ZERO_TEST_NVME"]
        cfg["zero_optimization"]["offload_optimizer"] = off
    if case.get("offload_param"):
        cfg["zero_optimization"]["offload_param"] = {"device": case["offload_param"]}
        if case["offload_param"] == "nvme":
            cfg["zero_optimization"]["offload_param"]["nvme_path"] = os.environ["HF_ZERO_TEST_NVME"]
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
    return engine, run_steps(engine, batches(case.get("steps", 3), case.get("accum", 2), world), rank)


def run_steps(engine, data, rank: int, between=None) -> list:
    """Train on ``data[step][micro_step][rank]`` (models.batches); return each step's mean
    micro-batch loss on this rank. ``between()``, if given, runs after every optimizer step."""
    losses = []
    for step in data:
        total = 0.0
        for micro in step:
            loss = engine(**micro[rank]).loss
            engine.backward(loss)
            engine.step()
            total += loss.item()
        losses.append(total / len(step))
        if between is not None:
            between()
    return losses


def train_and_save(cases, out_dir: Path, train) -> dict:
    """For every case, ``train(case, rank, world) -> (engine, result)``; rank 0 writes the final
    full fp32 weights to ``<case_id>.safetensors`` for the reference check. Returns the results."""
    rank, world = init_distributed()
    from safetensors.torch import save_file

    results = {}
    for case in cases:
        engine, res = train(case, rank, world)
        sd = engine.full_state_dict()
        if rank == 0:
            save_file({k: v.clone() for k, v in sd.items()}, str(out_dir / f"{case_id(case)}.safetensors"))
        results[case_id(case)] = res
        engine.destroy()
    return results


def parity(payload, out_dir: Path):
    """Train every case; rank 0 writes the final full fp32 weights for the reference check."""
    def train(case, rank, world):
        engine, losses = train_case(case, rank, world)
        return engine, {"losses": losses, "steps": engine.global_steps}

    return train_and_save(payload["cases"], out_dir, train)


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
        rep["unit_padded"] = {u.name: sum(f.padded_numel for f in u.flats) for u in engine.units}
        rep["unit_numel"] = {u.name: sum(f.numel for f in u.flats) for u in engine.units}
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


def several(payload, out_dir: Path):
    """Run several scenarios in one launch: payload = {name: sub_payload}."""
    return {name: globals()[name](sub, out_dir) for name, sub in payload.items()}


def api(payload, out_dir: Path):
    """initialize() as a DeepSpeed script uses it: config optimizer + scheduler + dataset."""
    rank, world = init_distributed()
    from torch.utils.data import TensorDataset

    model = build("llama")
    ids = torch.randint(0, 90, (64, 12), generator=torch.Generator().manual_seed(0))
    dataset = [{"input_ids": row, "labels": row} for row in ids]
    cfg = {
        "train_batch_size": 8 * world,
        "gradient_accumulation_steps": 2,
        "gradient_clipping": 1.0,
        "zero_optimization": {"stage": payload["stage"]},
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "betas": [0.9, 0.95], "weight_decay": 0.0}},
        "scheduler": {"type": "WarmupLR", "params": {"warmup_min_lr": 0.0, "warmup_max_lr": 1e-3,
                                                        "warmup_num_steps": 4, "warmup_type": "linear"}},
    }
    engine, optimizer, loader, sched = hf_zero.initialize(model=model, training_data=dataset, config=cfg)
    lrs, seen = [], []
    for batch in loader:
        seen.append(batch["input_ids"].shape[0])
        loss = engine(**batch).loss
        engine.backward(loss)
        engine.step()
        lrs.append(optimizer.param_groups[0]["lr"])
    return {
        "micro": engine.micro_batch_size,
        "accum": engine.gradient_accumulation_steps,
        "steps": engine.global_steps,
        "micro_steps": engine.micro_steps,
        "batch_sizes": seen,
        "lrs": lrs,
        "optimizer": type(optimizer).__name__,
        "betas": list(optimizer.param_groups[0]["betas"]),
        "sched": type(sched).__name__,
    }


def errors(payload, out_dir: Path):
    """Bad set-ups fail with clear messages, on every rank."""
    rank, world = init_distributed()
    out = {}

    def attempt(name, fn):
        try:
            fn()
            out[name] = None
        except Exception as exc:  # noqa: BLE001 - the message is what we check
            out[name] = f"{type(exc).__name__}: {exc}"

    base = {"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": 2}}
    attempt("batch", lambda: hf_zero.initialize(model=build("llama"), config={
        "train_batch_size": 7, "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 2,
        "zero_optimization": {"stage": 2}, "optimizer": {"type": "SGD", "params": {"lr": 0.1}}}))
    from transformers.optimization import Adafactor

    def adafactor():
        m = build("llama")
        hf_zero.initialize(model=m, optimizer=Adafactor(m.parameters(), lr=1e-3, relative_step=False), config=base)

    attempt("adafactor", adafactor)

    class Custom(torch.optim.Optimizer):
        def __init__(self, params):
            super().__init__(params, {"lr": 0.1})

        def step(self, closure=None):
            pass

    def custom(allow):
        m = build("llama")
        hf_zero.initialize(model=m, optimizer=Custom(m.parameters()),
                           config=dict(base, zero_allow_untested_optimizer=allow))

    attempt("untested", lambda: custom(False))
    attempt("untested_allowed", lambda: custom(True))
    # without an optimizer the engine is inference-only: training calls fail clearly
    attempt("no_optimizer", lambda: hf_zero.initialize(model=build("llama"), config=base)[0].step())
    attempt("offload_param", lambda: hf_zero.initialize(model=build("llama"), config={
        **base, "zero_optimization": {"stage": 3, "offload_param": {"device": "nvme",
                                                                    "nvme_path": str(out_dir / "absent")},
                                      "offload_optimizer": {"device": "cpu"}},
        "optimizer": {"type": "SGD", "params": {"lr": 0.1}}}))
    attempt("offload_param_alone", lambda: hf_zero.initialize(model=build("llama"), config={
        **base, "zero_optimization": {"stage": 3, "offload_param": {"device": "cpu"}},
        "optimizer": {"type": "SGD", "params": {"lr": 0.1}}}))
    return out


def _hwm_mb() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def meta_loading(payload, out_dir: Path):
    """Rank 0 reads the pretrained weights, the others build on 'meta': train a few steps and
    report the weights and each rank's peak-memory growth while loading."""
    rank, world = init_distributed()
    from transformers import LlamaForCausalLM

    open("/proc/self/clear_refs", "w").write("5")  # reset the peak-RSS counter
    before = _hwm_mb()
    if payload["meta"]:
        model = hf_zero.from_pretrained(LlamaForCausalLM, payload["path"])
    else:
        model = LlamaForCausalLM.from_pretrained(payload["path"])
    was_meta = any(p.is_meta for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    cfg = {"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": payload["stage"]}}
    engine, *_ = hf_zero.initialize(model=model, optimizer=opt, config=cfg)
    grew = _hwm_mb() - before
    g = torch.Generator().manual_seed(rank)
    for _ in range(2):
        ids = torch.randint(0, 256, (2, 16), generator=g)
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        engine.step()
    sd = engine.full_state_dict()
    if rank == 0:
        from safetensors.torch import save_file

        save_file({k: v.clone() for k, v in sd.items()}, str(out_dir / "weights.safetensors"))
    return {"was_meta": was_meta, "peak_growth_mb": grew, "loss": loss.item()}


def meta_trainer(payload, out_dir: Path):
    """A ZeroTrainer on a model loaded with hf_zero.from_pretrained (meta on rank 1)."""
    rank, world = init_distributed()
    from datasets import Dataset
    from transformers import LlamaForCausalLM

    model = hf_zero.from_pretrained(LlamaForCausalLM, payload["path"])
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 256, (16, 12), generator=g).tolist()
    args = hf_zero.ZeroTrainingArguments(
        zero_config={"zero_optimization": {"stage": 3}}, output_dir=str(out_dir / "t"), per_device_train_batch_size=2,
        max_steps=3, logging_steps=1, report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True)
    trainer = hf_zero.ZeroTrainer(model=model, args=args, train_dataset=Dataset.from_dict({"input_ids": ids, "labels": ids}))
    trainer.train()
    return {"losses": [h["loss"] for h in trainer.state.log_history if "loss" in h]}
