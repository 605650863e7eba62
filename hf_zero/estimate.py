"""Memory estimator and planner behind ``hf-zero estimate`` and ``hf-zero plan``.

Note:
    * Model states come from :func:`hf_zero.memory.model_state_bytes` (the ZeRO paper's
      accounting, asserted against the engine's measured tensors by the tests); this module only
      adds what the formulas leave out: frozen parameters (LoRA), the units that are live at once
      (full gradient buffers at stages 2-3, gathered parameters at stage 3), where offload puts
      each state, and an activation estimate.
    * A model's shape is measured, not guessed: the architecture is instantiated on the meta
      device (no memory, no download) and its parameters are counted, tied weights once. The
      units are the engine's own (:func:`hf_zero.engine.units.find_layer_modules`).
    * Activations are an estimate with stated assumptions (:class:`ActivationSpec`,
      :func:`activation_bytes`); docs/estimate.md gives the formula and what it leaves out.
    * Sizes are in bytes; the printed tables use GB = 1e9 bytes (the ZeRO paper's unit).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

from .memory import model_state_bytes

GB = 1e9

#: Fraction of a GPU's memory the planner lets a setup use; the rest is left for the CUDA
#: context, the caching allocator's fragmentation and communication buffers.
GPU_USABLE_FRACTION = 0.9

_DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}


class EstimateError(ValueError):
    """A model / config that cannot be estimated, with what to do instead."""


# ----------------------------------------------------------------------------- model shape
@dataclass(frozen=True)
class ModelShape:
    """What the estimator needs to know about a model (counts of parameters)."""

    name: str
    num_params: int                 # unique parameters (tied weights once)
    trainable_params: int           # = num_params for a full fine-tune; the adapters for LoRA
    layer_params: int               # largest repeated block (decoder layer)
    root_params: int                # everything outside the layers: embeddings, final norm, head
    num_layers: int = 0
    hidden_size: int = 0
    intermediate_size: int = 0
    num_heads: int = 0
    num_kv_heads: int = 0
    vocab_size: int = 0
    model_type: str = ""

    @property
    def frozen_params(self) -> int:
        return self.num_params - self.trainable_params

    @property
    def has_architecture(self) -> bool:
        return self.num_layers > 0 and self.hidden_size > 0


def shape_from_count(num_params: float, name: Optional[str] = None) -> ModelShape:
    """A bare parameter count (``7e9``, ``"7B"``): model states only, no units or activations."""
    n = int(num_params)
    return ModelShape(name=name or f"{n / 1e9:g}B parameters", num_params=n, trainable_params=n,
                      layer_params=0, root_params=0)


def parse_count(text: str) -> Optional[float]:
    """``"7B"`` / ``"13.5b"`` / ``"350M"`` / ``"7e9"`` -> a number, else None."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([kKmMbBtT]?)\s*", text)
    if not m:
        return None
    scale = {"": 1, "k": 1e3, "m": 1e6, "b": 1e9, "t": 1e12}[m.group(2).lower()]
    return float(m.group(1)) * scale


def _lora_params(layer, targets: Sequence[str], r: int) -> int:
    import torch.nn as nn

    total = 0
    for name, mod in layer.named_modules():
        if isinstance(mod, nn.Linear) and name.split(".")[-1] in targets:
            total += r * (mod.in_features + mod.out_features)
    return total


def shape_from_config(config: Any, name: Optional[str] = None, lora: Optional[Mapping[str, Any]] = None) -> ModelShape:
    """Count the parameters of ``config`` (a ``PretrainedConfig``) on the meta device.

    ``lora``: ``{"r": 16, "target_modules": [...]}`` makes only the adapters trainable.
    """
    import torch
    from transformers import AutoModelForCausalLM

    from .engine.units import find_layer_modules

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    unique = {id(p): p.numel() for p in model.parameters()}
    total = sum(unique.values())
    layers = find_layer_modules(model)
    layer_ids = set()
    largest = 0
    for _, mod in layers:
        ids = {id(p): p.numel() for p in mod.parameters()}
        layer_ids |= set(ids)
        largest = max(largest, sum(ids.values()))
    root = sum(n for i, n in unique.items() if i not in layer_ids)
    trainable = total
    if lora:
        targets = list(lora.get("target_modules") or [])
        r = int(lora.get("r", 8))
        trainable = sum(_lora_params(mod, targets, r) for _, mod in layers)
        total += trainable
        largest += _lora_params(layers[0][1], targets, r) if layers else 0
    text = getattr(config, "get_text_config", lambda: config)()
    heads = int(getattr(text, "num_attention_heads", 0) or 0)
    return ModelShape(
        name=name or getattr(config, "_name_or_path", "") or getattr(config, "model_type", "model"),
        num_params=total, trainable_params=trainable, layer_params=largest, root_params=root,
        num_layers=len(layers), hidden_size=int(getattr(text, "hidden_size", 0) or 0),
        intermediate_size=int(getattr(text, "intermediate_size", 0) or 0), num_heads=heads,
        num_kv_heads=int(getattr(text, "num_key_value_heads", heads) or heads),
        vocab_size=int(getattr(text, "vocab_size", 0) or 0), model_type=getattr(config, "model_type", ""),
    )


