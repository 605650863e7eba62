"""One parameter's fp32 weight, gradient and optimizer states, whole or this rank's fragment.

The role of DeepSpeed's tensor-fragment helpers (``deepspeed.utils.safe_get_full_fp32_param``
and the rest), under the same names, for code that logs per-parameter gradient norms, keeps an
EMA of the master weights, or edits optimizer states of one parameter.

Note:
    * A parameter of a flat buffer owns elements ``[offset, offset + numel)`` of it; this rank
      owns ``[shard_start, shard_start + shard_numel)``. Its *fragment* is the overlap, possibly
      empty: :func:`local_range` gives it as ``(start, end)`` in the flattened parameter. The
      ``local`` functions read and write fragments (1-D, no collective); the ``full`` getters
      assemble the whole parameter from every rank's fragment with one all-reduce over the
      flat's shard group (collective: every rank calls them for the same parameters, in the
      same order); the ``full`` setters take the whole value, the same on every rank, and each
      rank keeps its fragment (no collective).
    * Values are fp32 whatever the compute dtype: the master weights, the optimizer's states,
      and the gradient the next ``step`` applies, averaged over ranks and micro-batches and
      divided by the current fp16 loss scale (DeepSpeed's getters leave that scale in; with
      bf16 or fp32 the two agree).
    * Gradients at stages 0-1 are reduced only at the step, so ``safe_get_full_grad`` all-reduces
      this rank's accumulated gradient of the parameter itself, and ``safe_set_full_grad``
      writes every rank's accumulator (the step's average of equal values is that value). The
      ``local`` gradient functions need the reduced shards of stages 2-3.
    * Setting the fp32 weight also sets the weight the model computes with (rounded to its
      dtype; at stages 0-2 in the full copy every rank holds, at stage 3 in this rank's shard and
      in the gathered buffer when the unit is gathered), so forward and optimizer agree at once.
    * A frozen parameter has no master, gradient or state: every getter returns None for it,
      as DeepSpeed's do, and the setters raise. A parameter no engine manages raises.
    * A delayed (one step late) host update is finished first, so the values are current.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Callable, Iterable, Optional, Tuple

import torch

from .access import ParamAccess, access_of
from .flat import FlatState


def _access(param) -> ParamAccess:
    acc = access_of(param)
    if acc is None:
        raise ValueError(
            f"hf_zero: this parameter (shape {tuple(param.shape)}) is not managed by an hf_zero engine; the "
            "tensor-fragment functions read the engine's shards (pass a parameter of the model given to "
            "hf_zero.initialize)")
    return acc


def local_range(param) -> Tuple[int, int]:
    """``(start, end)``: the elements of the flattened ``param`` this rank holds (may be empty)."""
    return local_range_of(_access(param))


def _shard_slice(acc: ParamAccess) -> slice:
    """Where the fragment sits in this rank's shard."""
    f = acc.flat
    start, end = local_range_of(acc)
    base = f.offsets[acc.index] - f.shard_start
    return slice(base + start, base + end)


def local_range_of(acc: ParamAccess) -> Tuple[int, int]:
    f = acc.flat
    off, n = f.offsets[acc.index], f.numels[acc.index]
    lo, hi = max(f.shard_start, off), min(f.shard_start + f.shard_numel, off + n)
    return (lo - off, hi - off) if lo < hi else (0, 0)


def _trainable(acc: ParamAccess) -> bool:
    """Trained by an engine with an optimizer (with optimizer offload to NVMe the master is in
    RAM only inside ``engine.resident``)."""
    return acc.flat.trainable and acc.engine.optimizer is not None


def _flat_index(acc: ParamAccess) -> int:
    for i, f in enumerate(acc.engine._trainable_flats):
        if f is acc.flat:
            return i
    raise AssertionError("hf_zero internal: a trainable flat missing from the engine's list")


def _resident(acc: ParamAccess, write_back: bool = False):
    engine = acc.engine
    engine.flush_pending_update()
    return engine.resident(acc.flat, write_back=write_back) if acc.flat.trainable else nullcontext()


