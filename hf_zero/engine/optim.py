"""The sharded optimizer step: a torch optimizer re-pointed at this rank's fp32 master shards.

Note:
    * The user's optimizer object is kept (schedulers hold a reference to it); only the
      ``params`` list of each of its param groups is replaced by :class:`Piece` parameters:
      fp32 views into the master shards. Group options (lr, weight decay, betas...) are kept.
    * A piece is a contiguous run of a rank's shard whose elements all belong to one param
      group; within a unit, trainable parameters are laid out by group, so a shard holds at most
      one piece per group. Padding elements belong to no piece and are never stepped.
    * This is exact only for element-wise optimizers (the update of an element depends on that
      element's gradient and state alone). Others are refused by :func:`check_elementwise`.
    * Parameters that require grad but are in no param group are reduced but never stepped,
      which is what an unsharded run does too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Sequence

import torch
import torch.nn as nn

ELEMENTWISE_OPTIMIZERS = frozenset(
    {"SGD", "Adam", "AdamW", "Adamax", "Adagrad", "RMSprop", "NAdam", "RAdam", "ASGD", "Rprop",
     "Lion", "Adadelta"}
)
NOT_ELEMENTWISE_OPTIMIZERS = {
    "Adafactor": "its factored second moment uses row and column statistics of whole matrices",
    "LBFGS": "it needs closures and whole-parameter line searches",
    "Shampoo": "its preconditioners are built from whole matrices",
    "Muon": "it orthogonalises whole matrices",
    "SOAP": "its preconditioners are built from whole matrices",
    "GaLore": "it projects whole matrices",
    "SparseAdam": "it needs sparse gradients",
}


class OptimizerNotSupported(TypeError):
    pass


def check_elementwise(optimizer: torch.optim.Optimizer, allow_untested: bool = False) -> None:
    """Refuse optimizers whose update of an element depends on other elements."""
    for cls in type(optimizer).__mro__:
        name = cls.__name__
        if name in ELEMENTWISE_OPTIMIZERS and cls.__module__.startswith(("torch.optim", "lion_pytorch")):
            return
        if name in ELEMENTWISE_OPTIMIZERS and cls is type(optimizer):
            return
        for bad, why in NOT_ELEMENTWISE_OPTIMIZERS.items():
            if bad.lower() in name.lower() and "8bit" not in name.lower():
                raise OptimizerNotSupported(
                    f"{type(optimizer).__name__} cannot run on ZeRO shards: {why}, and a rank "
                    "holds only a slice of each parameter. Use an element-wise optimizer such as "
                    "torch.optim.AdamW, Adam or SGD."
                )
    if "8bit" in type(optimizer).__name__.lower() or "bnb" in type(optimizer).__module__:
        raise OptimizerNotSupported(
            f"{type(optimizer).__name__} quantises its states block-wise across elements, so "
            "it is not exact on ZeRO shards. Use torch.optim.AdamW."
        )
    if not allow_untested:
        raise OptimizerNotSupported(
            f"{type(optimizer).__name__} ({type(optimizer).__module__}) is not known to be "
            "element-wise, so hf_zero cannot tell whether sharding changes its maths. Use one of "
            f"{sorted(ELEMENTWISE_OPTIMIZERS)}, or set \"zero_allow_untested_optimizer\": true in "
            "the config if you know it is element-wise."
        )


def build_optimizer(opt_type: str, params: dict, param_groups) -> torch.optim.Optimizer:
    """The optimizer a config's ``optimizer`` section names, over ``param_groups``.

    DeepSpeed's "Adam" applies decoupled weight decay unless ``adam_w_mode`` is false, so it maps
    to ``torch.optim.AdamW`` here; ``torch_adam`` only picks DeepSpeed's kernel and is ignored.
    """
    kwargs = {k: v for k, v in dict(params).items() if k not in ("torch_adam", "adam_w_mode")}
    if "betas" in kwargs:
        kwargs["betas"] = tuple(kwargs["betas"])
    kind = opt_type.lower()
    if kind in ("adam", "adamw"):
        # DeepSpeed builds FusedAdam / DeepSpeedCPUAdam for both names, whose weight_decay
        # defaults to 0.0; torch.optim.AdamW's default is 0.01.  lr 1e-3, betas (0.9, 0.999)
        # and eps 1e-8 are the same in both.
        kwargs.setdefault("weight_decay", 0.0)
    if kind == "adamw" or (kind == "adam" and params.get("adam_w_mode", True)):
        return torch.optim.AdamW(param_groups, **kwargs)
    if kind == "adam":
        return torch.optim.Adam(param_groups, **kwargs)
    if kind == "sgd":
        return torch.optim.SGD(param_groups, **kwargs)
    raise OptimizerNotSupported(f"optimizer type {opt_type!r} is not supported; use Adam, AdamW or SGD")


@dataclass
class Piece:
    """An optimizer parameter: ``master[start:end]`` of one flat buffer's fp32 shard."""

    param: nn.Parameter
    flat_index: int
    start: int
    end: int
    group: int


