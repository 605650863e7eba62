"""Units: the groups of modules whose parameters are gathered, reduced and stepped together.

Note:
    * A unit is a module subtree. Layer units are the model's repeated blocks: the classes a
      Hugging Face model lists in ``_no_split_modules`` (``LlamaDecoderLayer``, ``GPT2Block``,
      ...), or, for other models, the children of the largest ``nn.ModuleList``. The root unit is
      the whole model minus the layer units: final norm, small leftovers, and tied embeddings.
    * Untied input and output embeddings (``get_input_embeddings()`` /
      ``get_output_embeddings()`` of a Hugging Face model, outside every layer, their weights
      used by no other module) are units of their own (:func:`with_embedding_units`): at stage 3
      each is gathered around its own use only, instead of both for the whole forward and
      backward inside the root (in a 8k-vocabulary Llama they are 60% of the root's bytes).
    * Every trainable or frozen parameter belongs to exactly one unit, found by identity. A
      parameter reachable from two units (tied weights across units) belongs to the root unit,
      which is gathered for the whole forward and backward.
    * Unit order is the module order of the model (root first); the engine records the real
      execution order each step and never relies on this one for correctness.
    * Within a unit, parameters are grouped into flat buffers by (dtype, trainability) and, for
      trainable ones, sorted by optimizer group so a rank's shard splits into few pieces.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Tuple

import torch.nn as nn


@dataclass
class UnitSpec:
    """The parameters of one unit, before flattening."""

    name: str
    module: nn.Module
    is_root: bool
    params: List[Tuple[str, nn.Parameter]] = field(default_factory=list)


def find_layer_modules(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    """The model's repeated blocks, outermost first, in module order."""
    no_split = set(getattr(model, "_no_split_modules", None) or [])
    if no_split:
        found: List[Tuple[str, nn.Module]] = []
        taken: List[str] = []
        for name, module in model.named_modules():
            if name and type(module).__name__ in no_split:
                if any(name.startswith(t + ".") for t in taken):
                    continue  # nested inside a block already taken
                found.append((name, module))
                taken.append(name)
        if found:
            return found
    best: Optional[Tuple[str, nn.ModuleList]] = None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 1:
            if best is None or _numel(module) > _numel(best[1]):
                best = (name, module)
    if best is None:
        return []
    prefix = best[0]
    return [(f"{prefix}.{i}" if prefix else str(i), m) for i, m in enumerate(best[1])]


def with_embedding_units(model: nn.Module, layers: Iterable[Tuple[str, nn.Module]]) -> List[Tuple[str, nn.Module]]:
    """``layers`` plus the model's untied input and output embedding modules (see the module
    notes), in module order. A module is added only if it lies outside every layer, holds no
    layer, and none of its parameters is reachable through another module (tied weights stay
    in the root)."""
    layers = list(layers)
    candidates = []
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        fn = getattr(model, getter, None)
        try:
            m = fn() if callable(fn) else None
        except (NotImplementedError, AttributeError, TypeError):
            m = None
        if isinstance(m, nn.Module) and all(m is not c for c in candidates):
            candidates.append(m)
    if not candidates:
        return layers
    names = {id(m): n for n, m in model.named_modules(remove_duplicate=False) if n}
    layer_prefixes = [n + "." for n, _ in layers]
    owners: Dict[int, set] = {}  # parameter -> names of the modules that hold it directly
    for mod_name, mod in model.named_modules(remove_duplicate=False):
        for _, p in mod.named_parameters(recurse=False):
            owners.setdefault(id(p), set()).add(mod_name)
    extra = []
    for m in candidates:
        name = names.get(id(m))
        params = list(m.parameters())
        if name is None or not params:
            continue
        if any(name.startswith(pre) or pre.startswith(name + ".") for pre in layer_prefixes):
            continue  # inside a layer, or holding one
        inside = {n for n, sub in m.named_modules(prefix=name)}
        if any(owners.get(id(p), set()) - inside for p in params):
            continue  # tied with (or shared by) a module outside: the root keeps it
        extra.append((name, m))
    if not extra:
        return layers
    order = {n: i for i, (n, _) in enumerate(model.named_modules())}
    return sorted(layers + extra, key=lambda nm: order.get(nm[0], len(order)))


def _numel(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def build_units(model: nn.Module, layer_modules: Iterable[Tuple[str, nn.Module]]) -> List[UnitSpec]:
    """Assign every parameter of ``model`` to one unit; the root unit comes first."""
    layers = list(layer_modules)
    prefixes = [name + "." for name, _ in layers]

    def unit_of(param_name: str) -> int:  # 0 is the root, i + 1 is layer i
        for i, prefix in enumerate(prefixes):
            if param_name.startswith(prefix):
                return i + 1
        return 0

    seen_units: Dict[int, set] = {}
    first_name: Dict[int, Tuple[str, nn.Parameter]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        seen_units.setdefault(id(p), set()).add(unit_of(name))
        first_name.setdefault(id(p), (name, p))
    units = [UnitSpec("<root>", model, True)] + [UnitSpec(n, m, False) for n, m in layers]
    for key, (name, p) in first_name.items():
        where = seen_units[key]
        units[next(iter(where)) if len(where) == 1 else 0].params.append((name, p))
    return units
