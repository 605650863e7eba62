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
from scenarios import engine_config, run_steps

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


def config(case: dict, world: int) -> dict:
    """tests/scenarios.py's engine config (``dtype``, ``offload`` there), accumulation 2, clip 0.5;
    fp16 with ``initial_scale_power`` 8 (dynamic loss scale)."""
    return engine_config({"accum": 2, "clip": 0.5, **case}, world)


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
    engine, *_ = hf_zero.initialize(model=model, optimizer=opt, config=config(case, world))
    if case["how"] == "module":
        engine.module.compile(backend=backend)
    elif case["how"] == "engine":
        engine.compile(backend=backend)
    seen = []  # after every optimizer step: the counters, the loss scale, the steps skipped
    poison = None
    if case.get("overflow_step") is not None:
        poison = _poison_on_rank0(engine, case["overflow_step"], rank, lambda: len(seen))
    losses = run_steps(engine, batches(case.get("steps", 3), 2, world), rank,
                       between=lambda: seen.append((compile_counters(), engine.loss_scale, engine.skipped_steps)))
    if poison is not None:
        poison.remove()
    engine.step_record = [{"loss_scale": sc, "skipped": sk} for _, sc, sk in seen]
    return engine, losses, seen[0][0], compile_counters()


def _poison_on_rank0(engine, bad_step, rank: int, step_now):
    """An inf in one gradient element on rank 0 only during optimizer step ``bad_step`` (every
    micro-step of it), as tests/scenarios.py:fp16_overflow does."""
    victim = engine.module.model.layers[0].mlp.down_proj.weight

    def hook(grad):
        if rank == 0 and step_now() == bad_step:
            grad = grad.clone()
            grad.view(-1)[0] = float("inf")
        return grad

    return victim.register_hook(hook)


def case_name(case: dict) -> str:
    extra = "".join(f"-{k}={case[k]}" for k in ("dtype", "offload", "overflow_step") if case.get(k) is not None)
    return f"stage{case['stage']}-{case['how']}-{case['opt']}-{case['backend']}{extra}"


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
                                    "record": engine.step_record, "skipped": engine.skipped_steps,
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


def compiled_autograd(payload, out_dir: Path):
    """``engine.backward`` inside ``torch._dynamo.compiled_autograd._enable``: the engine refuses
    with its message; the same engine then trains on (eagerly run backwards) and must end where a
    fresh engine that never saw the refused call ends (same losses, same weights)."""
    import hf_zero
    from hf_zero.initialize import init_distributed

    rank, world = init_distributed()
    out = {}
    for stage in payload["stages"]:
        runs = {}
        for refused in (True, False):
            reset_compile()
            model = torch.compile(build("llama"), backend="aot_eager")
            engine, *_ = hf_zero.initialize(model=model, optimizer=make_optimizer("sgd", grouped_params(model)),
                                            config=config({"stage": stage, "accum": 1}, world))
            data = batches(2, 1, world)
            error = None
            if refused:
                loss = engine(**data[0][0][rank]).loss
                try:
                    with torch._dynamo.compiled_autograd._enable(torch.compile(backend="aot_eager")):
                        engine.backward(loss)
                except RuntimeError as exc:
                    error = str(exc)
                del loss
            losses = run_steps(engine, data, rank)
            runs[refused] = {"error": error, "losses": losses, "steps": engine.global_steps,
                             "weights": {k: v.clone() for k, v in engine.full_state_dict().items()}}
            engine.destroy()
        same = all(torch.equal(runs[True]["weights"][k], v) for k, v in runs[False]["weights"].items())
        out[str(stage)] = {"error": runs[True]["error"], "losses": runs[True]["losses"],
                           "fresh_losses": runs[False]["losses"], "steps": runs[True]["steps"], "same_weights": same}
    reset_compile()
    return out


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