def config_from_architecture(arch: Mapping[str, Any]):
    """A ``PretrainedConfig`` from a recipe's bundled architecture numbers (needs ``model_type``)."""
    from transformers import AutoConfig

    arch = dict(arch)
    model_type = arch.pop("model_type", None)
    if not model_type:
        raise EstimateError("the architecture needs a 'model_type' (e.g. llama, qwen2, mistral)")
    return AutoConfig.for_model(model_type, **arch)


def resolve_model(spec: str, lora: Optional[Mapping[str, Any]] = None) -> ModelShape:
    """MODEL_OR_CONFIG of the command line -> a :class:`ModelShape`.

    In order: a parameter count (``7B``); a recipe name or path; a config.json or a model
    directory holding one; a hub id already in the local cache (never downloaded).
    """
    count = parse_count(spec)
    if count is not None:
        return shape_from_count(count)
    from . import recipes

    recipe_path = recipes.find_recipe(spec, missing_ok=True)
    if recipe_path is not None:
        return recipes.load_recipe(recipe_path).model_shape()
    path = Path(spec)
    if path.is_dir():
        path = path / "config.json"
    if path.is_file():
        from transformers import AutoConfig

        try:
            cfg = AutoConfig.from_pretrained(str(path))
        except Exception as exc:  # noqa: BLE001 - reported with the path
            raise EstimateError(f"{path}: not a Hugging Face model config ({exc})") from None
        return shape_from_config(cfg, name=spec, lora=lora)
    if re.fullmatch(r"[\w.-]+/[\w.-]+", spec):
        from transformers import AutoConfig

        try:
            cfg = AutoConfig.from_pretrained(spec, local_files_only=True)
        except Exception:  # noqa: BLE001 - any failure means: not in the cache
            raise EstimateError(
                f"{spec!r} is not in the local Hugging Face cache and hf-zero does not download: pass the path of "
                f"its config.json (e.g. download it from https://huggingface.co/{spec}/blob/main/config.json), "
                f"a recipe name, or a parameter count such as 7B") from None
        return shape_from_config(cfg, name=spec, lora=lora)
    raise EstimateError(f"{spec!r}: not a parameter count (7B), a recipe, a config.json / model directory, "
                        f"nor a hub id (org/name)")


# ----------------------------------------------------------------------------- activations
@dataclass(frozen=True)
class ActivationSpec:
    """The assumptions of the activation estimate."""

    seq_len: int = 2048
    micro_batch: int = 1
    recompute: bool = True          # gradient (activation) checkpointing of every decoder layer
    attention: str = "sdpa"         # "sdpa" / "flash": no s x s matrix kept; "eager": kept
    act_bytes: int = 2              # bf16 / fp16 activations


