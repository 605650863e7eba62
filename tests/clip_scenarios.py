"""Launched-process scenario for tests/test_clip_scope.py: trainable parameters that the
optimizer does not hold (issue 12 item 5).

The optimizer gets every parameter except the MLP ones, which keep ``requires_grad=True`` (so
they get gradients). Each case trains three steps with a clipping threshold small enough that
clipping acts on every step, and rank 0 writes the final full weights.
"""

from __future__ import annotations

from pathlib import Path

import hf_zero
from hf_zero.initialize import init_distributed
from models import batches, build, make_optimizer

EXCLUDED = "mlp"  # substring of the names left out of the optimizer
CLIP = 0.05


def optimized_groups(model):
    decay = [p for n, p in model.named_parameters() if EXCLUDED not in n and p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if EXCLUDED not in n and p.ndim < 2]
    return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]


def clip_scope(payload, out_dir: Path):
    rank, world = init_distributed()
    from safetensors.torch import save_file

    results = {}
    for stage in payload["stages"]:
        model = build("llama")
        opt = make_optimizer("sgd", optimized_groups(model))
        config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 2,
                  "gradient_clipping": CLIP, "zero_optimization": {"stage": stage}}
        engine, *_ = hf_zero.initialize(model=model, optimizer=opt, config=config)
        norms = []
        for step in batches(3, 2, world):
            for micro in step:
                engine.backward(engine(**micro[rank]).loss)
                engine.step()
            norms.append(float(engine.get_global_grad_norm()))
        sd = engine.full_state_dict()
        if rank == 0:
            save_file({k: v.clone() for k, v in sd.items()}, str(out_dir / f"stage{stage}.safetensors"))
        results[str(stage)] = norms
        engine.destroy()
    return results
