"""Launched processes for tests/test_overlap.py: when stage 1-2 communication is issued, and what
a reader sees while the post-step all-gathers are still in flight."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

import hf_zero
from hf_zero.engine.collectives import Collectives
from hf_zero.engine.pending import PendingParameter
from hf_zero.engine.stages import in_backward
from hf_zero.initialize import init_distributed
from models import batches, build, grouped_params, make_optimizer

STEPS = 3
PROBE = "model.layers.1.mlp.down_proj.weight"  # a layer's weight, read directly after step()


class Recorder:
    """Counts the reduce-scatters issued, in backward or not, by patching Collectives."""

    def __init__(self):
        self.total = 0
        self.in_backward = 0
        self._orig = Collectives.reduce_scatter
        rec = self

        def reduce_scatter(comm, out, full, async_op=False):
            rec.total += 1
            rec.in_backward += int(in_backward())
            return rec._orig(comm, out, full, async_op=async_op)

        Collectives.reduce_scatter = reduce_scatter

    def close(self):
        Collectives.reduce_scatter = self._orig


def train_and_read(stage: int, accum: int, rank: int, world: int, compiled: bool = False) -> dict:
    model = build("llama")
    opt = make_optimizer("sgd", grouped_params(model))
    cfg = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": accum, "gradient_clipping": 0.0,
           "zero_optimization": {"stage": stage}}
    engine, _, _, _ = hf_zero.initialize(model=model, optimizer=opt, config=cfg)
    data = batches(STEPS, accum, world)
    probe = dict(model.named_parameters())[PROBE]
    # the embedding's gradient is the last one of a backward: how many reduce-scatters were
    # issued by then shows whether the layers' reductions overlapped backward
    issued_before_end = []
    rec = Recorder()
    model.model.embed_tokens.weight.register_post_accumulate_grad_hook(
        lambda p: issued_before_end.append(rec.total - start[0]))
    start = [0]
    out = {"micro": [], "after_step": [], "units": len(engine.units)}
    try:
        for s, step in enumerate(data):
            for m, micro in enumerate(step):
                start[0], in_bw0 = rec.total, rec.in_backward
                loss = engine(**micro[rank]).loss
                engine.backward(loss)
                out["micro"].append({"boundary": m == accum - 1, "before_end": issued_before_end[-1],
                                     "issued": rec.total - start[0], "in_backward": rec.in_backward - in_bw0,
                                     "reduced_early": engine.runtime.reduced_early})
                engine.step()
            # right after the update: the all-gathers may be in flight; every read must wait
            entry = {"pending": type(probe) is PendingParameter,
                     "pending_units": sum(engine.post_gathers.is_pending(u) for u in engine.units)}
            if s == 0:
                entry["probe"] = probe.detach().clone()  # a plain read of one layer's weight
            elif s == 1:
                entry["state_dict"] = {k: v.clone() for k, v in model.state_dict().items()}
            else:
                with torch.no_grad():  # an eval forward, before any other access
                    engine.eval()
                    entry["eval_loss"] = float(engine(**data[0][0][0]).loss)
                    engine.train()
            entry["plain_after"] = type(probe) is nn.Parameter
            out["after_step"].append(entry)
    finally:
        rec.close()
    out["final"] = engine.full_state_dict()
    engine.destroy()
    return out


def run(payload, out_dir: Path):
    from safetensors.torch import save_file

    rank, world = init_distributed()
    results = {}
    for case in payload["cases"]:
        key = f"stage{case['stage']}-accum{case['accum']}"
        got = train_and_read(case["stage"], case["accum"], rank, world)
        after = got["after_step"]
        if rank == 0:
            tensors = {"probe": after[0]["probe"]}
            tensors.update({f"state_dict.{k}": v for k, v in after[1]["state_dict"].items()})
            tensors.update({f"final.{k}": v for k, v in got["final"].items()})
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(out_dir / f"{key}.safetensors"))
        results[key] = {"micro": got["micro"], "eval_loss": after[2]["eval_loss"], "units": got["units"],
                        "after_step": [{k: v for k, v in e.items() if isinstance(v, (bool, int))} for e in after]}
    return results