def activation_bytes(shape: ModelShape, spec: ActivationSpec) -> Optional[float]:
    """Peak activation bytes of one micro-batch on one rank (None without an architecture).

    Per decoder layer and token, the tensors autograd keeps (16-bit unless said):
      * two RMSNorms: fp32 input + 16-bit output each            -> 12 h
      * q, k, v projections and rotary q, k (GQA: kv width h_kv)  ->  4 h + 6 h_kv
      * attention output (input of o_proj)                        ->  2 h
      * gated MLP: gate, up, act(gate), act(gate)*up              ->  8 i
    i.e. ``L_tok = 18 h + 6 h_kv + 8 i`` bytes (scaled by act_bytes / 2); eager attention adds the
    softmax probabilities, ``6 a s`` bytes per token (fp32 + 16-bit copy). The logits and the fp32
    loss add ``10 V`` bytes per token. Without recomputation all layers keep ``L_tok``; with it each
    keeps its 16-bit input (``2 h``) and one layer at a time holds ``L_tok`` during its recompute.
    """
    if not shape.has_architecture:
        return None
    s, b = spec.seq_len, spec.micro_batch
    h, i, L, V = shape.hidden_size, shape.intermediate_size or 4 * shape.hidden_size, shape.num_layers, shape.vocab_size
    a = max(shape.num_heads, 1)
    h_kv = h * shape.num_kv_heads // a if shape.num_kv_heads else h
    scale = spec.act_bytes / 2
    per_tok_layer = (18 * h + 6 * h_kv + 8 * i) * scale
    if spec.attention == "eager":
        per_tok_layer += 6 * a * s
    logits = 10 * V
    if spec.recompute:
        kept = L * 2 * h * scale + per_tok_layer
    else:
        kept = L * per_tok_layer
    return float(s * b * (kept + logits))


# ----------------------------------------------------------------------------- model states
@dataclass(frozen=True)
class Setup:
    """A ZeRO stage and where the optimizer states / parameters live."""

    stage: int
    offload_optimizer: str = "none"   # none | cpu | nvme
    offload_param: str = "none"       # none | cpu | nvme (stage 3 only)
    offload_ratio: float = 1.0        # offload_optimizer.ratio: the fraction of it offloaded

    @property
    def label(self) -> str:
        parts = [f"stage {self.stage}"]
        if self.offload_optimizer != "none":
            ratio = f" (ratio {self.offload_ratio:.2f})" if self.offload_ratio < 1.0 else ""
            parts.append(f"optimizer->{self.offload_optimizer}{ratio}")
        if self.offload_param != "none":
            parts.append(f"params->{self.offload_param}")
        return " + ".join(parts)


@dataclass
class Estimate:
    """Per-rank bytes (``gpu`` / ``cpu`` / ``nvme``) and per-node totals for one setup."""

    setup: Setup
    world_size: int
    gpus_per_node: int
    states_gpu: float              # model states resident on the GPU (formula)
    live_gpu: Optional[float]      # transient unit buffers (None: unknown without architecture)
    activations: Optional[float]
    cpu: float
    nvme: float
    breakdown: Dict[str, float] = field(default_factory=dict)

    @property
    def gpu_total(self) -> float:
        return self.states_gpu + (self.live_gpu or 0.0) + (self.activations or 0.0)

    def node(self, per_rank: float) -> float:
        return per_rank * self.gpus_per_node

    def to_dict(self) -> Dict[str, Any]:
        return {
            "setup": self.setup.label, "stage": self.setup.stage, "offload_optimizer": self.setup.offload_optimizer,
            "offload_param": self.setup.offload_param, "offload_ratio": self.setup.offload_ratio,
            "per_gpu_gb": {"model_states": self.states_gpu / GB,
                           "live_units": None if self.live_gpu is None else self.live_gpu / GB,
                           "activations": None if self.activations is None else self.activations / GB,
                           "total": self.gpu_total / GB},
            "per_rank_cpu_gb": self.cpu / GB, "per_rank_nvme_gb": self.nvme / GB,
            "per_node_gb": {"gpu": self.node(self.gpu_total) / GB, "cpu": self.node(self.cpu) / GB,
                            "nvme": self.node(self.nvme) / GB},
            "breakdown_gb": {k: v / GB for k, v in self.breakdown.items()},
        }


