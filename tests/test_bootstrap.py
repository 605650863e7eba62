"""The bootstrap (issue 11): unmodified stock scripts (tests/bootstrap_scripts.py, no ``import
hf_zero``) run on hf_zero under ``torchrun -m hf_zero.run`` / ``accelerate launch -m hf_zero.run``.

Reference: a plain ``transformers.Trainer`` in this process on one rank with the same global batch
(2 ranks x 2 = 4, accumulation 2) and the same data order (the Trainer's seeded sampler gives
global micro-step k the samples one process of batch 4 reads). Losses within 1e-5. The checkpoint
must be hf_zero's sharded one at the config's stage, so DDP passing for ZeRO fails.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import bootstrap_scripts as B
import integration_scenarios as S
from launch import free_port

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
TRAIN_ARGS = ["--gradient_accumulation_steps", "2", "--max_steps", "3", "--learning_rate", str(S.LR),
              "--weight_decay", "0.1", "--max_grad_norm", str(S.CLIP), "--logging_steps", "1",
              "--save_strategy", "steps", "--save_steps", "3", "--report_to", "none", "--use_cpu", "--seed", "0",
              "--disable_tqdm", "true", "--lr_scheduler_type", "linear"]


def _env(**extra):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "HF_ZERO_CONFIG"):
        env.pop(var, None)
    env.update(extra)
    return env


def _run(cmd, env, cwd):
    p = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
    return p


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    ids = S.samples(48).tolist()
    args = TrainingArguments(**S.trainer_kwargs(tmp_path_factory.mktemp("ref"), 4))
    args.seed = 0
    trainer = Trainer(model=S.build("llama"), args=args, train_dataset=Dataset.from_dict({"input_ids": ids,
                                                                                          "labels": ids}))
    trainer.train()
    return S.logged_losses(trainer)


def test_stock_trainer_torchrun_deepspeed_json_stage3(tmp_path, reference):
    (tmp_path / "train.py").write_text(B.TRAINER)
    out = tmp_path / "out"
    cmd = [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()), "-m", "hf_zero.run",
           "train.py", "--output_dir", str(out), "--deepspeed", json.dumps(S.zero_cfg(3)),
           "--per_device_train_batch_size", "2", *TRAIN_ARGS]
    p = _run(cmd, _env(), tmp_path)
    assert "hf_zero active: ZeRO stage 3" in p.stdout + p.stderr
    for r in (0, 1):
        res = json.loads((out / f"result_rank{r}.json").read_text())
        assert res["world"] == 2 and "ZeroAccelerator" in res["accelerator"] and "ZeroTrainerMixin" in res["trainer"]
        assert res["losses"] == pytest.approx(reference, abs=1e-5)
    index = json.loads((out / "checkpoint-3" / "global_step3" / "index.json").read_text())
    assert index["stage"] == 3


def test_stock_accelerator_takes_train_loader_micro_batch(tmp_path):
    """accelerate launch (recipes/accelerate CPU config) + HF_ZERO_CONFIG: a stock Accelerator is
    hf_zero's; train (2) and eval (4) loaders prepared together: micro-batch "auto" -> 2."""
    (tmp_path / "acc.py").write_text(B.ACCELERATE)
    out = tmp_path / "out"
    cmd = [str(BIN / "accelerate"), "launch", "--config_file", str(ROOT / "recipes/accelerate/cpu_2proc.yaml"),
           "--main_process_port", str(free_port()), "-m", "hf_zero.run", "acc.py", str(out)]
    _run(cmd, _env(ACCELERATE_USE_CPU="true", HF_ZERO_CONFIG=json.dumps(S.zero_cfg(2))), tmp_path)
    for r in (0, 1):
        res = json.loads((out / f"result_rank{r}.json").read_text())
        assert "ZeroAccelerator" in res["accelerator"] and res["world"] == 2
        assert res["micro"] == 2 and res["stage"] == 2
