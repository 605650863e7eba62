"""Scenarios (run in launched processes) for DeepSpeed-parity checks of the engine's surface."""

from __future__ import annotations

from pathlib import Path

import torch

import hf_zero
from hf_zero.initialize import init_distributed
from models import build


def forwarding(payload, out_dir: Path):
    """engine.<name> reaches the wrapped model for names the engine lacks."""
    init_distributed()
    model = build("llama")
    cfg = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": payload["stage"]},
           "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}}
    engine, *_ = hf_zero.initialize(model=model, config=cfg)
    engine.eval()
    prompt = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        via_engine = engine.generate(prompt, max_new_tokens=4, do_sample=False)
        direct = engine.module.generate(prompt, max_new_tokens=4, do_sample=False)
    engine.gradient_checkpointing_enable()
    try:
        engine.no_such_attribute_xyz
        missing = None
    except AttributeError as e:
        missing = str(e)
    return {
        "generated": via_engine.tolist(),
        "direct": direct.tolist(),
        "checkpointing": bool(engine.module.is_gradient_checkpointing),
        # engine.generate is the engine's own (stage-3 gather choice); other methods forward as they are
        "forwarded_is_module_method": engine.get_input_embeddings.__self__ is engine.module,
        "engine_config_is_zero": type(engine.config).__name__,
        "model_config": type(engine.module.config).__name__,
        "vocab_via_engine": engine.get_input_embeddings().num_embeddings,
        "missing": missing,
    }
