"""Ranks that build different weights (issue 13 item 11), for tests/test_start_weights.py."""

from pathlib import Path

import torch

from models import build


def different_seeds(payload, out_dir: Path):
    import hf_zero
    import torch.distributed as dist

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    model = build("llama", seed=payload["seeds"][rank])
    config = {"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": payload["stage"]},
              "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}}
    engine, *_ = hf_zero.initialize(model=model, config=config)
    full = engine.full_state_dict()
    reference = build("llama", seed=payload["seeds"][0]).state_dict()
    return {"max_diff_from_rank0_model": max(float((full[k].float() - reference[k].float()).abs().max())
                                             for k in reference)}
