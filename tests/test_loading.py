"""Pretrained loading with one model copy in host memory: rank 0 reads the weights, the other
ranks build on the meta device and receive their shards unit by unit."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from launch import launch


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    path = tmp_path_factory.mktemp("pretrained")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=512, intermediate_size=1536, num_hidden_layers=6,
                      num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=64, tie_word_embeddings=True)
    LlamaForCausalLM(cfg).save_pretrained(path)  # ~20M parameters, ~80 MB in fp32
    return path


@pytest.mark.parametrize("stage", [2, 3])
def test_meta_ranks_train_like_full_loading(pretrained, tmp_path, stage):
    # A fixed mmap threshold makes glibc return every large freed block at once, so peak RSS follows
    # the live tensors; with its adaptive default the peaks drifted by +-60 MB from run to run.
    env = {"MALLOC_MMAP_THRESHOLD_": "65536"}
    meta = launch(2, "meta_loading", {"path": str(pretrained), "meta": True, "stage": stage}, tmp_path / "meta", env=env)
    full = launch(2, "meta_loading", {"path": str(pretrained), "meta": False, "stage": stage}, tmp_path / "full", env=env)
    assert [r["was_meta"] for r in meta] == [False, True]
    a, b = load_file(str(tmp_path / "meta" / "weights.safetensors")), load_file(str(tmp_path / "full" / "weights.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)  # identical training
    assert [r["loss"] for r in meta] == [r["loss"] for r in full]
    if stage == 3:
        # the meta rank never holds the model: its peak grows by far less than rank 0's
        model_mb = sum(v.numel() * 4 for v in a.values() if v.dim()) / 2**20
        assert meta[1]["peak_growth_mb"] < meta[0]["peak_growth_mb"] - 0.5 * model_mb, meta


def test_trainer_accepts_a_meta_model(pretrained, tmp_path):
    res = launch(2, "meta_trainer", {"path": str(pretrained)}, tmp_path)
    assert len(res[0]["losses"]) == 3 and res[0]["losses"] == res[1]["losses"]
    assert all(l == l and l < 10 for l in res[0]["losses"])  # finite, sensible
