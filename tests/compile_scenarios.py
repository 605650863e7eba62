"""torch.compile scenarios for tests/test_compile.py, run in launched processes (tests/launch.py)
or, for the references, in the test process.

How the model gets compiled (``how``), each the way users write it:
    * ``wrap``: ``model = torch.compile(model)`` before ``hf_zero.initialize(model=model)``;
    * ``inplace``: ``model.compile()`` (``nn.Module.compile``, in place) before initialize;
    * ``module``: ``engine.module.compile()`` after initialize;
    * ``engine``: ``engine.compile(backend=...)`` (DeepSpeed's ``engine.compile``).

Graph breaks are read from ``torch._dynamo.utils.counters`` (reset before every case): the number
of break events, their reasons (addresses stripped) and the number of graphs compiled, after the
first optimizer step and at the end (a difference is a recompilation in steady state).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from models import batches, build, grouped_params, make_optimizer, reference_run
from scenarios import run_steps

#: the reason hf_zero's unit hooks carry (hf_zero/engine/stages.py, ``_eager``)
HOOK_REASON = "hf_zero unit hooks run eagerly"


def compile_counters() -> dict:
    from torch._dynamo.utils import counters

    reasons = {}
    for text, n in counters["graph_break"].items():
        key = re.sub(r" at 0x[0-9a-f]+", "", text.splitlines()[0] + " | " + " ".join(text.split())[:400])
        reasons[key] = reasons.get(key, 0) + n
    return {"breaks": sum(counters["graph_break"].values()), "reasons": reasons,
            "graphs": int(counters["stats"].get("unique_graphs", 0))}


def reset_compile() -> None:
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()


def config(stage: int, accum: int = 2, clip: float = 0.5) -> dict:
    return {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": accum,
            "gradient_clipping": clip, "zero_optimization": {"stage": stage}}


def engine_case(case: dict, rank: int, world: int):
    """Build, compile as ``case["how"]`` says, train; returns (engine, losses, counters after
    step 1, counters at the end)."""
    import hf_zero

    backend = case["backend"]
    model = build("llama")
    if case["how"] == "wrap":
        model = torch.compile(model, backend=backend)
    elif case["how"] == "inplace":
        model.compile(backend=backend)
    opt = make_optimizer(case["opt"], grouped_params(model))
    engine, *_ = hf_zero.initialize(model=model, optimizer=opt, config=config(case["stage"]))
    if case["how"] == "module":
        engine.module.compile(backend=backend)
    elif case["how"] == "engine":
        engine.compile(backend=backend)
    seen = []  # the counters after every optimizer step
    losses = run_steps(engine, batches(case.get("steps", 3), 2, world), rank,
                       between=lambda: seen.append(compile_counters()))
    return engine, losses, seen[0], compile_counters()


def case_name(case: dict) -> str:
    return f"stage{case['stage']}-{case['how']}-{case['opt']}-{case['backend']}"


def compile_parity(payload, out_dir: Path):
    """Train every case; rank 0 writes the final full fp32 weights."""
    from safetensors.torch import save_file

    from hf_zero.initialize import init_distributed

    rank, world = init_distributed()
    results = {}
    for case in payload["cases"]:
        reset_compile()
        engine, losses, first, last = engine_case(case, rank, world)
        sd = engine.full_state_dict()
        if rank == 0:
            save_file({k: v.contiguous() for k, v in sd.items()}, str(out_dir / f"{case_name(case)}.safetensors"))
        results[case_name(case)] = {"losses": losses, "steps": engine.global_steps, "first": first, "last": last,
                                    "is_compiled": engine.is_compiled, "keys": sorted(sd)}
        engine.destroy()
    reset_compile()  # compiled code holds the hooks (and through them the process group)
    return results


def unsharded_run(opt_kind: str, world: int, backend=None, steps: int = 3, clip: float = 0.5):
    """The single-process run on the same global batches as ``engine_case`` (tests/models.py's
    reference loop), eager or compiled with ``backend``; returns (model, losses, counters)."""
    reset_compile()
    wrap = None if backend is None else (lambda m: torch.compile(m, backend=backend))
    model, losses = reference_run("llama", opt_kind, batches(steps, 2, world), clip, wrap=wrap)
    counters = compile_counters()
    reset_compile()
    return model, losses, counters


# ---------------------------------------------------------------------------------- Trainer
def trainer_compile(payload, out_dir: Path):
    """``ZeroTrainer`` with ``torch_compile=True`` (the Trainer hands the model to Accelerate,
    which compiles it in ``prepare``); rank 0 writes the final weights."""
    from safetensors.torch import save_file

    import hf_zero
    import integration_scenarios as S

    out = {}
    for case in payload["cases"]:
        reset_compile()
        name = case["name"]
        extra = {}
        if case.get("backend"):
            extra = dict(torch_compile=True, torch_compile_backend=case["backend"])
        args = hf_zero.ZeroTrainingArguments(zero_config=S.zero_cfg(case["stage"]),
                                             **S.trainer_kwargs(out_dir / name, 2, **extra))
        trainer = S.sequential(hf_zero.ZeroTrainer)(model=build("llama"), args=args,
                                                    train_dataset=S.trainer_dataset())
        trainer.train()
        engine = trainer.zero_engine
        sd = engine.full_state_dict()
        if engine.rank == 0:
            save_file({k: v.contiguous() for k, v in sd.items()}, str(out_dir / f"{name}.safetensors"))
        out[name] = {"losses": S.logged_losses(trainer), "stage": engine.stage, "is_compiled": engine.is_compiled,
                     "grad_norms": [h["grad_norm"] for h in trainer.state.log_history if "grad_norm" in h],
                     "counters": compile_counters(), "keys": sorted(sd)}
        trainer.accelerator.free_memory()
    reset_compile()
    return out


def plain_trainer(out_dir: Path, backend=None):
    """The one-process reference: a stock ``transformers.Trainer`` with the same global batch,
    eager or with ``torch_compile=True``; returns (model, losses, grad norms)."""
    from transformers import Trainer, TrainingArguments

    import integration_scenarios as S

    reset_compile()
    extra = dict(torch_compile=True, torch_compile_backend=backend) if backend else {}
    model = build("llama")
    trainer = S.sequential(Trainer)(model=model, train_dataset=S.trainer_dataset(),
                                    args=TrainingArguments(**S.trainer_kwargs(out_dir, 4, **extra)))
    trainer.train()
    norms = [h["grad_norm"] for h in trainer.state.log_history if "grad_norm" in h]
    reset_compile()
    return model, S.logged_losses(trainer), norms
