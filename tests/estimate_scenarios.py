"""Launched scenario for tests/test_estimate.py: per-rank model-state bytes of a small Llama,
bf16 + AdamW, after one step at each of stages 1-3 (and stage 0 when run at world size 1)."""

from __future__ import annotations

from pathlib import Path

import torch

import hf_zero
from hf_zero.initialize import init_distributed

ARCH = dict(vocab_size=512, hidden_size=64, intermediate_size=160, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)


def build():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**ARCH))


def measure(payload, out_dir: Path):
    rank, world = init_distributed()
    out = {}
    for stage in payload["stages"]:
        model = build()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        cfg = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "bf16": {"enabled": True},
               "zero_optimization": {"stage": stage}}
        engine, _, _, _ = hf_zero.initialize(model=model, optimizer=opt, config=cfg)
        ids = torch.randint(0, ARCH["vocab_size"], (2, 16), generator=torch.Generator().manual_seed(rank))
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        engine.step()
        rep = engine.memory_report()
        out[str(stage)] = {k: rep[k] for k in ("param_bytes", "grad_bytes", "master_bytes", "optimizer_state_bytes",
                                                 "model_state_bytes")}
        engine.destroy()
    return out