def _assemble(acc: ParamAccess, fragment: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """Collective over the flat's shard group: the whole parameter from every rank's fragment
    (None on every rank when no rank has one)."""
    f, p = acc.flat, acc.flat.params[acc.index]
    n = f.numels[acc.index]
    start, end = local_range_of(acc)
    buf = torch.zeros(n + 1, dtype=torch.float32, device=f.device)
    if fragment is not None:
        buf[start:end] = fragment.to(buf.device, torch.float32)
        buf[n] = 1.0
    if f.shard_world > 1:
        acc.engine.shard_comm.all_reduce(buf, op="sum")
    if buf[n].item() == 0:
        return None
    return buf[:n].view(p.shape)


def _check_full(acc: ParamAccess, value: torch.Tensor, what: str) -> torch.Tensor:
    p = acc.flat.params[acc.index]
    if tuple(value.shape) != tuple(p.shape):
        raise ValueError(f"hf_zero: {what} of {acc.name!r} must have the parameter's shape {tuple(p.shape)}, "
                         f"got {tuple(value.shape)}")
    start, end = local_range_of(acc)
    return value.detach().reshape(-1)[start:end]


def _check_local(acc: ParamAccess, value: torch.Tensor, what: str) -> torch.Tensor:
    start, end = local_range_of(acc)
    if value.numel() != end - start:
        raise ValueError(f"hf_zero: {what} of {acc.name!r} on this rank must have {end - start} elements "
                         f"(hf_zero.local_range gives ({start}, {end})), got {value.numel()}")
    return value.detach().reshape(-1)


def _refuse_frozen(acc: ParamAccess, what: str) -> None:
    if not _trainable(acc):
        raise ValueError(f"hf_zero: {acc.name!r} is frozen (or has no optimizer): it has no {what} to set")


# ------------------------------------------------------------------------------- fp32 weights
def _fp32_fragment(acc: ParamAccess) -> torch.Tensor:
    return acc.flat.master[_shard_slice(acc)].detach().clone()


def _write_fp32(acc: ParamAccess, fragment: torch.Tensor, full_value: Optional[torch.Tensor]) -> None:
    engine, f = acc.engine, acc.flat
    sl = _shard_slice(acc)
    with torch.no_grad():
        with engine.resident(f, write_back=True):
            f.master[sl] = fragment.to(f.master.device, torch.float32)
        if f.master_is_shard:
            pass  # the master is the shard: the model sees the new value already
        elif engine.param_swap is not None and f in engine.param_swap:
            shard = engine.read_shard(f).clone()
            shard[sl] = fragment.to(shard.device, shard.dtype)
            engine.write_shard(f, shard)
        else:
            f.shard[sl] = fragment.to(f.shard.device, f.shard.dtype)
        if full_value is not None and (not f.sharded or f.state is FlatState.GATHERED):
            f.param_view(f.full, acc.index).copy_(full_value.to(f.device, f.dtype))


def safe_get_full_fp32_param(param) -> Optional[torch.Tensor]:
    """Collective: the whole fp32 master weight of ``param`` (None if it is frozen)."""
    acc = _access(param)
    engine = acc.engine
    engine.flush_pending_update()
    if not _trainable(acc):
        return None
    with engine.resident(acc.flat):
        return _assemble(acc, _fp32_fragment(acc))


def safe_set_full_fp32_param(param, value: torch.Tensor) -> None:
    """Set the fp32 master weight of ``param`` (and the weight the model uses) to ``value``, the
    same whole tensor on every rank."""
    acc = _access(param)
    _refuse_frozen(acc, "fp32 weight")
    acc.engine.flush_pending_update()
    _write_fp32(acc, _check_full(acc, value, "the value"), value.detach())


def safe_get_local_fp32_param(param) -> Optional[torch.Tensor]:
    """This rank's fragment of the fp32 master weight (1-D; None if frozen)."""
    acc = _access(param)
    acc.engine.flush_pending_update()
    if not _trainable(acc):
        return None
    with acc.engine.resident(acc.flat):
        return _fp32_fragment(acc)


def safe_set_local_fp32_param(param, value: torch.Tensor) -> None:
    """Set this rank's fragment of the fp32 master weight (and of the model's weight)."""
    acc = _access(param)
    _refuse_frozen(acc, "fp32 weight")
    acc.engine.flush_pending_update()
    full = None
    if not acc.flat.sharded and acc.flat.shard_world == 1:
        full = value.detach().reshape(acc.flat.params[acc.index].shape)
    _write_fp32(acc, _check_local(acc, value, "the value"), full)


# ------------------------------------------------------------------------------- optimizer states
def _state_fragment(acc: ParamAccess, key: str) -> Optional[torch.Tensor]:
    """This rank's fragment of state ``key`` (None where this rank has no such state)."""
    engine = acc.engine
    sl = _shard_slice(acc)
    if sl.stop <= sl.start:
        return None
    fi = _flat_index(acc)
    for piece in engine.pieces:
        if piece.flat_index == fi and piece.start <= sl.start < piece.end:
            value = engine.optimizer.state.get(piece.param, {}).get(key)
            if value is None or not torch.is_tensor(value) or value.numel() != piece.end - piece.start:
                return None
            return value.detach().reshape(-1)[sl.start - piece.start : sl.stop - piece.start]
    return None  # a trainable parameter the optimizer does not step


def _state_key(key: str) -> str:
    if not isinstance(key, str) or not key:
        raise ValueError(f"hf_zero: an optimizer state key is a name such as 'exp_avg', got {key!r}")
    return key


def safe_get_full_optimizer_state(param, optim_state_key: str) -> Optional[torch.Tensor]:
    """Collective: the whole fp32 optimizer state ``optim_state_key`` (e.g. ``"exp_avg"``) of
    ``param``; None if it is frozen or the optimizer has no such state yet."""
    acc = _access(param)
    key = _state_key(optim_state_key)
    if not _trainable(acc):
        return None
    with _resident(acc):
        frag = _state_fragment(acc, key)
        return _assemble(acc, None if frag is None else frag.clone())


def safe_get_local_optimizer_state(param, optim_state_key: str) -> Optional[torch.Tensor]:
    """This rank's fragment of optimizer state ``optim_state_key`` (1-D; None if absent)."""
    acc = _access(param)
    key = _state_key(optim_state_key)
    if not _trainable(acc):
        return None
    with _resident(acc):
        frag = _state_fragment(acc, key)
        if frag is None:
            start, end = local_range_of(acc)
            return None if end > start else torch.zeros(0, dtype=torch.float32)
        return frag.float().clone()


def _write_state(acc: ParamAccess, key: str, fragment: torch.Tensor) -> None:
    if fragment.numel() == 0:
        return
    with _resident(acc, write_back=True):
        frag = _state_fragment(acc, key)
        if frag is None:
            raise ValueError(
                f"hf_zero: the optimizer has no state {key!r} for {acc.name!r} on rank {acc.engine.rank} "
                "(states are created by the first optimizer step; Adam's are 'exp_avg' and 'exp_avg_sq')")
        with torch.no_grad():
            frag.copy_(fragment.to(frag.device, frag.dtype))


def safe_set_full_optimizer_state(param, value: torch.Tensor, optim_state_key: str) -> None:
    """Set optimizer state ``optim_state_key`` of ``param`` to ``value``, the same whole tensor on
    every rank."""
    acc = _access(param)
    _refuse_frozen(acc, "optimizer state")
    _write_state(acc, _state_key(optim_state_key), _check_full(acc, value, "the value"))


def safe_set_local_optimizer_state(param, value: torch.Tensor, optim_state_key: str) -> None:
    """Set this rank's fragment of optimizer state ``optim_state_key``."""
    acc = _access(param)
    _refuse_frozen(acc, "optimizer state")
    _write_state(acc, _state_key(optim_state_key), _check_local(acc, value, "the value"))


# ------------------------------------------------------------------------------- gradients
def _unit_fi(acc: ParamAccess) -> int:
    return next(i for i, f in enumerate(acc.unit.flats) if f is acc.flat)


def _grad_buffer(acc: ParamAccess) -> Tuple[torch.Tensor, slice, bool]:
    """Where the parameter's gradient accumulates on this rank: (buffer, the parameter's slice
    of it, whether that buffer is already averaged over ranks)."""
    engine, f = acc.engine, acc.flat
    runtime, fi = engine.runtime, _unit_fi(acc)
    if engine.stage <= 1:
        off, n = f.offsets[acc.index], f.numels[acc.index]
        return acc.unit.grad_full[fi], slice(off, off + n), False
    shard = runtime.grad_shard(acc.unit, fi)
    if shard is None:
        shard = runtime._shard_accumulator(acc.unit, fi)
        shard.zero_()
        acc.unit.stale.discard(fi)
    return shard, _shard_slice(acc), True


def _grad_scale(engine) -> float:
    return float(engine.loss_scaler.scale)


def safe_get_full_grad(param) -> Optional[torch.Tensor]:
    """Collective: the whole fp32 gradient of ``param`` that the next step applies (averaged over
    ranks and micro-batches, fp16 loss scale divided out); None if it is frozen."""
    acc = _access(param)
    engine = acc.engine
    if not _trainable(acc):
        return None
    buf, sl, reduced = _grad_buffer(acc)
    scale = _grad_scale(engine)
    if reduced:
        full = _assemble(acc, buf[sl].float() / scale)
        return full
    local = buf[sl].float()
    if engine.comm.world_size > 1:
        local = local.clone()
        engine.comm.all_reduce(local, op="sum")
    return (local / (engine.comm.world_size * scale)).view(param.shape)


def safe_set_full_grad(param, value: torch.Tensor) -> None:
    """Set the gradient the next step applies to ``param`` to ``value`` (fp32 units, before the
    loss scale), the same whole tensor on every rank."""
    acc = _access(param)
    _refuse_frozen(acc, "gradient")
    engine = acc.engine
    buf, sl, reduced = _grad_buffer(acc)
    scale = _grad_scale(engine)
    with torch.no_grad():
        if reduced:
            frag = _check_full(acc, value, "the gradient")
            buf[sl] = (frag.float() * scale).to(buf.device, buf.dtype)
            acc.unit.fresh.discard(_unit_fi(acc))  # a later reduction adds to it, not over it
        else:
            p = acc.flat.params[acc.index]
            if tuple(value.shape) != tuple(p.shape):
                raise ValueError(f"hf_zero: the gradient of {acc.name!r} must have the parameter's shape "
                                 f"{tuple(p.shape)}, got {tuple(value.shape)}")
            buf[sl] = (value.detach().reshape(-1).float() * scale).to(buf.device, buf.dtype)


def _need_reduced(acc: ParamAccess, what: str) -> None:
    if acc.engine.stage <= 1:
        raise ValueError(f"hf_zero: {what} needs ZeRO stage 2 or 3, where each rank holds the reduced gradient "
                         f"of its shard; at stage {acc.engine.stage} gradients are reduced at the step: use "
                         "safe_get_full_grad / safe_set_full_grad")


def safe_get_local_grad(param) -> Optional[torch.Tensor]:
    """Stages 2-3: this rank's fragment of the reduced fp32 gradient (1-D; None if frozen)."""
    acc = _access(param)
    if not _trainable(acc):
        return None
    _need_reduced(acc, "safe_get_local_grad")
    buf, sl, _ = _grad_buffer(acc)
    return buf[sl].float() / _grad_scale(acc.engine)


def safe_set_local_grad(param, value: torch.Tensor) -> None:
    """Stages 2-3: set this rank's fragment of the gradient the next step applies."""
    acc = _access(param)
    _refuse_frozen(acc, "gradient")
    _need_reduced(acc, "safe_set_local_grad")
    frag = _check_local(acc, value, "the gradient")
    buf, sl, _ = _grad_buffer(acc)
    with torch.no_grad():
        buf[sl] = (frag.float() * _grad_scale(acc.engine)).to(buf.device, buf.dtype)
    acc.unit.fresh.discard(_unit_fi(acc))


def safe_update_full_grad_vectorized(params: Iterable, update_fn: Callable) -> None:
    """Collective: for each parameter, ``update_fn(full_grad, param)`` returns its new whole
    gradient (frozen parameters are skipped)."""
    for p in params:
        old = safe_get_full_grad(p)
        if old is None:
            continue
        safe_set_full_grad(p, update_fn(old, p))


__all__ = [
    "local_range",
    "safe_get_full_fp32_param", "safe_set_full_fp32_param",
    "safe_get_local_fp32_param", "safe_set_local_fp32_param",
    "safe_get_full_optimizer_state", "safe_set_full_optimizer_state",
    "safe_get_local_optimizer_state", "safe_set_local_optimizer_state",
    "safe_get_full_grad", "safe_set_full_grad",
    "safe_get_local_grad", "safe_set_local_grad",
    "safe_update_full_grad_vectorized",
]
