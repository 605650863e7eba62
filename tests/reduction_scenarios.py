"""Launched processes for tests/test_reduction.py: the call patterns the reduction rule must get
right (a unit used twice, two forwards before one backward, several backward() calls before one
step(), ranks that run different units), and the same patterns on one process, unsharded, as
the reference.

A case is a dict: ``model`` ("reuse": :class:`ReuseNet`, or a tests/models.py name), ``stage``,
``pattern`` (see :func:`micro_losses`), ``accum``, optional ``plan`` (the blocks ReuseNet runs,
in order), ``skip_on`` (a rank that leaves out block 1), ``checkpointing``, ``offload``,
``eager`` (no clipping and ``skip_non_finite_steps: false``, so offload steps units during
backward), ``opt``, ``steps``.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Callable, List

import torch
import torch.nn as nn
import torch.nn.functional as F

from models import VOCAB, batches, build, grouped_params, make_optimizer


class Block(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.fc = nn.Linear(d, d)

    def forward(self, h):
        return h + torch.tanh(self.fc(self.norm(h)))


class ReuseNet(nn.Module):
    """Embedding, three blocks run in the order ``plan`` (a block may come twice: shared
    weights re-run, or not at all), head."""

    _no_split_modules = ["Block"]

    def __init__(self, d: int = 16, layers: int = 3):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, d)
        self.blocks = nn.ModuleList(Block(d) for _ in range(layers))
        self.head = nn.Linear(d, VOCAB, bias=False)

    def forward(self, input_ids, labels=None, plan=(0, 1, 2), outside=False):
        h = self.embed(input_ids)
        if outside:  # the last block's weight used by the root, before any block runs
            h = h + 0.1 * F.linear(h, self.blocks[-1].fc.weight)
        for i in plan:
            h = self.blocks[i](h)
        logits = self.head(h)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1))
        return SimpleNamespace(loss=loss, logits=logits)


def make_model(case: dict) -> nn.Module:
    if case["model"] == "reuse":
        torch.manual_seed(0)
        model = ReuseNet()
    else:
        model = build(case["model"])
    if case.get("checkpointing"):
        model.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": case["checkpointing"] == "reentrant"})
    model.train()
    return model


def plan_for(case: dict, rank: int):
    plan = tuple(case.get("plan", (0, 1, 2)))
    if case.get("skip_on") == rank:
        plan = tuple(i for i in plan if i != 1)
    return plan


def second_batch(batch: dict) -> dict:
    """The other view of a micro-batch in two-forward patterns: the sequence reversed."""
    return {k: torch.flip(v, dims=[1]) for k, v in batch.items()}


def micro_losses(model: Callable, case: dict, batch: dict, rank: int) -> List[torch.Tensor]:
    """The losses one rank backwards for one micro-batch, in order; the sum of the list is what
    it trains on. ``pattern``: "single" one forward; "two_forwards" f(x) + f(x') in one
    backward (R-Drop, contrastive); "two_backwards" both forwards first, then one backward()
    per loss; "interleaved" forward, backward, forward, backward."""
    kw = {"plan": plan_for(case, rank), "outside": bool(case.get("outside"))} if case["model"] == "reuse" else {}
    pattern = case.get("pattern", "single")
    if pattern == "single":
        return [model(**batch, **kw).loss]
    if pattern == "two_forwards":
        return [model(**batch, **kw).loss + model(**second_batch(batch), **kw).loss]
    if pattern == "two_backwards":
        return [model(**batch, **kw).loss, model(**second_batch(batch), **kw).loss]
    if pattern == "retain":  # the same graph twice: backward(retain_graph=True), then backward
        loss = model(**batch, **kw).loss
        return [loss, loss]
    if pattern == "interleaved":  # the second forward runs when it is asked for
        return [lambda: model(**batch, **kw).loss, lambda: model(**second_batch(batch), **kw).loss]
    raise ValueError(pattern)


def engine_config(case: dict) -> dict:
    zo = {"stage": case["stage"]}
    cfg = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": case.get("accum", 2),
           "gradient_clipping": 0.0 if case.get("eager") else case.get("clip", 0.5), "zero_optimization": zo}
    if case.get("offload"):
        zo["offload_optimizer"] = {"device": case["offload"]}
    if case.get("eager"):
        cfg["hf_zero"] = {"skip_non_finite_steps": False}
    return cfg


def train(case: dict, rank: int, world: int, raise_at: int = -1):
    """Train ``case``; returns (engine, mean loss per step, steps whose update ran eagerly)."""
    import hf_zero

    model = make_model(case)
    opt = make_optimizer(case.get("opt", "sgd"), grouped_params(model))
    engine, _, _, _ = hf_zero.initialize(model=model, optimizer=opt, config=engine_config(case))
    data = batches(case.get("steps", 3), case.get("accum", 2), world)
    losses, eager_steps, late, early = [], [], set(), []
    for s, step in enumerate(data):
        total = 0.0
        for micro in step:
            todo = micro_losses(engine, case, micro[rank], rank)
            for i, loss in enumerate(todo):
                loss = loss() if callable(loss) else loss
                engine.backward(loss, retain_graph=retained(case, i, todo))
                total += loss.item()
                late.update(u.name for u in engine.runtime.last_late)
                early.append(engine.runtime.reduced_early)
            if engine._eager_submitted:
                eager_steps.append(s)
            engine.step()
        losses.append(total / len(step))
    return engine, losses, {"eager_steps": eager_steps, "late": sorted(late), "early": early}


def retained(case: dict, i: int, todo: list) -> bool:
    return case.get("pattern") == "retain" and i < len(todo) - 1


def reduction(payload, out_dir: Path):
    """Train every case; rank 0 writes the final full weights."""
    from safetensors.torch import save_file

    from hf_zero.initialize import init_distributed
    from scenarios import case_id

    rank, world = init_distributed()
    results = {}
    for case in payload["cases"]:
        key = case_id(case)
        try:
            engine, losses, seen = train(case, rank, world)
        except Exception as exc:  # reported, and the test decides whether it was expected
            results[key] = {"error": f"{type(exc).__name__}: {exc}"}
            if not case.get("expect_error"):
                raise
            continue
        sd = engine.full_state_dict()
        if rank == 0:
            save_file({k: v.clone() for k, v in sd.items()}, str(out_dir / f"{key}.safetensors"))
        results[key] = {"losses": losses, "steps": engine.global_steps, **seen}
        engine.destroy()
    return results


def stage3_rank_dependent(payload, out_dir: Path):
    """Stage 3, rank 0 leaves out block 1: the error every rank raises (never a hang, never
    wrong weights)."""
    from hf_zero.initialize import init_distributed

    rank, world = init_distributed()
    case = dict(model="reuse", stage=3, skip_on=0, plan=payload.get("plan", [0, 1, 2]))
    try:
        train(case, rank, world)
    except RuntimeError as exc:
        return {"error": str(exc)}
    return {"error": None}


def eager_then_two_backwards(payload, out_dir: Path):
    """Offload with the eager step trusted (single backward() at the first boundaries), then a
    second backward() at a boundary: a clear error, on every rank."""
    import hf_zero
    from hf_zero.initialize import init_distributed

    rank, world = init_distributed()
    case = dict(model="reuse", stage=payload["stage"], accum=1, offload="cpu", eager=True)
    model = make_model(case)
    engine, _, _, _ = hf_zero.initialize(model=model, optimizer=make_optimizer("sgd", grouped_params(model)),
                                         config=engine_config(case))
    data = batches(3, 1, world)
    for s, step in enumerate(data):
        batch = step[0][rank]
        engine.backward(engine(**batch).loss)
        if s == 2:
            try:
                engine.backward(engine(**second_batch(batch)).loss)
            except RuntimeError as exc:
                return {"error": str(exc), "eager": sorted(engine._eager_submitted)}
            return {"error": None}
        engine.step()
    return {"error": None}


def reference(case: dict, world: int):
    """The unsharded single-process run of ``case`` on the same global batches: every rank's
    micro-batch with that rank's plan, each loss divided by (accum x world)."""
    model = make_model(case)
    opt = make_optimizer(case.get("opt", "sgd"), grouped_params(model))
    trainable = [p for p in model.parameters() if p.requires_grad]
    clip = 0.0 if case.get("eager") else case.get("clip", 0.5)
    accum = case.get("accum", 2)
    losses = []
    for step in batches(case.get("steps", 3), accum, world):
        total = 0.0
        for micro in step:
            for r, batch in enumerate(micro):
                todo = micro_losses(model, case, batch, r)
                for i, loss in enumerate(todo):
                    loss = loss() if callable(loss) else loss
                    (loss / (accum * world)).backward(retain_graph=retained(case, i, todo))
                    total += loss.item() / (accum * world)
        for p in trainable:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        if clip:
            torch.nn.utils.clip_grad_norm_(trainable, clip)
        opt.step()
        opt.zero_grad()
        losses.append(total)
    return model, losses


def order_check_cost(payload, out_dir: Path):
    """One stage-3 step of the tiny Llama with ``hf_zero.check_unit_order`` on and off: the
    control bytes each sends and how many unit checks ran."""
    import hf_zero
    from hf_zero.initialize import init_distributed

    rank, world = init_distributed()
    out = {}
    for check in (True, False):
        model = build("llama")
        cfg = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
               "zero_optimization": {"stage": 3}, "hf_zero": {"check_unit_order": check}}
        engine, _, _, _ = hf_zero.initialize(model=model, optimizer=make_optimizer("sgd", model.parameters()),
                                             config=cfg)
        calls = []
        agree = engine.runtime._agree_on_unit
        engine.runtime._agree_on_unit = lambda unit: (calls.append(unit.name) if engine.runtime.check_unit_order
                                                      else None, agree(unit))
        batch = batches(1, 1, world)[0][0][rank]
        engine.backward(engine(**batch).loss)
        engine.step()
        out[str(check)] = {"control": engine.memory_report()["comm_bytes_last_step"]["control"], "checks": len(calls)}
        engine.destroy()
    return out
