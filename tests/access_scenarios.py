"""Launched processes for tests/test_access.py: stage-3 parameter access outside the unit's own
forward, ``hf_zero.gathered_parameters``, an inference-only engine next to a trained one, and
``engine.generate``'s two gather paths. The test module computes every reference itself, on one
process, unsharded, with the same models, data and changes.

Each part of :func:`run` returns JSON; tensors too large for JSON (final weights, logits) are
written by the rank that owns them as safetensors into the output folder.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Dict

import torch
import torch.nn as nn
import torch.nn.functional as F

import hf_zero
from hf_zero.initialize import init_distributed
from models import VOCAB, batches, build, grouped_params, make_optimizer
from scenarios import run_steps

STEPS, ACCUM = 2, 2
#: the parameter each "outside" probe reads (a layer unit's) and a root one
PROBES = ("blocks.1.fc.weight", "head.weight")


class SelfBlock(nn.Module):
    """A layer that returns its own parameter (``scale``) next to its output."""

    def __init__(self, d: int):
        super().__init__()
        self.fc = nn.Linear(d, d)
        self.scale = nn.Parameter(1.0 + 0.1 * torch.randn(d))

    def forward(self, h):
        return h + torch.tanh(self.fc(h)), self.scale


class AccessNet(nn.Module):
    """Embedding, three :class:`SelfBlock` units, head. The parent multiplies by the parameter
    each block returned, and uses block 0's weight after block 0 ran (and was released)."""

    _no_split_modules = ["SelfBlock"]

    def __init__(self, d: int = 16, layers: int = 3):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, d)
        self.blocks = nn.ModuleList(SelfBlock(d) for _ in range(layers))
        self.head = nn.Linear(d, VOCAB, bias=False)

    def forward(self, input_ids, labels=None):
        h = self.embed(input_ids)
        for block in self.blocks:
            h, scale = block(h)
            h = h * scale
        h = h + 0.1 * F.linear(h, self.blocks[0].fc.weight)  # a child unit's weight, after it ran
        logits = self.head(h)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1))
        return SimpleNamespace(loss=loss, logits=logits)


def build_access(seed: int = 0) -> AccessNet:
    torch.manual_seed(seed)
    return AccessNet()


@torch.no_grad()
def apply_change(model: nn.Module) -> None:
    """The modification rank 0 makes inside ``gathered_parameters(modifier_rank=0)`` (and the
    reference makes before training): a layer unit's weight halved, a root row zeroed."""
    model.blocks[1].fc.weight.mul_(0.5)
    model.embed.weight[3].zero_()


def config(stage: int, extra: Dict = None, train: bool = True) -> dict:
    cfg = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": ACCUM,
           "zero_optimization": {"stage": stage, **(extra or {})}}
    if not train:
        cfg.pop("gradient_accumulation_steps")
    return cfg


def placement(name: str, nvme: str) -> Dict:
    """zero_optimization keys for where parameters and the fp32 master live."""
    if name == "ram":
        return {}
    if name == "cpu_optimizer":
        return {"offload_optimizer": {"device": "cpu"}}
    if name == "nvme":
        return {"offload_optimizer": {"device": "nvme", "nvme_path": nvme},
                "offload_param": {"device": "nvme", "nvme_path": nvme}}
    raise ValueError(name)


def probe(param) -> Dict:
    """Use ``param``'s values outside any gather: what happens (never a crash)."""
    try:
        float(param.sum())
    except hf_zero.ShardedParameterError as e:
        return {"raised": "ShardedParameterError", "message": str(e)}
    except Exception as e:  # noqa: BLE001 - the test names what was raised instead
        return {"raised": type(e).__name__, "message": str(e)}
    return {"raised": None, "message": ""}


def other_uses(param) -> Dict[str, str]:
    """More ways of reading values outside a gather; each must raise the clear error."""
    uses = {
        "clone": lambda: param.clone(),
        "index": lambda: param[0],
        "tolist": lambda: param.tolist(),
        "repr": lambda: repr(param),
        "add": lambda: param + 1,
        "torch.matmul": lambda: torch.matmul(param, param),
        "detach": lambda: param.detach(),
        "state_dict": lambda: param_owner_state_dict(param),
    }
    out = {}
    for name, fn in uses.items():
        try:
            fn()
            out[name] = "ok"
        except hf_zero.ShardedParameterError:
            out[name] = "ShardedParameterError"
        except Exception as e:  # noqa: BLE001
            out[name] = type(e).__name__
    meta = (tuple(param.shape), str(param.dtype), param.numel(), param.requires_grad)
    out["metadata"] = list(map(str, meta))
    return out


