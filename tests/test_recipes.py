"""Every recipe validates (parses, "auto" resolves, batch arithmetic, memory fits its hardware)
and runs with --smoke on this CPU through the same code path as a real run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hf_zero.recipes import RecipeError, apply_overrides, list_recipes, load_recipe, validate

REPO = Path(__file__).resolve().parent.parent
RECIPES = list_recipes()
EXPECTED = {"tiny", "qwen2.5-7b-1gpu-offload", "qwen2.5-7b-4gpu-stage2", "mistral-7b-8gpu-stage3",
            "qwen2.5-14b-1gpu-nvme", "mistral-7b-lora-stage3"}


def test_the_issue_recipes_exist():
    assert EXPECTED <= set(RECIPES)


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_validates(name):
    recipe = load_recipe(name)
    v = validate(recipe)
    assert v.ok, v.errors
    assert not v.warnings, v.warnings
    assert v.resolved is not None and not v.resolved.unresolved_keys()
    t = recipe.training
    assert v.resolved.train_batch_size == t["per_device_train_batch_size"] * t["gradient_accumulation_steps"] * recipe.world_size
    assert recipe.data["dataset"]["global_batch_size"] == v.resolved.train_batch_size
    if not recipe.on_cpu:
        assert recipe.data["model"]["name"] and "/" in recipe.data["model"]["name"]   # a real hub model
        assert recipe.data["dataset"]["name"] == "yahma/alpaca-cleaned"


def test_validation_catches_bad_recipes():
    recipe = load_recipe("qwen2.5-7b-4gpu-stage2")
    big, zero = apply_overrides(recipe, recipe.zero_dict(), ["per_device_train_batch_size=64"])
    v = validate(big, zero)
    assert any("GB per GPU" in e for e in v.errors)          # activations no longer fit
    assert any("global_batch_size" in e for e in v.errors)
    _, zero = apply_overrides(recipe, recipe.zero_dict(), ["zero.train_batch_size=7"])
    assert any("train_batch_size" in e for e in validate(recipe, zero).errors)
    with pytest.raises(RecipeError, match="not a TrainingArguments field"):
        apply_overrides(recipe, {}, ["learning_rat=1"])
    with pytest.raises(RecipeError, match="known recipes"):
        load_recipe("no-such-recipe")


def test_overrides_reach_training_and_zero():
    recipe = load_recipe("tiny")
    r2, zero = apply_overrides(recipe, recipe.zero_dict(), ["learning_rate=1e-3", "zero.zero_optimization.stage=3",
                                                            "max_steps=5"])
    assert r2.training["learning_rate"] == 1e-3 and r2.training["max_steps"] == 5
    assert zero["zero_optimization"]["stage"] == 3
    assert recipe.training["learning_rate"] == 3e-3    # the loaded recipe is untouched


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_recipe_smoke_run(name, tmp_path):
    pytest.importorskip("hf_zero.integrations.trainer", reason="ZeroTrainer (hf_zero.integrations) not available yet")
    if load_recipe(name).lora:
        pytest.importorskip("peft")
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    proc = subprocess.run([sys.executable, "-m", "hf_zero.cli", "train", name, "--smoke", "--output-dir", str(tmp_path),
                           "disable_tqdm=true"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["smoke"] and summary["steps"] == 3
    if load_recipe(name).lora:
        assert (tmp_path / "adapter").is_dir()
    else:
        assert (tmp_path / "checkpoint" / "latest").exists()
        assert (tmp_path / "model" / "config.json").is_file()
        assert "accuracy_after" in summary
