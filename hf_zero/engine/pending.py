"""Stages 1-2: the post-step all-gathers run in the background, and parameters wait for them.

Note:
    * After the optimizer step each rank's updated shards are all-gathered into the full
      parameters (every rank keeps them at stages 1-2). :meth:`PostStepGathers.start` issues
      these all-gathers asynchronously, one unit after another in the order given (the engine
      gives the root first, then the layers in module order, the order the next forward needs
      them), and returns: the step does not wait for them.
    * Each unit's gather is waited for, at the latest, when its values are needed:
        - in the unit's forward pre-hook (:class:`~hf_zero.engine.stages.StageRuntime`), and at
          the end of the model's next forward for every unit still in flight (a unit that did
          not run), so nothing is in flight while backward or the next step writes the buffers;
        - before any operation that reads or writes a parameter of it (see below);
        - before the engine reads or writes the flat buffers itself: the next optimizer step,
          ``flush_pending_update`` (checkpoints, exports, ``gathered_parameters``),
          ``full_state_dict``, ``load_checkpoint``, ``destroy`` (:meth:`wait_all`).
    * Never stale: while its unit's gather is in flight a trainable parameter's class is
      :class:`PendingParameter` (still an ``nn.Parameter``). Its ``__torch_function__`` waits for
      the gather before any operation that is not pure metadata (the ``_METADATA`` set of
      :mod:`hf_zero.engine.access`: shape, dtype, ``.grad``, hooks, ...), so reading a weight
      between steps, a ``state_dict()``, an eval forward or ``generate`` all see the updated
      values. Once the unit's gather is waited for, its parameters are plain ``nn.Parameter``
      again: the forward's operations pay nothing.
    * A unit with a parameter of any other class (a subclass of ``nn.Parameter``) cannot be
      guarded this way and is waited for in :meth:`start`, after every gather is issued. So is
      everything when ``lazy`` is False (the engine passes that for a ``torch.compile``-d model:
      compiled graphs guard on their inputs' classes, and a class change would recompile).
    * Code that bypasses ``__torch_function__`` (C++ extensions called on ``.data_ptr()``
      obtained under ``torch._C.DisableTorchFunctionSubclass``) must call :meth:`wait_all`
      first; the engine's own paths do.
"""

from __future__ import annotations

import weakref
from typing import Dict, List, Sequence, Tuple

import torch
import torch.nn as nn

from .access import _METADATA


class PendingParameter(nn.Parameter):
    """A stage-1/2 parameter whose unit's post-step all-gather is still in flight."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if func not in _METADATA:
            for p in _pending_in(args, kwargs):
                _settle(p)
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **(kwargs or {}))


def _settle(p: torch.Tensor) -> None:
    """Wait for ``p``'s unit's gather (which makes ``p`` a plain parameter again)."""
    acc = getattr(p, "_hf_zero_access", None)
    gathers = getattr(acc.engine, "post_gathers", None) if acc is not None else None
    if gathers is not None:
        gathers.wait(acc.unit)
    if type(p) is PendingParameter:  # a copy of one (deepcopy), or an engine gone: plain again
        p.__class__ = nn.Parameter


def _pending_in(args, kwargs) -> List[torch.Tensor]:
    out = []
    for a in args:
        if type(a) is PendingParameter:
            out.append(a)
        elif isinstance(a, (list, tuple)):
            out += [b for b in a if type(b) is PendingParameter]
    if kwargs:
        out += [v for v in kwargs.values() if type(v) is PendingParameter]
    return out


#: every engine's gathers, for :func:`settle_all` at teardown (weak: an engine dies as usual)
_LIVE: "weakref.WeakSet[PostStepGathers]" = weakref.WeakSet()


def settle_all() -> None:
    """Complete the post-step gathers still in flight in every engine of this process.

    Exit teardown calls this (:mod:`hf_zero.engine.teardown`): an in-flight collective's work
    holds its process group, so a script that ends after ``step()`` without ``engine.destroy()``
    would keep gloo's threads alive into interpreter finalization. Waiting cannot hang: every
    rank issued the same gathers in its ``step()``. If a wait fails (the group is gone), the
    works are dropped instead."""
    for gathers in list(_LIVE):
        try:
            gathers.wait_all()
        except Exception:  # noqa: BLE001 - teardown: drop the works, never raise at exit
            for _, _, params in gathers._pending.values():
                for p in params:
                    if type(p) is PendingParameter:
                        p.__class__ = nn.Parameter
            gathers._pending.clear()


class PostStepGathers:
    """The post-step all-gathers of one engine still in flight, per unit."""

    def __init__(self, comm):
        self.comm = comm  # the shard group's Collectives
        _LIVE.add(self)
        self._pending: Dict[int, Tuple[object, list, List[nn.Parameter]]] = {}  # id(unit) -> (unit, handles, params)

    @property
    def pending(self) -> bool:
        return bool(self._pending)

    def is_pending(self, unit) -> bool:
        return id(unit) in self._pending

    def start(self, units: Sequence, lazy: bool = True) -> None:
        """Issue the all-gather of every trainable flat of ``units``, in that order, and return
        (waiting at once, after all are issued, for the units that cannot be guarded)."""
        self.wait_all()
        now = []
        for u in units:
            if not u.trainable:
                continue
            handles = [self.comm.all_gather(f.full, f.shard, async_op=True) for f in u.trainable]
            params = [p for f in u.trainable for p in f.params]
            self._pending[id(u)] = (u, handles, [])
            if lazy and all(type(p) is nn.Parameter for p in params):
                for p in params:
                    p.__class__ = PendingParameter
                self._pending[id(u)] = (u, handles, params)
            else:
                now.append(u)
        for u in now:
            self.wait(u)

    def wait(self, unit) -> None:
        """Complete ``unit``'s gather (if in flight) and make its parameters plain again."""
        entry = self._pending.pop(id(unit), None)
        if entry is None:
            return
        _, handles, params = entry
        try:
            for h in handles:
                h.wait()
        finally:
            for p in params:
                if type(p) is PendingParameter:
                    p.__class__ = nn.Parameter

    def wait_all(self) -> None:
        """Complete every gather in flight, in the order they were issued."""
        while self._pending:
            self.wait(next(iter(self._pending.values()))[0])