def estimate(shape: ModelShape, setup: Setup, world_size: int, gpus_per_node: Optional[int] = None, *,
             dtype: str = "bf16", activations: Optional[ActivationSpec] = ActivationSpec()) -> Estimate:
    """Per-rank memory of ``shape`` trained with ``setup`` on ``world_size`` ranks (AdamW)."""
    if setup.offload_param != "none" and setup.stage != 3:
        raise EstimateError("parameter offload needs stage 3")
    if setup.offload_optimizer != "none" and setup.stage < 1:
        raise EstimateError("optimizer offload needs stage >= 1")
    n = world_size
    p = _DTYPE_BYTES[dtype]
    master = 0 if dtype == "fp32" else 4
    t = model_state_bytes(shape.trainable_params, setup.stage, n, param_bytes=p, grad_bytes=p,
                          master_bytes=master, optimizer_state_bytes=8)
    f = model_state_bytes(shape.frozen_params, setup.stage, n, param_bytes=p, grad_bytes=0, master_bytes=0,
                          optimizer_state_bytes=0)
    params, grads, opt = t.params + f.params, t.grads, t.master + t.optimizer_states
    where = {"params": "gpu", "grads": "gpu", "optimizer": "gpu"}
    if setup.offload_optimizer != "none":
        where["optimizer"] = setup.offload_optimizer
    if setup.offload_param != "none":
        where["params"] = setup.offload_param
    if not 0.0 <= setup.offload_ratio <= 1.0:
        raise EstimateError(f"offload ratio must be in [0, 1], got {setup.offload_ratio}")
    spent = {"gpu": 0.0, "cpu": 0.0, "nvme": 0.0}
    for key, value in (("params", params), ("grads", grads), ("optimizer", opt)):
        if key == "optimizer" and where[key] != "gpu":  # partial offload: the rest stays on the GPU
            spent["gpu"] += value * (1.0 - setup.offload_ratio)
            value *= setup.offload_ratio
        spent[where[key]] += value
    # live units: full gradient buffers of the root unit (allocated at the head's gradient, freed
    # after the last reduce-scatter) and of up to two layers, at stages 2-3; at stage 3 also the
    # gathered parameters: the root for all of forward / backward, plus the current and the
    # prefetched layer. Unknown without the architecture.
    live: Optional[float] = 0.0
    if setup.stage >= 2:
        if shape.layer_params or shape.root_params:
            units = shape.root_params + 2 * shape.layer_params
            frac_train = shape.trainable_params / max(shape.num_params, 1)
            live = units * p * frac_train
            if setup.stage == 3 and (n > 1 or setup.offload_param != "none"):
                live += units * p
        else:
            live = None
    act = activation_bytes(shape, activations) if activations is not None else None
    return Estimate(setup=setup, world_size=n, gpus_per_node=gpus_per_node or n,
                    states_gpu=spent["gpu"], live_gpu=live, activations=act, cpu=spent["cpu"], nvme=spent["nvme"],
                    breakdown={"params": params, "grads": grads, "master+optimizer": opt})


def table_setups() -> List[Setup]:
    """The rows of ``hf-zero estimate``: each stage, then the offload variants."""
    return [Setup(0), Setup(1), Setup(2), Setup(3), Setup(1, "cpu"), Setup(2, "cpu"), Setup(3, "cpu"),
            Setup(3, "cpu", "cpu"), Setup(2, "nvme"), Setup(3, "nvme", "nvme")]


def format_table(shape: ModelShape, world: int, gpus_per_node: int, rows: Sequence[Estimate],
                 spec: Optional[ActivationSpec]) -> str:
    def g(x):
        return "-" if x is None else f"{x / GB:.2f}"

    lines = [f"model: {shape.name}  parameters: {shape.num_params / 1e9:.3f}B"
             + (f" (trainable {shape.trainable_params / 1e6:.1f}M)" if shape.frozen_params else "")
             + f"  ranks: {world} ({gpus_per_node} per node)  GB = 1e9 bytes, bf16 + fp32 AdamW",
             ""]
    head = f"{'setup':<40}{'states/GPU':>11}{'live':>8}{'activ.':>8}{'GPU total':>10}" \
           f"{'CPU/rank':>10}{'NVMe/rank':>10}{'GPU/node':>10}{'CPU/node':>10}"
    lines += [head, "-" * len(head)]
    for e in rows:
        lines.append(f"{e.setup.label:<40}{g(e.states_gpu):>11}{g(e.live_gpu):>8}{g(e.activations):>8}"
                     f"{g(e.gpu_total):>10}{g(e.cpu):>10}{g(e.nvme):>10}{g(e.node(e.gpu_total)):>10}"
                     f"{g(e.node(e.cpu)):>10}")
    lines.append("")
    lines.append("states: parameters + gradients + fp32 master + Adam states kept on the GPU (ZeRO paper formulas);")
    lines.append("live: full-gradient buffers of the units in flight (stages 2-3) and gathered units (stage 3);")
    if spec is not None and shape.has_architecture:
        lines.append(f"activations: seq {spec.seq_len}, micro batch {spec.micro_batch}, recomputation "
                     f"{'on' if spec.recompute else 'off'}, {spec.attention} attention, {spec.act_bytes}-byte "
                     f"activations (formula: docs/estimate.md)")
    else:
        lines.append("activations / live units: unknown without the architecture (pass a config.json or a recipe)")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- planner
