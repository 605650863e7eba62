"""Regenerate tests/data/deepspeed/: small checkpoints saved by real DeepSpeed, with the losses
of DeepSpeed's own continuation and its zero_to_fp32 output.

Runs in DeepSpeed's own virtual environment, never in hf_zero's (deepspeed is not a dependency
of hf_zero)::

    python3 -m venv /work/ds-venv && /work/ds-venv/bin/pip install torch==2.13.0
    DS_BUILD_OPS=0 /work/ds-venv/bin/pip install deepspeed transformers safetensors
    /work/ds-venv/bin/python scripts/make_deepspeed_fixtures.py tests/data/deepspeed

For every (stage, dtype) it launches 2 processes on the CPU accelerator over gloo, trains the
tiny Llama of tests/models.py for ``STEPS_BEFORE`` steps with ``deepspeed.initialize`` (client
torch AdamW with two parameter groups, DeepSpeed's WarmupLR, gradient clipping), saves a
checkpoint, and records the global losses of the next ``STEPS_AFTER`` steps of DeepSpeed's own
continuation. The parent then runs DeepSpeed's ``get_fp32_state_dict_from_zero_checkpoint`` on
the saved checkpoint and writes the result as ``zero_to_fp32.safetensors``.

Layout: ``<out>/stage<S>_<dtype>/{latest, global_step<N>/..., meta.json, zero_to_fp32.safetensors}``.
The data of step ``k`` is ``global_batch(k)`` (the same generator as tests/checkpoint_scenarios.py),
rank ``r`` of ``W`` taking rows ``[r*12/W, (r+1)*12/W)``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

VOCAB = 96
GLOBAL_BATCH = 12
SEQ = 10
WORLD = 2
STEPS_BEFORE = 3
STEPS_AFTER = 3
LR = 1e-2


def ds_config(stage: int, dtype: str) -> dict:
    """The DeepSpeed config of every fixture (also stored in meta.json, read by the tests)."""
    return {
        "train_batch_size": GLOBAL_BATCH,
        "train_micro_batch_size_per_gpu": GLOBAL_BATCH // WORLD,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 1.0,
        "zero_allow_untested_optimizer": True,
        "zero_optimization": {"stage": stage},
        "bf16": {"enabled": dtype == "bf16"},
        # dynamic loss scaling from 2^8, growing every 2 clean steps: the continuation grows the
        # scale, so the resumed scaler state (scale, iteration, last overflow) matters
        "fp16": {"enabled": dtype == "fp16", "loss_scale": 0, "initial_scale_power": 8, "loss_scale_window": 2,
                 "hysteresis": 2, "min_loss_scale": 1},
        "scheduler": {"type": "WarmupLR",
                      "params": {"warmup_min_lr": 0.0, "warmup_max_lr": LR, "warmup_num_steps": 5,
                                 "warmup_type": "linear"}},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def build_model(bench: bool = False):
    """The tiny Llama of tests/models.py; ``bench``: a ~60M-parameter one for the consolidation
    benchmark (docs/benchmarks.md), saved after one step and not committed."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if bench:
        cfg = LlamaConfig(vocab_size=32000, hidden_size=512, intermediate_size=1408, num_hidden_layers=6,
                          num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=64)
    else:
        cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg)


def grouped_params(model):
    decay = [p for n, p in model.named_parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.requires_grad and p.ndim < 2]
    return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]


def global_batch(step: int):
    import torch

    g = torch.Generator().manual_seed(100 + step)
    return torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ), generator=g)