_OWNER = {}


def param_owner_state_dict(param):
    return _OWNER[id(param)].state_dict()


def named(model) -> Dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters()}


def save_full(model, path: Path) -> None:
    """Every parameter's full values (collective), written by rank 0."""
    from safetensors.torch import save_file

    with hf_zero.gathered_parameters(model.parameters()):
        values = {n: p.detach().clone() for n, p in model.named_parameters()}
    if torch.distributed.get_rank() == 0:
        save_file(values, str(path))


def train(engine, rank: int, world: int, between=None):
    return run_steps(engine, batches(STEPS, ACCUM, world, rank_skew=False), rank, between)


# ---------------------------------------------------------------------------------------------
def part_outside(rank: int, world: int, out: Path) -> Dict:
    """Item 1: values read between steps raise; inside gathered_parameters they are right; the
    model returns its own parameter and uses a child's weight after it ran."""
    model = build_access()
    engine, *_ = hf_zero.initialize(model=model, optimizer=make_optimizer("sgd", grouped_params(model)),
                                    config=config(3))
    p = named(model)
    _OWNER[id(p[PROBES[0]])] = model.blocks[1]
    res = {"before": {k: probe(p[k]) for k in PROBES}, "uses": other_uses(p[PROBES[0]])}
    between = []
    res["losses"] = train(engine, rank, world, between=lambda: between.append({k: probe(p[k]) for k in PROBES}))
    res["between"] = between
    engine.eval()  # a no-grad forward: the own-parameter output and the on-demand gather again
    with torch.no_grad():
        logits = engine(**batches(1, 1, world, rank_skew=False, seed=9)[0][0][rank]).logits
    engine.train()
    from safetensors.torch import save_file

    save_file({"logits": logits}, str(out / f"eval_logits_w{world}_r{rank}.safetensors"))
    res["after_eval"] = {k: probe(p[k]) for k in PROBES}
    with hf_zero.gathered_parameters(p[PROBES[0]]):
        res["inside_sum"] = float(p[PROBES[0]].sum())
        res["inside_other_unit"] = probe(p["blocks.2.fc.weight"])
    res["after_exit"] = probe(p[PROBES[0]])
    # nested: an outer block over a unit, an inner one over the same unit and over another
    nest = {}
    with hf_zero.gathered_parameters(model.blocks[0].parameters()):
        with hf_zero.gathered_parameters([model.blocks[0].fc.weight, model.blocks[2].fc.weight]):
            nest["inner_b0"] = probe(model.blocks[0].fc.weight)
            nest["inner_b2"] = probe(model.blocks[2].fc.weight)
        nest["outer_b0"] = probe(model.blocks[0].fc.weight)
        nest["outer_b2_after_inner"] = probe(model.blocks[2].fc.weight)
    nest["after_b0"] = probe(model.blocks[0].fc.weight)
    res["nested"] = nest
    save_full(model, out / f"outside_w{world}.safetensors")
    res["after_save"] = probe(p[PROBES[0]])
    res["late_units"] = [u.name for u in engine.runtime.last_late]
    # ranks that enter with different parameters: the same clear error everywhere, no hang
    try:
        with hf_zero.gathered_parameters(model.blocks[0 if rank == 0 else 1].parameters()):
            pass
        res["mismatch"] = "no error"
    except RuntimeError as e:
        res["mismatch"] = str(e)
    with hf_zero.gathered_parameters(model.blocks[1].fc.weight):  # still usable after it
        res["after_mismatch_sum"] = float(model.blocks[1].fc.weight.sum())
    res["pins_left"] = sum(u.pins for u in engine.units)
    engine.destroy()
    return res


