"""ZeroTrainer on 2 gloo ranks logs the per-step losses of a plain Trainer on one process.

One launch trains stages 1, 2 and 3 (stage 3 with activation checkpointing, then generate() and
save_model()); the reference is a plain ``transformers.Trainer`` here, in one process, with the
same global batch (per-device batch 2 × 2 ranks = 4, accumulation 2) and the same data order
(sequential sampler; Accelerate's sharding gives global micro-step k the samples a single process
of batch 4 reads). One more run is started with ``accelerate launch --config_file
recipes/accelerate/cpu_2proc.yaml`` and configured from the command line.

Tolerance: fp32; per-step losses within 1e-5 (measured ~5e-7), logged grad norms 1e-5 relative,
final weights 2e-4 (AdamW at lr 1e-2, docs/engine.md; measured ~1e-6).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import integration_scenarios as S
from launch import launch

ROOT = Path(__file__).resolve().parent.parent
CASES = [
    dict(name="stage1", stage=1, micro=2),
    dict(name="stage2", stage=2, micro=2),
    dict(name="stage3", stage=3, micro=2, checkpointing=True, generate=True, save_model=True),
]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("trainer")
    return out, launch(2, "integration_scenarios:trainer_cases", {"cases": CASES}, out, timeout=400)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    from transformers import Trainer, TrainingArguments

    model = S.build("llama")
    trainer = S.sequential(Trainer)(model=model, train_dataset=S.trainer_dataset(),
                                    args=TrainingArguments(**S.trainer_kwargs(tmp_path_factory.mktemp("ref"), 4)))
    trainer.train()
    norms = [h["grad_norm"] for h in trainer.state.log_history if "grad_norm" in h]
    return model, S.logged_losses(trainer), norms


@pytest.mark.parametrize("case", CASES, ids=lambda c: c["name"])
def test_losses_and_weights_match_one_process(run, reference, case):
    out, results = run
    ref_model, ref_losses, ref_norms = reference
    assert len(ref_losses) == 3
    for r in (0, 1):
        res = results[r][case["name"]]
        assert res["stage"] == case["stage"]
        assert res["losses"] == pytest.approx(ref_losses, abs=1e-5)
        assert res["grad_norms"] == pytest.approx(ref_norms, rel=1e-5)
    got = load_file(str(out / f"{case['name']}.safetensors"))
    for k, v in ref_model.state_dict().items():
        torch.testing.assert_close(got[k], v, atol=2e-4, rtol=0, msg=k)


def test_callback_logs_memory_loss_scale_and_norm(run):
    _, results = run
    keys = set(results[0]["stage2"]["zero_logs"])
    for r in (0, 1):
        assert {f"zero/rank{r}_model_state_mb", f"zero/rank{r}_optimizer_state_mb", f"zero/rank{r}_param_mb"} <= keys
    assert {"zero/loss_scale", "zero/skipped_steps", "zero/grad_norm"} <= keys


def test_save_model_matches_full_state_dict(run):
    _, results = run
    res = results[0]["stage3"]
    assert "model.safetensors" in res["export_files"] and "config.json" in res["export_files"]
    assert res["export_logit_diff"] == 0.0


def test_stage3_generate_matches_unsharded(run):
    """Ranks generate from prompts of different lengths; all ranks step together (synced)."""
    out, results = run
    model = S.build("llama")
    model.load_state_dict(load_file(str(out / "stage3.safetensors")))
    model.eval()
    for r in (0, 1):
        res = results[r]["stage3"]
        with torch.no_grad():
            want = model.generate(input_ids=torch.tensor(res["prompt"]), max_new_tokens=5, do_sample=False,
                                  pad_token_id=0, eos_token_id=None)
        assert res["generated"] == want.tolist()


def test_accelerate_launch_recipe_and_command_line(tmp_path, reference):
    """As users launch it: ``accelerate launch --config_file recipes/accelerate/cpu_2proc.yaml``,
    arguments (zero_config as a JSON string) parsed by HfArgumentParser."""
    zero = json.dumps(S.zero_cfg(2))
    env = dict(os.environ, ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    accelerate = str(Path(sys.executable).parent / "accelerate")
    cmd = [accelerate, "launch", "--config_file", str(ROOT / "recipes/accelerate/cpu_2proc.yaml"),
           "--main_process_port", str(__import__("launch").free_port()),
           str(ROOT / "tests/integration_scenarios.py"), "--output_dir", str(tmp_path), "--zero_config", zero,
           "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "2", "--max_steps", "3",
           "--learning_rate", str(S.LR), "--weight_decay", "0.1", "--max_grad_norm", str(S.CLIP),
           "--logging_steps", "1", "--save_strategy", "no", "--report_to", "none", "--use_cpu", "--seed", "0",
           "--disable_tqdm", "true", "--lr_scheduler_type", "linear"]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-4000:]
    _, ref_losses, _ = reference
    for r in (0, 1):
        res = json.loads((tmp_path / f"cli_rank{r}.json").read_text())
        assert res["world"] == 2 and res["stage"] == 2 and res["type"] == "ZeroAccelerator"
        assert res["distributed_type"] == "DistributedType.MULTI_CPU"
        assert res["losses"] == pytest.approx(ref_losses, abs=1e-5)


def _build(tmp_path, zero_config, **kw):
    import hf_zero

    args = hf_zero.ZeroTrainingArguments(zero_config=zero_config, **S.trainer_kwargs(tmp_path, 2, **kw))
    return hf_zero.ZeroTrainer(model=S.build("llama"), args=args, train_dataset=S.trainer_dataset(8))


def test_fp16_config_vs_bf16_argument_fails_before_training(tmp_path):
    import hf_zero

    with pytest.raises(hf_zero.ConfigError) as e:
        _build(tmp_path, {"fp16": {"enabled": True}, "zero_optimization": {"stage": 2}}, bf16=True)
    msg = str(e.value)
    assert "fp16.enabled=true contradicts the value false" in msg
    assert "TrainingArguments.fp16=False, bf16=True" in msg


def test_batch_size_mismatch_fails_before_training(tmp_path):
    import hf_zero

    with pytest.raises(hf_zero.ConfigError) as e:
        _build(tmp_path, {"train_micro_batch_size_per_gpu": 8, "zero_optimization": {"stage": 2}})
    msg = str(e.value)
    assert "train_micro_batch_size_per_gpu=8 contradicts the value 2" in msg
    assert "TrainingArguments.per_device_train_batch_size=2" in msg


def test_absent_keys_take_the_arguments_values(tmp_path):
    """A config that does not mention clipping, batch sizes or precision takes them from the
    arguments (no false contradiction with TrainingArguments' defaults)."""
    c = _build(tmp_path, {"zero_optimization": {"stage": 2}}, max_grad_norm=1.0).zero_config_resolved
    assert (c.train_micro_batch_size_per_gpu, c.gradient_accumulation_steps, c.gradient_clipping) == (2, 2, 1.0)


def test_auto_values_come_from_training_arguments(tmp_path):
    cfg = {"train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto",
           "gradient_accumulation_steps": "auto", "gradient_clipping": "auto",
           "bf16": {"enabled": "auto"}, "zero_optimization": {"stage": 1},
           "optimizer": {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto",
                                                     "weight_decay": "auto"}}}
    trainer = _build(tmp_path, json.dumps(cfg), adam_beta2=0.99, gradient_accumulation_steps=4)
    c = trainer.zero_config_resolved
    assert (c.train_micro_batch_size_per_gpu, c.gradient_accumulation_steps, c.train_batch_size) == (2, 4, 8)
    assert c.gradient_clipping == S.CLIP and c.bf16.enabled is False
    assert dict(c.optimizer.params)["lr"] == S.LR and tuple(dict(c.optimizer.params)["betas"]) == (0.9, 0.99)