def worker(stage: int, dtype: str, out: Path, bench: bool = False) -> None:
    import deepspeed
    import torch
    import torch.distributed as dist

    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    rank, world = dist.get_rank(), dist.get_world_size()
    model = build_model(bench)
    opt = torch.optim.AdamW(grouped_params(model), lr=LR, weight_decay=0.1)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=ds_config(stage, dtype))
    per = GLOBAL_BATCH // world

    def run(step: int) -> float:
        ids = global_batch(step)[rank * per:(rank + 1) * per]
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        engine.step()
        t = loss.detach().float().clone()
        dist.all_reduce(t)
        return t.item() / world

    if bench:
        run(0)
        engine.save_checkpoint(str(out))
        return
    before = [run(k) for k in range(STEPS_BEFORE)]
    engine.save_checkpoint(str(out))
    after = [run(k) for k in range(STEPS_BEFORE, STEPS_BEFORE + STEPS_AFTER)]
    if rank == 0:
        import deepspeed as ds

        meta = {"deepspeed": ds.__version__, "torch": torch.__version__, "stage": stage, "dtype": dtype,
                "world_size": world, "steps_before": STEPS_BEFORE, "losses_before": before,
                "continuation_losses": after, "lr": LR, "global_batch": GLOBAL_BATCH, "seq": SEQ,
                "ds_config": ds_config(stage, dtype)}
        (out / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    dist.barrier()


def trainer_worker(out: Path) -> None:
    """The stock Trainer with ``deepspeed=`` (stage 2, fp32) on 2 processes: saves
    ``checkpoint-3/`` (DeepSpeed's files inside) and logs 6 steps. The dataset is
    global_batch(0..5) in order; ``meta["fed_rows"][rank][step]`` records the rows each rank was
    actually fed (on the CPU accelerator both ranks were fed the same rows), so the test replays
    exactly the run's data."""
    import torch
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    ids = torch.cat([global_batch(k) for k in range(2 * STEPS_BEFORE)]).tolist()
    data = Dataset.from_dict({"input_ids": ids, "labels": ids})

    class Sequential(Trainer):
        def _get_train_sampler(self, train_dataset=None):
            return torch.utils.data.SequentialSampler(train_dataset if train_dataset is not None else self.train_dataset)

    cfg = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
           "gradient_clipping": "auto", "zero_optimization": {"stage": 2},
           "zero_allow_untested_optimizer": True}
    args = TrainingArguments(output_dir=str(out), per_device_train_batch_size=GLOBAL_BATCH // WORLD,
                             max_steps=2 * STEPS_BEFORE, learning_rate=LR, weight_decay=0.1, max_grad_norm=1.0,
                             logging_steps=1, save_strategy="steps", save_steps=STEPS_BEFORE, report_to=[],
                             seed=0, disable_tqdm=True, lr_scheduler_type="linear", dataloader_num_workers=0,
                             deepspeed=cfg, save_only_model=False)
    from transformers import default_data_collator

    fed = []  # the dataset rows this rank was fed, one list per step (the test replays them)

    def recording_collator(features):
        fed.append([ids.index(f["input_ids"]) for f in features])
        return default_data_collator(features)

    trainer = Sequential(model=build_model(), args=args, train_dataset=data, data_collator=recording_collator)
    trainer.train()
    import torch.distributed as dist

    every_rank = [None] * dist.get_world_size()
    dist.all_gather_object(every_rank, fed)
    if trainer.is_world_process_zero():
        losses = {int(h["step"]): h["loss"] for h in trainer.state.log_history if "loss" in h}
        lrs = {int(h["step"]): h["learning_rate"] for h in trainer.state.log_history if "learning_rate" in h}
        meta = {"trainer": True, "steps_before": STEPS_BEFORE, "losses": losses, "lr": lrs, "ds_config": cfg,
                "global_batch": GLOBAL_BATCH, "seq": SEQ, "fed_rows": every_rank}
        (out / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_one(stage, dtype: str, out: Path, bench: bool = False) -> None:
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    port = free_port()
    procs = []
    for rank in range(WORLD):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD),
                   LOCAL_WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                   OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")
        procs.append(subprocess.Popen([sys.executable, __file__, "--worker", str(stage), dtype, str(out)]
                                      + (["--bench"] if bench else []), env=env))
    codes = [p.wait() for p in procs]
    if any(codes):
        raise SystemExit(f"stage {stage} {dtype}: worker exit codes {codes}")
    # DeepSpeed copies its own conversion script next to the checkpoint: not test data
    for script in out.rglob("zero_to_*.py"):
        script.unlink()
    if bench:
        return
    if stage == "trainer":
        for p in out.glob("checkpoint-*"):
            if p.name != f"checkpoint-{STEPS_BEFORE}":
                shutil.rmtree(p)
        for junk in ("training_args.bin",):  # a pickle of TrainingArguments: not read, not kept
            for p in out.rglob(junk):
                p.unlink()
        out = out / f"checkpoint-{STEPS_BEFORE}"
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from safetensors.torch import save_file

    sd = get_fp32_state_dict_from_zero_checkpoint(str(out))
    save_file({k: v.contiguous().clone() for k, v in sd.items()}, str(out / "zero_to_fp32.safetensors"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out", nargs="?", default="tests/data/deepspeed")
    ap.add_argument("--worker", nargs=3, metavar=("STAGE", "DTYPE", "DIR"))
    ap.add_argument("--only", default=None, help="e.g. stage2_bf16")
    ap.add_argument("--bench", action="store_true",
                    help="one ~60M-parameter stage-2 fp32 checkpoint in OUT (the consolidation benchmark)")
    args = ap.parse_args()
    if args.worker:
        stage, dtype, out = args.worker
        if stage == "trainer":
            trainer_worker(Path(out))
        else:
            worker(int(stage), dtype, Path(out), bench=args.bench)
        return
    if args.bench:
        make_one(2, "fp32", Path(args.out), bench=True)
        print("wrote", args.out, flush=True)
        return
    if args.only in (None, "trainer_stage2_fp32"):
        make_one("trainer", "fp32", Path(args.out) / "trainer_stage2_fp32")
        print("wrote", Path(args.out) / "trainer_stage2_fp32", flush=True)
    for stage in (1, 2, 3):
        for dtype in ("fp32", "bf16", "fp16"):
            name = f"stage{stage}_{dtype}"
            if args.only and args.only != name:
                continue
            make_one(stage, dtype, Path(args.out) / name)
            print("wrote", Path(args.out) / name, flush=True)


if __name__ == "__main__":
    main()
