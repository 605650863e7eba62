"""Scenarios for the Accelerate / Trainer integration tests, run inside launched processes
(tests/launch.py) or, for the reference, in the test process itself.

Data order: every run reads the same samples in order (``SequentialTrainer``; a plain
DataLoader without shuffling). With Accelerate's batch sharding, rank r of 2 reads micro-batches
r, r + 2, ... so global micro-step k is samples [k·2b, (k+1)·2b) on two ranks of batch b, the
very batch a single process of batch 2b reads.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from models import VOCAB, build, grouped_params  # noqa: E402

SEQ = 12
LR = 1e-2
CLIP = 0.5


def samples(n: int, seed: int = 3) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (n, SEQ), generator=g)


def lora_model(seed: int = 0):
    from peft import LoraConfig, get_peft_model

    model = build("llama", seed)
    torch.manual_seed(seed + 100)
    cfg = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"])
    model = get_peft_model(model, cfg)
    # LoRA's B starts at zero; give it values so the base path and both factors all matter
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02)
    return model


def zero_cfg(stage: int, **extra) -> dict:
    cfg = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
           "gradient_clipping": "auto", "zero_optimization": {"stage": stage}}
    cfg.update(extra)
    return cfg


# ---------------------------------------------------------------------------------- Accelerate
def _model_optimizer_scheduler(case: dict):
    """The model, AdamW and LambdaLR every Accelerate case and its reference start from."""
    model = lora_model() if case.get("lora") else build("llama")
    if case.get("lora"):
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR, weight_decay=0.1)
    else:
        opt = torch.optim.AdamW(grouped_params(model), lr=LR, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1.0 + 0.1 * s))
    return model, opt, sched


def accelerate_loop(case: dict, accelerator_factory, n_samples: int = 24):
    """The plain Accelerate loop users write. Returns (accelerator, model, losses, norms)."""
    from torch.utils.data import DataLoader

    accelerator = accelerator_factory(case)
    model, opt, sched = _model_optimizer_scheduler(case)
    ids = samples(n_samples)
    data = [{"input_ids": x, "labels": x.clone()} for x in ids]
    dl = DataLoader(data, batch_size=case["micro"], shuffle=False)
    model, opt, dl, sched = accelerator.prepare(model, opt, dl, sched)
    losses, norms, pending = [], [], []
    model.train()
    for batch in dl:
        with accelerator.accumulate(model):
            loss = model(**batch).loss
            accelerator.backward(loss)
            pending.append(loss.item())
            norm = None
            if accelerator.sync_gradients:
                norm = accelerator.clip_grad_norm_(model.parameters(), CLIP)
            opt.step()
            sched.step()
            opt.zero_grad()
            if norm is not None:
                norms.append(float(norm))
                losses.append(sum(pending) / len(pending))
                pending = []
    return accelerator, model, losses, norms


def accelerate_reference(case: dict, world: int, n_samples: int = 24):
    """The unsharded single-process loop on the same global batches (the scheduler stepped
    ``world`` times per update, as Accelerate's scheduler wrapper does)."""
    model, opt, sched = _model_optimizer_scheduler(case)
    trainable = [p for p in model.parameters() if p.requires_grad]
    ids = samples(n_samples)
    micro, accum = case["micro"], case["accum"]
    per_update = micro * world * accum
    norms = []
    for start in range(0, n_samples, per_update):
        chunk = ids[start:start + per_update]
        for k in range(0, len(chunk), micro):
            x = chunk[k:k + micro]
            (model(input_ids=x, labels=x).loss / (len(chunk) // micro)).backward()
        for p in trainable:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        norms.append(float(torch.nn.utils.clip_grad_norm_(trainable, CLIP)))
        opt.step()
        for _ in range(world):
            sched.step()
        opt.zero_grad()
    return model, norms


def _zero_accelerator(case):
    import hf_zero

    cfg = zero_cfg(case["stage"])
    cfg["zero_optimization"].update(case.get("zero_extra", {}))
    return hf_zero.ZeroAccelerator(zero_plugin=hf_zero.ZeroPlugin(cfg), cpu=True,
                                   gradient_accumulation_steps=case["accum"])


def accelerate_cases(payload, out_dir: Path):
    """Each case: train, then rank 0 writes the full weights (and one case a save_model export)."""
    from safetensors.torch import save_file

    out = {}
    for case in payload["cases"]:
        accelerator, model, losses, norms = accelerate_loop(case, _zero_accelerator)
        name = case["name"]
        sd = accelerator.get_state_dict(model)
        if accelerator.is_main_process:
            save_file({k: v.contiguous() for k, v in sd.items()}, str(out_dir / f"{name}.safetensors"))
        if case.get("save_model"):
            accelerator.save_model(model, out_dir / f"{name}_export")
        engine = accelerator.zero_engine
        out[name] = {"losses": losses, "norms": norms, "steps": engine.global_steps,
                     "micro_steps": engine.micro_steps, "stage": engine.stage,
                     "distributed_type": str(accelerator.distributed_type),
                     "memory": engine.memory_report()["model_state_bytes"]}
        accelerator.free_memory()
    return out


# ---------------------------------------------------------------------------------- Trainer
def trainer_dataset(n: int = 48):
    from datasets import Dataset

    ids = samples(n).tolist()
    return Dataset.from_dict({"input_ids": ids, "labels": ids})


def sequential(base):
    """``base`` (a Trainer class) reading the training set in order, without shuffling."""

    class Sequential(base):
        def _get_train_sampler(self, train_dataset=None):
            return torch.utils.data.SequentialSampler(train_dataset if train_dataset is not None else self.train_dataset)

    Sequential.__name__ = "Sequential" + base.__name__
    return Sequential


def trainer_kwargs(out_dir, micro: int, **extra) -> dict:
    kw = dict(output_dir=str(out_dir), per_device_train_batch_size=micro, gradient_accumulation_steps=2,
              max_steps=3, learning_rate=LR, weight_decay=0.1, max_grad_norm=CLIP, logging_steps=1,
              save_strategy="no", report_to=[], use_cpu=True, seed=0, disable_tqdm=True,
              lr_scheduler_type="linear", dataloader_num_workers=0)
    kw.update(extra)
    return kw


def logged_losses(trainer) -> list:
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def trainer_cases(payload, out_dir: Path):
    import hf_zero
    from safetensors.torch import save_file

    out = {}
    for case in payload["cases"]:
        name = case["name"]
        extra = {}
        if case.get("checkpointing"):
            extra["gradient_checkpointing"] = True
            extra["gradient_checkpointing_kwargs"] = {"use_reentrant": False}
        args = hf_zero.ZeroTrainingArguments(zero_config=zero_cfg(case["stage"]),
                                             **trainer_kwargs(out_dir / name, case["micro"], **extra))
        model = lora_model() if case.get("lora") else build("llama")
        trainer = sequential(hf_zero.ZeroTrainer)(model=model, args=args, train_dataset=trainer_dataset())
        trainer.train()
        engine = trainer.zero_engine
        sd = engine.full_state_dict()
        rank = engine.rank
        if rank == 0:
            save_file({k: v.contiguous() for k, v in sd.items()}, str(out_dir / f"{name}.safetensors"))
        res = {"losses": logged_losses(trainer), "stage": engine.stage,
               "zero_logs": sorted(k for h in trainer.state.log_history for k in h if k.startswith("zero/")),
               "grad_norms": [h["grad_norm"] for h in trainer.state.log_history if "grad_norm" in h]}
        if case.get("save_model"):
            export = out_dir / f"{name}_export"
            trainer.save_model(str(export))
            if rank == 0:
                from transformers import AutoModelForCausalLM

                loaded = AutoModelForCausalLM.from_pretrained(str(export))
                fresh = build("llama")
                fresh.load_state_dict(sd)
                x = samples(2, seed=11)
                with torch.no_grad():
                    res["export_logit_diff"] = float((loaded(input_ids=x).logits - fresh(input_ids=x).logits)
                                                     .abs().max())
                res["export_files"] = sorted(os.listdir(export))
        if case.get("generate"):
            prompt = samples(1, seed=20 + rank)[:, : 3 + 2 * rank]  # different lengths per rank
            model.eval()
            with torch.no_grad():
                tokens = trainer.model.generate(input_ids=prompt, max_new_tokens=5, do_sample=False,
                                                pad_token_id=0, eos_token_id=None)
            res["generated"] = tokens.tolist()
            res["prompt"] = prompt.tolist()
        out[name] = res
        trainer.accelerator.free_memory()
    return out


# ---------------------------------------------------------------------------------- command line
def cli_main() -> None:
    """``accelerate launch ... integration_scenarios.py --zero_config '{...}' --output_dir D ...``:
    a ZeroTrainer run configured entirely from the command line (HfArgumentParser)."""
    import hf_zero
    from transformers import HfArgumentParser

    (args,) = HfArgumentParser(hf_zero.ZeroTrainingArguments).parse_args_into_dataclasses()
    model = build("llama")
    trainer = sequential(hf_zero.ZeroTrainer)(model=model, args=args, train_dataset=trainer_dataset())
    trainer.train()
    engine = trainer.zero_engine
    result = {"losses": logged_losses(trainer), "world": engine.world_size, "stage": engine.stage,
              "type": type(trainer.accelerator).__name__,
              "distributed_type": str(trainer.accelerator.distributed_type)}
    Path(args.output_dir).mkdir(parents=True, exist_ok=True)
    (Path(args.output_dir) / f"cli_rank{engine.rank}.json").write_text(json.dumps(result))


def one_process_check() -> None:
    """Run under ``accelerate launch --cpu --num_processes 2``: building the accelerator must fail."""
    import hf_zero

    hf_zero.ZeroAccelerator(zero_plugin=hf_zero.ZeroPlugin(zero_cfg(2)), cpu=True)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "one_process_check":
        one_process_check()
    else:
        cli_main()


def trainer_checkpoints(payload, out_dir: Path):
    """ZeroTrainer with checkpoint-N folders: save every 2 steps (keeping 2), optionally resume
    from the newest one, optionally load the best model at the end."""
    import hf_zero
    import torch.distributed as dist

    world = dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", 1))
    global_batch = 12
    extra = dict(max_steps=payload["max_steps"], save_strategy="steps", save_steps=2, save_total_limit=2,
                 gradient_accumulation_steps=1)
    if payload.get("best"):
        extra.update(eval_strategy="steps", eval_steps=2, load_best_model_at_end=True,
                     metric_for_best_model="eval_loss", greater_is_better=False, per_device_eval_batch_size=2)
    args = hf_zero.ZeroTrainingArguments(zero_config=zero_cfg(payload["stage"]),
                                         **trainer_kwargs(payload["output_dir"], global_batch // world, **extra))
    data = trainer_dataset(72)
    trainer = sequential(hf_zero.ZeroTrainer)(model=build("llama"), args=args, train_dataset=data,
                                              eval_dataset=trainer_dataset(8) if payload.get("best") else None)
    if payload.get("stop_at"):  # a run that dies after its checkpoint at step ``stop_at``
        from transformers import TrainerCallback

        class Stop(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                if state.global_step >= payload["stop_at"]:
                    control.should_training_stop = True

        trainer.add_callback(Stop())
    trainer.train(resume_from_checkpoint=payload.get("resume"))
    sd = trainer.zero_engine.full_state_dict()
    res = {"losses": {int(h["step"]): h["loss"] for h in trainer.state.log_history if "loss" in h},
           "global_step": trainer.state.global_step, "best": trainer.state.best_model_checkpoint,
           "weights_sum": float(sum(v.double().abs().sum() for v in sd.values()))}
    if payload.get("best") and trainer.state.best_model_checkpoint:
        from safetensors.torch import load_file

        best = load_file(os.path.join(trainer.state.best_model_checkpoint, "model.safetensors"))
        res["best_diff"] = max(float((best[k].float() - sd[k]).abs().max()) for k in best)
    trainer.accelerator.free_memory()
    return res


def accelerate_resume(payload, out_dir: Path):
    """A plain Accelerate loop (stage from payload) over 24 samples, micro 2, accumulation 2:
    ``stop_after`` updates then save_state; or load_state and run the rest."""
    from torch.utils.data import DataLoader

    case = {"stage": payload["stage"], "accum": 2, "micro": 2}
    accelerator = _zero_accelerator(case)
    model, opt, sched = _model_optimizer_scheduler(case)
    data = [{"input_ids": x, "labels": x.clone()} for x in samples(24)]
    dl = DataLoader(data, batch_size=2, shuffle=False)
    model, opt, dl, sched = accelerator.prepare(model, opt, dl, sched)
    start = 0
    if payload.get("load"):
        accelerator.load_state(payload["load"])
        start = payload["skip_batches"]
        dl = accelerator.skip_first_batches(dl, start)
    losses, pending, updates = [], [], 0
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
                if payload.get("save") and updates == payload["stop_after"]:
                    accelerator.save_state(payload["save"])
                    break
    sd = accelerator.get_state_dict(model)
    res = {"losses": losses, "lr": opt.param_groups[0]["lr"],
           "weights_sum": float(sum(v.double().abs().sum() for v in sd.values()))}
    accelerator.free_memory()
    return res