def part_modify(rank: int, world: int, out: Path, where: str, nvme: str) -> Dict:
    """Item 3: read the initial values; rank 0 changes two parameters inside a nested
    modifier_rank=0 block (the other ranks make a different change, which must be lost); train."""
    model = build_access()
    stage = 2 if where.startswith("stage2_") else 3
    engine, *_ = hf_zero.initialize(model=model, optimizer=make_optimizer("sgd", grouped_params(model)),
                                    config=config(stage, placement(where[len("stage2_"):] if stage == 2 else where,
                                                                   nvme)))
    res = {}
    from safetensors.torch import save_file

    with hf_zero.gathered_parameters(model):
        initial = {n: q.detach().clone() for n, q in model.named_parameters()}
        with hf_zero.gathered_parameters([model.blocks[1].fc.weight, model.embed.weight], modifier_rank=0):
            if rank == 0:
                apply_change(model)
            else:
                with torch.no_grad():
                    model.blocks[1].fc.weight.add_(100.0)
                    model.embed.weight.add_(100.0)
        # still gathered by the outer block: every rank sees rank 0's change
        changed = {n: q.detach().clone() for n, q in model.named_parameters()}
    save_file(initial, str(out / f"initial_{where}_w{world}_r{rank}.safetensors"))
    save_file(changed, str(out / f"changed_{where}_w{world}_r{rank}.safetensors"))
    res["after_exit"] = probe(model.blocks[1].fc.weight) if stage == 3 else None
    res["losses"] = train(engine, rank, world)
    save_full(model, out / f"modify_{where}_w{world}.safetensors")
    # a replaced .data is refused with a clear error (and nothing is broadcast)
    try:
        with hf_zero.gathered_parameters(model.head.weight, modifier_rank=0):
            model.head.weight.data = torch.zeros_like(model.head.weight)
        res["replaced_data"] = "no error"
    except ValueError as e:
        res["replaced_data"] = str(e)
    try:
        with hf_zero.gathered_parameters(model.head.weight, modifier_rank=world):
            pass
        res["bad_rank"] = "no error"
    except ValueError as e:
        res["bad_rank"] = str(e)
    engine.destroy()
    return res


def part_reference_model(rank: int, world: int, out: Path) -> Dict:
    """Item 2: a frozen stage-3 engine without optimizer beside a trained one (TRL's reference
    model): its logits every micro-step, and the trained engine's losses."""
    from safetensors.torch import save_file

    ref_model = build("llama", seed=5)
    ref, *_ = hf_zero.initialize(model=ref_model, config=config(3, train=False))
    model = build("llama")
    engine, *_ = hf_zero.initialize(model=model, optimizer=make_optimizer("sgd", grouped_params(model)),
                                    config=config(3))
    res = {"ref_inference_only": ref.inference_only, "ref_optimizer": ref.optimizer is None,
           "ref_frozen": not any(q.requires_grad for q in ref_model.parameters())}
    logits, losses = {}, []
    for s, step in enumerate(batches(STEPS, ACCUM, world, rank_skew=False)):
        total = 0.0
        for m, micro in enumerate(step):
            with torch.no_grad():
                ref_logits = ref(**micro[rank]).logits
            logits[f"s{s}m{m}"] = ref_logits.clone()
            out_ = engine(**micro[rank])
            loss = out_.loss + 0.1 * F.mse_loss(out_.logits, ref_logits)
            engine.backward(loss)
            engine.step()
            total += loss.item()
        losses.append(total / len(step))
    res["losses"] = losses
    save_file(logits, str(out / f"ref_logits_w{world}_r{rank}.safetensors"))
    try:
        ref.backward(ref(**micro[rank]).logits.sum())
        res["ref_backward"] = "no error"
    except RuntimeError as e:
        res["ref_backward"] = str(e)
    res["ref_probe"] = probe(ref_model.model.layers[0].mlp.up_proj.weight)
    save_full(model, out / f"trained_w{world}.safetensors")
    engine.destroy()
    ref.destroy()
    return res


@torch.no_grad()
def change_head(model) -> None:
    """Rank 0's change to the generation model's head (a reversed row order)."""
    model.lm_head.weight.copy_(model.lm_head.weight.flip(0))