def param_group_index(optimizer: torch.optim.Optimizer) -> Dict[int, int]:
    """id(model parameter) -> index of the param group that holds it."""
    out: Dict[int, int] = {}
    for g, group in enumerate(optimizer.param_groups):
        for p in group["params"]:
            if id(p) in out:
                raise ValueError("a parameter appears in two optimizer param groups")
            out[id(p)] = g
    return out


def make_pieces(flat_index: int, master: torch.Tensor, segment_groups: Sequence[tuple]) -> List[Piece]:
    """Merge consecutive shard segments of the same group into pieces.

    ``segment_groups`` holds ``(shard_start, length, group)`` in shard order; group None means
    the parameter is not optimized.
    """
    pieces: List[Piece] = []
    run = None  # [start, end, group]
    for start, length, group in list(segment_groups) + [(None, 0, None)]:
        if run is not None and (start != run[1] or group != run[2]):
            if run[2] is not None:
                view = master[run[0] : run[1]]
                pieces.append(Piece(nn.Parameter(view, requires_grad=True), flat_index, run[0], run[1], run[2]))
            run = None
        if start is None:
            break
        if run is None:
            run = [start, start + length, group]
        else:
            run[1] = start + length
    return pieces


def repoint_optimizer(optimizer: torch.optim.Optimizer, pieces: Iterable[Piece]) -> None:
    """Replace each param group's params by its pieces; the optimizer must have no state yet."""
    if any(len(s) for s in optimizer.state.values()):
        raise ValueError(
            "the optimizer already has state (was it stepped?); pass a freshly built optimizer "
            "and load its state through the engine's checkpoint instead"
        )
    by_group: List[List[nn.Parameter]] = [[] for _ in optimizer.param_groups]
    for piece in pieces:
        by_group[piece.group].append(piece.param)
    for group, params in zip(optimizer.param_groups, by_group):
        group["params"] = params
    optimizer.state.clear()


def global_grad_norm_sq(grads: Iterable[torch.Tensor]) -> torch.Tensor:
    """Sum of squares of ``grads`` in fp32, as a 0-d tensor (no host sync)."""
    total: Optional[torch.Tensor] = None
    for g in grads:
        if g.numel():
            s = torch.linalg.vector_norm(g, 2, dtype=torch.float32).square()
            total = s if total is None else total + s
    return total if total is not None else torch.zeros((), dtype=torch.float32)


def clip_coefficient(total_norm: torch.Tensor, max_norm: float) -> torch.Tensor:
    """torch.nn.utils.clip_grad_norm_'s coefficient, kept as a tensor."""
    return torch.clamp(max_norm / (total_norm + 1e-6), max=1.0)


def naive_grad_norm(params: Iterable[nn.Parameter]) -> float:
    """Reference: the 2-norm over all ``.grad`` of unsharded parameters, in float64."""
    return math.sqrt(sum(float(p.grad.double().square().sum()) for p in params if p.grad is not None))
