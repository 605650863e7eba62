"""Launched side of tests/test_fragments.py: the tensor-fragment functions inside a training run.

Per case (accumulation 2, three steps, the llama of tests/models.py):
    * after the last backward of step 2, before its ``step``: every parameter's full gradient;
    * after step 2: every parameter's full fp32 weight and Adam's ``exp_avg`` / ``exp_avg_sq``,
      and this rank's fragments of each (with ``local_range``);
    * then the setters: the fp32 weight of ``SET_WEIGHT``, ``exp_avg`` of ``SET_STATE``, and
      during step 3 the gradient of ``SET_GRAD`` are set to fixed values, and step 3 runs.
The test compares all of it with an unsharded run that does the same to plain tensors.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

import hf_zero
from hf_zero.initialize import init_distributed
from models import batches, build, grouped_params, make_optimizer
from scenarios import case_id, engine_config

SET_WEIGHT = "model.layers.0.self_attn.q_proj.weight"
SET_STATE = "model.layers.1.mlp.up_proj.weight"
SET_GRAD = "model.norm.weight"


def set_values(name: str, shape) -> torch.Tensor:
    """The fixed values the setters write (the same on every rank and in the reference)."""
    g = torch.Generator().manual_seed(len(name))
    return torch.randn(shape, generator=g) * 0.02


def fragments(payload, out_dir: Path):
    rank, world = init_distributed()
    from hf_zero.engine import fragments as fr

    for case in payload["cases"]:
        model = build("llama")
        if case.get("freeze"):
            for n, p in model.named_parameters():
                if case["freeze"] in n:
                    p.requires_grad_(False)
        opt = make_optimizer("adamw", grouped_params(model))
        engine, _, _, _ = hf_zero.initialize(model=model, optimizer=opt, config=engine_config(case, world))
        named = dict(engine.module.named_parameters())
        data = batches(3, 2, world)
        full, local = {}, {}
        for s, step in enumerate(data):
            for m, micro in enumerate(step):
                engine.backward(engine(**micro[rank]).loss)
                last = m == len(step) - 1
                if last and s == 1:
                    for n, p in named.items():
                        g = hf_zero.safe_get_full_grad(p)
                        if g is not None:
                            full[f"{n}.grad"] = g.cpu().clone()
                        if engine.stage >= 2 and g is not None:
                            local[f"{n}.grad"] = fr.safe_get_local_grad(p).cpu().clone()
                if last and s == 2 and SET_GRAD in named:
                    hf_zero.safe_set_full_grad(named[SET_GRAD], set_values(SET_GRAD, named[SET_GRAD].shape))
                engine.step()
            if s == 1:
                for n, p in named.items():
                    for key, value in (("fp32", hf_zero.safe_get_full_fp32_param(p)),
                                       ("exp_avg", hf_zero.safe_get_full_optimizer_state(p, "exp_avg")),
                                       ("exp_avg_sq", hf_zero.safe_get_full_optimizer_state(p, "exp_avg_sq"))):
                        if value is not None:
                            full[f"{n}.{key}"] = value.cpu().clone()
                    frag = fr.safe_get_local_fp32_param(p)
                    if frag is not None:
                        start, end = fr.local_range(p)
                        local[f"{n}.fp32"] = frag.cpu().clone()
                        local[f"{n}.exp_avg"] = fr.safe_get_local_optimizer_state(p, "exp_avg").cpu().clone()
                        local[f"{n}.range"] = torch.tensor([start, end])
                hf_zero.safe_set_full_fp32_param(named[SET_WEIGHT], set_values(SET_WEIGHT, named[SET_WEIGHT].shape))
                hf_zero.safe_set_full_optimizer_state(named[SET_STATE], torch.zeros(named[SET_STATE].shape), "exp_avg")
                # the setter's value is what the getter returns, and the model computes with it
                back = hf_zero.safe_get_full_fp32_param(named[SET_WEIGHT])
                assert torch.equal(back.cpu(), set_values(SET_WEIGHT, back.shape)), "fp32 weight not set"
                with hf_zero.gathered_parameters(named[SET_WEIGHT]):
                    used = named[SET_WEIGHT].detach().float().cpu().clone()
                assert torch.equal(used, set_values(SET_WEIGHT, used.shape).to(named[SET_WEIGHT].dtype).float()), \
                    "the model's weight does not follow the fp32 weight"
        final = engine.full_state_dict()
        tag = case_id(case)
        if rank == 0:
            save_file(full, str(out_dir / f"{tag}.full.safetensors"))
            save_file({k: v.clone() for k, v in final.items()}, str(out_dir / f"{tag}.final.safetensors"))
        save_file(local, str(out_dir / f"{tag}.local{rank}.safetensors"))
        engine.destroy()
    return {"ok": True}