def prompt_of(rank: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(100 + rank)
    return torch.randint(3, VOCAB, (1, 4 + 2 * rank), generator=g)


GEN_KW = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False)


def part_generate(rank: int, world: int, out: Path) -> Dict:
    """Item 4: stage-3 generate, both paths and the automatic choice, prompts of a different
    length on each rank."""
    model = build("llama", seed=7)
    engine, *_ = hf_zero.initialize(model=model, config=config(3, train=False))
    res = {"prompt": prompt_of(rank).tolist()}
    for path in ("full", "per_unit", "auto"):
        tokens = engine.generate(prompt_of(rank), gather=path, **GEN_KW)
        res[path] = tokens.tolist()
        res[f"{path}_path"] = engine.last_generate_path
        res[f"{path}_after"] = probe(model.model.layers[0].mlp.up_proj.weight)
    # ranks that stop at different lengths: per unit they stay in step (synced_gpus), gathered
    # once they need not
    own = dict(GEN_KW, max_new_tokens=3 + 3 * rank, min_new_tokens=None)
    res["ragged_full"] = engine.generate(prompt_of(rank), gather="full", **own).tolist()
    res["ragged_per_unit"] = engine.generate(prompt_of(rank), gather="per_unit", **own).tolist()
    # gather="auto" when one rank measures no room: every rank takes the per-unit path
    import hf_zero.engine.gather as gather_mod

    kept = gather_mod.FULL_GATHER_MEMORY_FRACTION
    gather_mod.FULL_GATHER_MEMORY_FRACTION = 0.0 if rank == world - 1 else kept
    try:
        res["tight"] = engine.generate(prompt_of(rank), **GEN_KW).tolist()
        res["tight_path"] = engine.last_generate_path
    finally:
        gather_mod.FULL_GATHER_MEMORY_FRACTION = kept
    # an inference-only engine's weights changed on rank 0 (weights pushed to a generation model)
    with hf_zero.gathered_parameters(model.lm_head.weight, modifier_rank=0):
        if rank == 0:
            change_head(model)
    res["changed_full"] = engine.generate(prompt_of(rank), gather="full", **GEN_KW).tolist()
    res["changed_per_unit"] = engine.generate(prompt_of(rank), gather="per_unit", **GEN_KW).tolist()
    try:  # an error inside a gather-once generate: the model is sharded and guarded again after it
        engine.generate(prompt_of(rank), gather="full", not_a_generate_argument=1, **GEN_KW)
        res["error_inside"] = "no error"
    except ValueError as e:
        res["error_inside"] = str(e)
    res["after_error"] = probe(model.model.layers[0].mlp.up_proj.weight)
    res["class_after_error"] = type(model.model.layers[0].mlp.up_proj.weight).__name__
    try:
        engine.generate(prompt_of(rank), gather="everything", **GEN_KW)
        res["bad_gather"] = "no error"
    except ValueError as e:
        res["bad_gather"] = str(e)
    engine.destroy()
    return res


def part_generate_nvme(rank: int, world: int, out: Path, nvme: str) -> Dict:
    """Item 4 with the shards of an inference-only engine in NVMe swap files."""
    model = build("llama", seed=7)
    engine, *_ = hf_zero.initialize(model=model, config=config(
        3, {"offload_param": {"device": "nvme", "nvme_path": nvme}}, train=False))
    res = {path: engine.generate(prompt_of(rank), gather=path, **GEN_KW).tolist() for path in ("full", "per_unit")}
    res["after"] = probe(model.model.layers[0].mlp.up_proj.weight)
    engine.destroy()
    return res


def run(payload, out_dir: Path):
    rank, world = init_distributed()
    out = Path(out_dir)
    res = {}
    for part in payload["parts"]:
        if part == "outside":
            res[part] = part_outside(rank, world, out)
        elif part.startswith("modify_"):
            res[part] = part_modify(rank, world, out, part[len("modify_"):], payload["nvme"])
        elif part == "reference_model":
            res[part] = part_reference_model(rank, world, out)
        elif part == "generate_nvme":
            res[part] = part_generate_nvme(rank, world, out, payload["nvme"])
        elif part == "generate":
            res[part] = part_generate(rank, world, out)
        else:
            raise ValueError(part)
    return res
