"""Launched side of tests/test_deepspeed_api.py: a DeepSpeed-style loop calling the engine
methods DeepSpeed scripts use, recording what they return."""

from __future__ import annotations

from pathlib import Path

import torch

import hf_zero
from hf_zero.engine.flat import FlatState
from hf_zero.initialize import init_distributed
from models import batches, build


def engine_methods(payload, out_dir: Path):
    rank, world = init_distributed()
    stage = payload["stage"]
    cfg = {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 2,
        "gradient_clipping": 0.5,
        "zero_optimization": {"stage": stage},
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-2}},
        "scheduler": {"type": "WarmupLR", "params": {"warmup_min_lr": 0.0, "warmup_max_lr": 1e-2,
                                                     "warmup_num_steps": 4, "warmup_type": "linear"}},
    }
    if payload.get("fp16"):
        # 2^20: the first steps overflow in fp16 and are skipped until the scale has come down
        cfg["fp16"] = {"enabled": True, "initial_scale_power": 20, "hysteresis": 1}
    engine, optimizer, _, scheduler = hf_zero.initialize(model=build("llama"), config=cfg)
    rec = {
        "gas_call": engine.gradient_accumulation_steps(), "gas_attr": int(engine.gradient_accumulation_steps),
        "clip_call": engine.gradient_clipping(), "train_batch_size": engine.train_batch_size(),
        "micro": engine.train_micro_batch_size_per_gpu(), "stage": engine.zero_optimization_stage(),
        "fp16": engine.fp16_enabled(), "bf16": engine.bfloat16_enabled(), "global_rank": engine.global_rank,
        "local_rank": engine.local_rank, "dp_world_size": engine.dp_world_size,
        "steps": [],
    }
    for step in batches(6, 2, world):
        for micro in step:
            engine.backward(engine(**micro[rank]).loss)
            engine.step()
            rec["steps"].append({"applied": engine.was_step_applied(), "skipped": engine.skipped_steps,
                                 "global_steps": engine.global_steps, "global_samples": engine.global_samples,
                                 "lr": engine.get_lr(), "group_lr": [g["lr"] for g in optimizer.param_groups],
                                 "mom": [list(m) if isinstance(m, (tuple, list)) else m for m in engine.get_mom()]})
    # a forced boundary: one micro-step updates the weights
    before = engine.full_state_dict()
    engine.set_gradient_accumulation_boundary(True)
    micro = batches(1, 1, world, seed=7)[0][0]
    engine.backward(engine(**micro[rank]).loss)
    engine.step()
    engine.set_gradient_accumulation_boundary(None)
    after = engine.full_state_dict()
    rec["forced_boundary_changed"] = any(not torch.equal(before[k], after[k]) for k in after)
    rec["forced_boundary_applied"] = engine.was_step_applied()
    rec["boundary_after_reset"] = engine.is_gradient_accumulation_boundary()
    try:
        with engine.no_sync():
            pass
        rec["no_sync"] = "ok"
    except RuntimeError as exc:
        rec["no_sync"] = str(exc)
    with hf_zero.gathered_parameters(engine.module.lm_head.weight):
        engine.empty_partition_cache()  # the pinned unit stays
        rec["pinned_kept"] = bool(torch.isfinite(engine.module.lm_head.weight.sum()))
    engine.empty_partition_cache()
    rec["gathered_after_empty"] = [u.name for u in engine.units if stage == 3 and u.state is not FlatState.SHARDED]
    rec["save_16bit"] = engine.save_16bit_model(str(out_dir / "export"))
    ref = {k: v.to(engine.compute_dtype) for k, v in engine.full_state_dict().items()}
    if rank == 0:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in ref.items()}, str(out_dir / "expected.safetensors"))
    engine.destroy()
    return rec