@dataclass
class Plan:
    setup: Setup
    estimate: Estimate
    reasons: List[str]
    fits: bool

    def zero_config(self, nvme_path: str = "/local_nvme") -> Dict[str, Any]:
        s = self.setup
        zo: Dict[str, Any] = {"stage": s.stage, "overlap_comm": True, "contiguous_gradients": True,
                              "reduce_bucket_size": "auto"}
        if s.stage == 3:
            zo.update({"stage3_prefetch_bucket_size": "auto", "stage3_param_persistence_threshold": "auto",
                       "stage3_gather_16bit_weights_on_model_save": True})
        for key, dev in (("offload_optimizer", s.offload_optimizer), ("offload_param", s.offload_param)):
            if dev != "none":
                zo[key] = {"device": dev, "pin_memory": True}
                if dev == "nvme":
                    zo[key]["nvme_path"] = nvme_path
        if s.offload_optimizer != "none" and s.offload_ratio < 1.0:
            zo["offload_optimizer"]["ratio"] = s.offload_ratio
        return {
            "train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto",
            "gradient_accumulation_steps": "auto", "gradient_clipping": "auto",
            "bf16": {"enabled": "auto"}, "zero_optimization": zo,
        }


#: Partial offload ratios are proposed in steps of this size (rounded up: never less offloaded
#: than the formula needs).
RATIO_STEP = 0.01


def fitting_ratio(full: Estimate, usable: float) -> Optional[float]:
    """The smallest offload ratio (a multiple of :data:`RATIO_STEP`) with which ``full``'s
    setup, an estimate at ratio 1, fits ``usable`` GPU bytes: the GPU keeps ``1 - ratio`` of the
    fp32 master + optimizer states on top of ``full.gpu_total``. None when even ratio 1 does
    not fit."""
    if full.gpu_total > usable:
        return None
    opt = full.breakdown.get("master+optimizer", 0.0)
    if opt <= 0:
        return 1.0
    need = 1.0 - (usable - full.gpu_total) / opt
    steps = math.ceil(need / RATIO_STEP - 1e-9)
    return min(1.0, max(0.0, steps * RATIO_STEP))


