"""Stage-3 parameters that are safe to touch outside the engine's forward.

Note:
    * At stage 3 a parameter's ``.data`` is a view into its unit's flat buffer, whose storage is
      resized to zero bytes while the unit is sharded. Reading it then would read freed memory
      (a segfault at best). So every stage-3 parameter's class becomes :class:`ShardedParameter`
      (still an ``nn.Parameter``), whose ``__torch_function__`` checks, before any operation
      that reads or writes its values, that its unit is gathered.
    * Metadata (shape, dtype, device, ``requires_grad``, ``numel``, hooks) never needs the
      values and always works.
    * When the unit is not gathered: inside the engine's forward (or a recomputation inside
      backward) the runtime gathers it on demand (a collective; every rank runs the same
      forward) and keeps it gathered until backward ends, because the backward of that use
      reads the values too. Anywhere else the operation raises :class:`ShardedParameterError`,
      naming the parameter and the fix (``hf_zero.gathered_parameters``).
    * Autograd's C++ engine does not go through ``__torch_function__``: backward reads saved
      parameters directly, which is why on-demand gathers stay until backward ends.
    * Operations return plain tensors (the subclass is never propagated to results).
    * :func:`unguarded`: while every unit is pinned gathered (a gather-once ``generate``) the
      parameters are plain ``nn.Parameter`` again, so no operation pays for the check.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Optional

import torch
import torch.nn as nn

from .flat import FlatState


class ShardedParameterError(RuntimeError):
    """A stage-3 parameter's values were used while only this rank's shard is in memory."""


def _getset(*names):
    out = set()
    for n in names:
        d = getattr(torch.Tensor, n, None)
        if d is None or not hasattr(d, "__get__"):
            continue
        out.add(d.__get__)
        if n in ("requires_grad", "grad", "_grad") and hasattr(d, "__set__"):
            out.add(d.__set__)
    return out


# Operations that never read a parameter's values (metadata, autograd bookkeeping, setting
# ``.data`` to a new view).
_METADATA = frozenset(
    _getset("shape", "dtype", "device", "requires_grad", "is_leaf", "grad", "_grad", "grad_fn", "ndim",
            "is_cuda", "is_meta", "is_sparse", "is_quantized", "layout", "names", "retains_grad",
            "_base", "is_nested", "itemsize", "nbytes")
    | {torch.Tensor.data.__set__}
    | {getattr(torch.Tensor, n) for n in (
        "size", "dim", "numel", "nelement", "element_size", "is_floating_point", "is_complex",
        "get_device", "requires_grad_", "register_hook", "register_post_accumulate_grad_hook",
        "__len__", "is_contiguous", "stride", "storage_offset", "retain_grad", "is_shared",
        "is_pinned", "__hash__")}
)


class ParamAccess:
    """Where a parameter lives in the engine: its runtime, unit, flat buffer and name."""

    __slots__ = ("engine", "unit", "flat", "index", "name")

    def __init__(self, engine, unit, flat, index: int):
        self.engine = engine
        self.unit = unit
        self.flat = flat
        self.index = index
        self.name = flat.names[index]


def access_of(p) -> Optional[ParamAccess]:
    return getattr(p, "_hf_zero_access", None)


def _not_ready(a) -> Optional[ParamAccess]:
    if type(a) is ShardedParameter:
        acc = a._hf_zero_access
        if acc.flat.state is not FlatState.GATHERED:
            return acc
    return None


def _first_not_ready(args, kwargs) -> Optional[ParamAccess]:
    for a in args:
        acc = _not_ready(a)
        if acc is not None:
            return acc
        if isinstance(a, (list, tuple)):
            for b in a:
                acc = _not_ready(b)
                if acc is not None:
                    return acc
    if kwargs:
        for a in kwargs.values():
            acc = _not_ready(a)
            if acc is not None:
                return acc
    return None


def sharded_error(name: str, what: str = "used") -> ShardedParameterError:
    return ShardedParameterError(
        f"hf_zero: parameter {name!r} was {what} while it is sharded (ZeRO stage 3): outside the "
        "engine's forward only this rank's shard of it is in memory. Read or modify it inside "
        "`with hf_zero.gathered_parameters(params, modifier_rank=None):` (params: this parameter, a "
        "list of them or module.parameters(); every rank must enter the block; pass modifier_rank=r "
        "to keep the changes rank r makes)."
    )


class ShardedParameter(nn.Parameter):
    """An ``nn.Parameter`` of a stage-3 engine (see the module notes)."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if func not in _METADATA:
            acc = _first_not_ready(args, kwargs)
            while acc is not None:
                if not acc.engine.runtime.gather_on_demand(acc.unit):
                    raise sharded_error(acc.name)
                acc = _first_not_ready(args, kwargs)
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **(kwargs or {}))


@contextmanager
def unguarded(engine) -> Iterator[None]:
    """While every unit of ``engine`` is pinned gathered (a gather-once ``generate``), make its
    parameters plain ``nn.Parameter`` again, so that no operation pays the
    :class:`ShardedParameter` check; they are guarded again on exit, whatever happens."""
    if any(u.pins == 0 or u.state is not FlatState.GATHERED for u in engine.units):
        raise RuntimeError("hf_zero internal: unguarded() needs every unit pinned and gathered")
    params = [p for u in engine.units for f in u.flats if f.sharded for p in f.params
              if type(p) is ShardedParameter]
    for p in params:
        p.__class__ = nn.Parameter
    try:
        yield
    finally:
        for p in params:
            p.__class__ = ShardedParameter


def guard(engine, unit, flat, index: int) -> None:
    """Make parameter ``index`` of ``flat`` a :class:`ShardedParameter` that knows its place."""
    p = flat.params[index]
    p._hf_zero_access = ParamAccess(engine, unit, flat, index)
    if flat.sharded and type(p) is nn.Parameter:
        p.__class__ = ShardedParameter