def plan(shape: ModelShape, gpus: int, gpu_memory_gb: float, nodes: int = 1, *,
         cpu_memory_gb: Optional[float] = None, activations: Optional[ActivationSpec] = ActivationSpec(),
         dtype: str = "bf16") -> Plan:
    """The least-sharded setup that fits: stage 2, then stage 3, then optimizer offload, then
    parameter offload; CPU unless ``cpu_memory_gb`` (per node) is too small, then NVMe. An
    optimizer offload fills the GPU first: it offloads the smallest fraction of the optimizer
    state that fits (``offload_optimizer.ratio``, :func:`fitting_ratio`), not all of it."""
    world = gpus * nodes
    usable = gpu_memory_gb * GB * GPU_USABLE_FRACTION
    reasons: List[str] = [f"usable GPU memory: {GPU_USABLE_FRACTION:.0%} of {gpu_memory_gb:g} GB = {usable / GB:.1f} GB "
                          f"(the rest for the CUDA context, allocator fragmentation, communication buffers)"]

    def est(setup):
        return estimate(shape, setup, world, gpus, dtype=dtype, activations=activations)

    def fits_gpu(e):
        return e.gpu_total <= usable

    def cpu_ok(e):
        return cpu_memory_gb is None or e.node(e.cpu) <= cpu_memory_gb * GB * 0.9

    s1, s2 = est(Setup(1)), est(Setup(2))
    if fits_gpu(s2):
        reasons.append(f"stage 2 fits: {s2.gpu_total / GB:.1f} GB per GPU.")
        if fits_gpu(s1) and world > 1:
            reasons.append(
                f"stage 1 would fit too ({s1.gpu_total / GB:.1f} GB), but stage 2 sends the same bytes per step "
                f"without accumulation and keeps {(s1.states_gpu - s2.states_gpu) / GB:.1f} GB less per GPU, room "
                f"for a larger micro batch. With many accumulation steps on a slow interconnect, stage 1 (one "
                f"reduction per optimizer step instead of one per micro-step) may be faster: measure.")
        else:
            reasons.append("stage 1 would keep the full gradients on every GPU and does not fit, or gains "
                           "nothing at one rank." if world > 1 else "at one rank stages 1-3 keep the same bytes.")
        return Plan(Setup(2), s2, reasons, True)
    reasons.append(f"stage 2 needs {s2.gpu_total / GB:.1f} GB per GPU: too much.")
    s3 = est(Setup(3))
    if world > 1 and fits_gpu(s3):
        reasons.append(f"stage 3 fits: {s3.gpu_total / GB:.1f} GB per GPU (parameters sharded too; 1.5x the "
                       f"communication of stage 2).")
        return Plan(Setup(3), s3, reasons, True)
    if world > 1:
        reasons.append(f"stage 3 needs {s3.gpu_total / GB:.1f} GB per GPU: the {world} GPUs together cannot hold "
                       f"the model states, so part of them must leave the GPUs.")
    else:
        reasons.append("one GPU cannot hold the model states: part of them must leave the GPU.")
    for setup in (Setup(2, "cpu"), Setup(3, "cpu"), Setup(3, "cpu", "cpu")):
        if setup.stage == 3 and world == 1 and setup.offload_param == "none":
            continue  # at one rank stage 3 without parameter offload is stage 2
        e = est(setup)
        if not fits_gpu(e):
            reasons.append(f"{setup.label} needs {e.gpu_total / GB:.1f} GB per GPU: too much.")
            continue
        ratio = fitting_ratio(e, usable)
        if ratio is not None and ratio < 1.0:
            full = e
            setup = replace(setup, offload_ratio=ratio)
            e = est(setup)
            reasons.append(f"{full.setup.label} would leave {(usable - full.gpu_total) / GB:.1f} GB of the GPU unused: "
                           f"offload only {ratio:.0%} of the fp32 master + optimizer states (offload_optimizer.ratio "
                           f"{ratio:.2f}), {(full.cpu + full.nvme - e.cpu - e.nvme) / GB:.1f} GB less off the GPU per rank.")
        if not cpu_ok(e):
            # the optimizer states to NVMe first; parameter shards as well if that is not enough
            nv = Setup(setup.stage, "nvme", setup.offload_param, setup.offload_ratio)
            e2 = est(nv)
            if setup.offload_param == "cpu" and not cpu_ok(e2):
                nv = Setup(setup.stage, "nvme", "nvme", setup.offload_ratio)
                e2 = est(nv)
            reasons.append(f"{setup.label} fits the GPU ({e.gpu_total / GB:.1f} GB) but needs {e.node(e.cpu) / GB:.0f} GB "
                           f"of CPU memory per node (> 90% of {cpu_memory_gb:g} GB): offload to NVMe instead "
                           f"({nv.label}: {e2.node(e2.nvme) / GB:.0f} GB of NVMe and {e2.node(e2.cpu) / GB:.0f} GB of "
                           f"CPU memory per node).")
            return Plan(nv, e2, reasons, True)
        reasons.append(f"{setup.label} fits: {e.gpu_total / GB:.1f} GB per GPU, {e.node(e.cpu) / GB:.0f} GB of CPU "
                       f"memory per node" + (f" (of {cpu_memory_gb:g} GB)" if cpu_memory_gb else
                                              " (pass --cpu-memory to check it against the host)") + ".")
        return Plan(setup, e, reasons, True)
    last = est(Setup(3, "nvme", "nvme"))
    reasons.append(f"nothing fits: even with everything offloaded a GPU needs {last.gpu_total / GB:.1f} GB "
                   f"(live units + activations); lower the sequence length or micro batch, or use more GPUs.")
    return Plan(Setup(3, "nvme", "nvme"), last, reasons, False)


def paper_model_states_gb(num_params: float, world: int) -> Dict[int, float]:
    """The ZeRO paper's per-GPU model states (bf16/fp16 + fp32 Adam, K = 12) for stages 0-3, in GB."""
    return {s: model_state_bytes(num_params, s, world).total / GB for s in range(4)}


def estimate_all(shape: ModelShape, gpus: int, nodes: int = 1, *, spec: Optional[ActivationSpec] = ActivationSpec(),
                 dtype: str = "bf16") -> List[Estimate]:
    world = gpus * nodes
    return [estimate(shape, s, world, gpus, dtype=dtype, activations=spec) for s in table_setups()]


def as_json(shape: ModelShape, rows: Sequence[Estimate], spec: Optional[ActivationSpec]) -> str:
    return json.dumps({"model": asdict(shape), "activation_assumptions": None if spec is None else asdict(spec),
                       "rows": [r.to_dict() for r in rows]}, indent=2)
