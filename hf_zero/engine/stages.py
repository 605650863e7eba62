"""Per-unit runtime and the autograd/module hooks that implement ZeRO stages 0-3.

Note:
    * Gradients: every trainable parameter's ``.grad`` is a view into its unit's flat gradient
      buffer while that buffer is live, so autograd accumulates straight into it (as DDP's
      ``gradient_as_bucket_view``); a post-accumulate-grad hook only counts the arrival. Stages
      0 and 1 keep the buffer for the whole accumulation window (the views are re-bound when a
      backward begins, so ``zero_grad(set_to_none=True)`` or a user's ``p.grad = None`` loses
      nothing). Stage 0 all-reduces at the boundary (``reduce_boundary``); stage 1 reduce-scatters
      each unit during the boundary micro-step's backward, by the reduction rule below (the
      engine sets ``reduce_in_backward``), replacing the shard with the reduction of the whole
      window, and reduces again a unit whose buffer changed after that (a late gradient, another
      ``backward()`` before the step: ``dirty``, agreed by all ranks at the end of backward);
      ``reduce_boundary`` reduces only what no boundary backward did. Stages 2 and 3 take it from a
      pool (:mod:`hf_zero.engine.pool`) when a use of the unit begins in backward, drop the
      views and reduce-scatter it into the rank's shard accumulator as soon as the unit is
      done, then give it back. A gradient that arrives while no view is bound (a buffer dtype
      other than the parameter's, such as fp32 accumulation of bf16 parameters; a parameter
      used outside its unit; a late gradient) is added into the buffer by the hook, and
      ``.grad`` dropped. With ``create_graph=True`` autograd sums out of place; the hook then
      stores the sum into the view (a ``.grad`` set to None in the same backward, before the
      views were re-bound, is not supported there).
    * Stages 1-2, after the step: the all-gathers of the updated shards are left in flight and
      each unit's is waited for in its forward pre-hook, at the end of the next forward, or on
      any read of its parameters (:mod:`hf_zero.engine.pending`, ``post_gathers``).
    * Ordering: every rank must issue the same collectives in the same order. Stages 1-3 reduce
      the units in one fixed *reduction order*, the reverse of the model's module order with the
      root last, the same on every rank whatever each rank's control flow (a unit a rank did not
      run this step is reduced there with a zero gradient, in its place). Reductions are always
      issued as a prefix of that order: a unit that is not ready holds back the ones after it.
    * The reduction rule: a unit is reduced when its gradient is complete for *this* backward.
      Forward counts its *uses*: each call whose outputs require grad (armed until the first
      gradient reaches one of its outputs), and each no-grad call inside a training forward
      (reentrant activation checkpointing: replayed with grad inside backward). A unit is ready
      when no counted use is still to come and either every trainable parameter got its gradient
      after its last use began (a parameter's accumulate-grad hook fires once per graph task, once
      all its uses are summed), or backward has begun another unit's use since (a parameter that
      gets no gradient on this rank: an unused MoE expert counts as zero), or backward ends. A unit
      no use of which is pending or ran in this backward gets no gradient: it is ready at once.
      Uses still armed at an optimizer step (outputs never backwarded) are forgotten there.
    * A gradient that arrives for a unit already reduced in this backward (a use the counting
      missed: a ``retain_graph`` graph run again by ``loss.backward()``, a parameter used outside
      its unit's forward) is kept apart; at the end of backward all ranks agree (one max
      all-reduce of a flag per unit) which units have such *late* gradients, and reduce-scatter
      them, in reduction order, into the shard accumulators. Never an error, never lost.
    * Stage 3 lifecycle per unit: SHARDED -> (gather) -> GATHERED -> (release) -> SHARDED, with
      GATHERING while a prefetch is in flight. Forward gathers each unit on entry (prefetching
      the unit that ran next in the previous step) and releases it on exit; backward gathers on
      the first gradient that reaches the unit's output (prefetching the next unit in backward
      order) and releases it when backward moves past it. The root unit (embeddings, final norm,
      head) is gathered for the whole forward and again for the whole backward. Two all-gathers
      of backward are never issued, because they would move bytes nobody reads:
      - the *carried* unit: the last unit of a training forward, when it is the one the previous
        forward ended with and its outputs require grad, stays gathered from its forward into
        backward, which begins with it (its memory is held while the loss is computed, where the
        gather window is at most the root and two units anyway);
      - a unit that is a plain ``nn.Embedding`` (its class does not override ``forward``):
        its backward scatters the output gradient by index and never reads the weight, so it is
        not gathered in backward (``Unit.backward_reads_weights`` False). Anything else that
        reads its weight in backward (a recomputation, an access) still gathers it.
    * Parameter offload to NVMe (``shard_source``): a gather takes each flat's shard from the
      source (``acquire``) and hands it back once the gather is waited for (``release``); the
      shards of the next ``read_ahead_units`` units in the current order are read in the background
      (``prefetch``) when a unit is gathered, and at the end of forward for backward's first
      units; the root is not released between a training forward and its backward.
    * Activation checkpointing: a forward that runs inside backward (recomputation) gathers its
      unit but never releases it; backward releases it like any other.
    * Use outside the unit's own forward (see :mod:`hf_zero.engine.access`): a parameter whose
      unit is sharded, touched during the engine's forward (a parent module using a child unit's
      weight after the child ran), is gathered on demand and its unit becomes *sticky*: only
      the end of backward (or of a no-grad forward) releases it. A forward output that aliases
      the unit's own parameters (a module returning its weight) is replaced by a copy before
      the unit is released, so the caller never holds freed storage.
    * Pins: a unit with ``pins > 0`` (inside ``hf_zero.gathered_parameters`` or a gather-once
      ``generate``) is never released; the context that pinned it releases it afterwards.
    * torch.compile: the forward pre/post hooks are ``torch._dynamo.disable``-d (:func:`_eager`),
      so in a compiled model they run as plain Python between graphs (a graph break on each side
      of a unit, as FSDP2's hooks); tensor and accumulate-grad hooks run in the autograd engine,
      outside any graph.
    * All collectives go through :class:`~hf_zero.engine.collectives.Collectives`.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.nn as nn

from .collectives import Collectives, Handle
from .flat import FlatParam, FlatState
from .pool import BufferPool


def in_backward() -> bool:
    """True while the autograd engine runs a backward pass on this thread."""
    return torch._C._current_graph_task_id() != -1


def _eager(hook: Callable) -> Callable:
    """``hook`` run outside torch.compile's tracing (``torch._dynamo.disable``): in a compiled
    model it runs as plain Python between two graphs."""
    return torch._dynamo.disable(hook, recursive=True, reason="hf_zero unit hooks run eagerly")


def _tensors_in(obj) -> List[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (list, tuple)):
        return [t for o in obj for t in _tensors_in(o)]
    if isinstance(obj, dict):
        return [t for o in obj.values() for t in _tensors_in(o)]
    if hasattr(obj, "__dict__") and not isinstance(obj, (nn.Module, type)):  # dataclasses, namespaces
        return [t for o in vars(obj).values() for t in _tensors_in(o)]
    return []


def _weights_unread_in_backward(module: nn.Module, is_root: bool) -> bool:
    """A unit whose module is an ``nn.Embedding`` with the stock ``forward``: the gradient of
    an embedding lookup needs the indices and the table's shape, never the table's values."""
    return (not is_root and isinstance(module, nn.Embedding)
            and type(module).forward is nn.Embedding.forward)


class Unit:
    """One unit's flat buffers and its per-step gradient state."""

    def __init__(self, index: int, name: str, module: nn.Module, is_root: bool, flats: Sequence[FlatParam]):
        self.index = index
        self.name = name
        self.module = module
        self.is_root = is_root
        self.flats: List[FlatParam] = list(flats)
        self.trainable: List[FlatParam] = [f for f in self.flats if f.trainable]
        self.handles: List[Handle] = []
        self.in_flight: List[torch.Tensor] = []  # inputs of gathers not yet waited for
        self.sourced: List[tuple] = []  # (flat, copy event) whose host shard the gather holds
        # gradients
        self.grad_full: Dict[int, Optional[torch.Tensor]] = {}  # flat index -> full-size grad buffer
        self.grad_shard: Dict[int, Optional[torch.Tensor]] = {}  # flat index -> shard accumulator
        self.grad_bound: Dict[int, torch.Tensor] = {}  # flat index -> buffer the params' .grad view
        self.expected = {id(p) for f in self.trainable for p in f.params}
        self.waiting: set = set()
        self.reduced = False
        self.fresh: set = set()  # flat indices whose shard accumulator holds zeros
        self.stale: set = set()  # ... of which the memory is not zeroed yet (done when read)
        # the reduction rule (see the module docstring)
        self.pending_uses = 0  # armed forward uses whose backward has not begun
        self.silent_uses = 0  # no-grad calls in a training forward, to be replayed in backward
        self.replaying = False  # the recomputation now running replays a silent use
        self.active = False  # a use of it began in this backward
        self.start_event = -1  # the runtime's event count when its latest use began
        self.complete = False  # reduced because every parameter's gradient had arrived
        self.late: Dict[int, torch.Tensor] = {}  # flat index -> gradient that came after reduction
        self.dirty = False  # stage 1: a gradient reached its full buffer after its reduction began
        self.pins = 0  # open gathered_parameters contexts (and gather-once generates) holding it
        self.sticky = False  # gathered on demand in this forward: kept until backward ends
        self.carried = False  # stage 3: kept gathered from the end of forward into backward
        # stage 3: whether its backward reads its weights (False: a plain nn.Embedding)
        self.backward_reads_weights = not _weights_unread_in_backward(module, is_root)
        self.secondary: Dict[int, torch.Tensor] = {}  # hpZ: flat index -> secondary shard (hierarchy.py)
        self.keep_secondary = False  # hpZ: the gather in flight is a training forward's

    @property
    def state(self) -> FlatState:
        return self.flats[0].state if self.flats else FlatState.GATHERED


class _Use:
    """One forward call of a unit whose outputs require grad. ``armed`` while it counts in the
    unit's ``pending_uses``; ``started`` once backward reached one of its outputs."""

    __slots__ = ("unit", "armed", "started")

    def __init__(self, unit: Unit):
        self.unit = unit
        self.armed = False
        self.started = False


class StageRuntime:
    """Installs the hooks for one stage and runs the unit lifecycle they drive."""

    def __init__(
        self,
        units: Sequence[Unit],
        comm: Collectives,
        *,
        stage: int,
        comm_dtype: Optional[torch.dtype],
        accum_dtype: Optional[torch.dtype],
        predivide: float,
        prefetch: bool = True,
        shard_source=None,
        check_unit_order: bool = True,
        hierarchy=None,
    ):
        self.units = list(units)
        self.comm = comm
        self.stage = stage
        self.comm_dtype = comm_dtype
        self.accum_dtype = accum_dtype
        self.predivide = predivide
        self.prefetch_enabled = prefetch and stage == 3
        # stage 3: before each all-gather, all ranks agree that they gather the same unit
        self.check_unit_order = check_unit_order and stage == 3 and comm.world_size > 1
        # Stage 3 with parameter offload to NVMe: shards come from here (acquire / release /
        # prefetch / read_ahead_units, see hf_zero.offload.param_swap).
        self.shard_source = shard_source
        # MiCS / ZeRO++ (hf_zero.engine.hierarchy): sharded data collectives go through it
        self.hierarchy = hierarchy
        self.root = next(u for u in self.units if u.is_root)
        self._slot: Dict[int, tuple] = {}
        for u in self.units:
            for fi, f in enumerate(u.flats):
                for pi, p in enumerate(f.params):
                    self._slot[id(p)] = (u, fi, pi)
        self._hook_handles: list = []
        self.forward_order: List[Unit] = []
        self.last_forward_order: List[Unit] = []
        self.backward_order: List[Unit] = []  # expected execution order (stage 3 prefetch)
        # stages 2-3 reduce in this order on every rank (see the module docstring)
        self.reduce_order: List[Unit] = [u for u in reversed(self.units) if not u.is_root] + [self.root]
        self._reduced_upto = 0
        self._event = 0  # counts use starts in backward
        self._training_forward = False  # inside a grad-enabled forward of the root
        self.retain_uses = False  # engine.backward(retain_graph=True): the graph may run again
        self._started: List[_Use] = []  # uses begun in this backward
        self.last_late: List[Unit] = []  # units reduced late at the end of the last backward
        self.reduced_early = 0  # units the last backward reduced before its end (overlap)
        self._in_backward_step = False
        self.on_backward_end: Optional[Callable[[], None]] = None
        self.on_unit_reduced: Optional[Callable[[Unit], None]] = None  # e.g. start its CPU step
        self.post_gathers = None  # stages 1-2: the post-step all-gathers in flight (pending.py)
        self._pending: list = []  # reduce-scatters in flight: (handle, full, out, acc, direct, recycle)
        self.in_forward = False  # between the root's forward pre-hook and its forward hook
        self.hooks_suspended = False  # forward hooks do nothing (a gather-once generate: all pinned)
        self.max_pending_reductions = 2  # full gradient buffers kept alive by them, at most
        # stage 1: the engine sets this for a backward at the accumulation boundary; each unit is
        # then reduce-scattered in backward as soon as its gradient is complete (as at stage 2)
        self.reduce_in_backward = False
        self._reducing = stage >= 2  # this backward reduces units as they complete
        # stage 1: the last backward left every unit's reduced shard up to date (nothing to do
        # at the boundary); False once any gradient may have changed since
        self.shards_current = False
        self._reduced_versions: Dict[tuple, int] = {}
        # stages 2-3: the per-backward full gradient buffers, reused (see hf_zero.engine.pool)
        self.grad_pool = BufferPool(keep=self.max_pending_reductions + 2)
        # stage 3: bytes of gathered (or gathering) flats now, and the most at once since
        # reset_gather_peak() (the bound docs/engine.md states; see tests/test_stage3_memory.py)
        self.gathered_bytes = 0
        self.peak_gathered_bytes = 0

    # ------------------------------------------------------------------------------ install
    def install(self) -> None:
        self._allocate_persistent_grads()
        for u in self.units:
            # torch.compile: the hooks run eagerly (a graph break on each side of every unit, as
            # FSDP2 does with its hooks); traced, their collectives and Python state would break
            # the graph at random points and recompile on every change of a unit's state
            self._hook_handles.append(u.module.register_forward_pre_hook(_eager(self._make_pre_forward(u))))
            self._hook_handles.append(u.module.register_forward_hook(_eager(self._make_post_forward(u))))
            for f in u.trainable:
                for p in f.params:
                    self._hook_handles.append(p.register_post_accumulate_grad_hook(self._on_grad))

    def _allocate_persistent_grads(self) -> None:
        """Stages 0-1 keep full gradient buffers, stages 2-3 shard accumulators, for good."""
        for u in self.units:
            for fi, f in enumerate(u.flats):
                if not f.trainable:
                    continue
                if self.stage <= 1:
                    dtype = self.accum_dtype or f.dtype
                    u.grad_full[fi] = torch.zeros(f.padded_numel, dtype=dtype, device=f.device)
                    self._bind_grads(u, fi, u.grad_full[fi])
                else:
                    self._shard_accumulator(u, fi)

    # ------------------------------------------------------------------------------ grad views
    @staticmethod
    def _bind_grads(unit: Unit, fi: int, buf: torch.Tensor) -> None:
        """Make every parameter's ``.grad`` of flat ``fi`` a view into ``buf``, so autograd
        accumulates straight into the flat gradient buffer (no copy in :meth:`_on_grad`).
        Only where ``buf`` has the parameters' dtype (a gradient must); else the hook copies."""
        f = unit.flats[fi]
        if buf.dtype != f.dtype:
            return
        for pi, p in enumerate(f.params):
            p.grad = f.param_view(buf, pi)
        unit.grad_bound[fi] = buf

    @staticmethod
    def _unbind_grads(unit: Unit, fi: int) -> None:
        """Drop the ``.grad`` views into flat ``fi``'s gradient buffer (before it is reduced and
        recycled, so nobody reads it afterwards through a parameter)."""
        if unit.grad_bound.pop(fi, None) is not None:
            for p in unit.flats[fi].params:
                p.grad = None

    def _bind_unit_grads(self, unit: Unit) -> None:
        """Stages 2-3, a use of ``unit`` begins in backward: its per-backward gradient buffers
        (from the pool) and the ``.grad`` views into them, unless it was reduced already (a
        gradient now is late and goes through the hook's copy)."""
        if unit.reduced:
            return
        for fi, f in enumerate(unit.flats):
            if f.trainable and fi not in unit.grad_bound:
                buf = unit.grad_full.get(fi)
                if buf is None:
                    buf = self.grad_pool.take(f.padded_numel, self.comm_dtype or f.dtype, f.device)
                    unit.grad_full[fi] = buf
                self._bind_grads(unit, fi, buf)

    def _rebind_persistent_grads(self) -> None:
        """Stages 0-1, a backward begins: the ``.grad`` views into the persistent buffers
        again (``zero_grad(set_to_none=True)`` or the user may have set ``.grad`` to None;
        the buffers keep what was accumulated)."""
        for u in self.units:
            for fi, buf in u.grad_full.items():
                self._bind_grads(u, fi, buf)

    def zero_grads(self) -> None:
        for u in self.units:
            if self.stage <= 1:
                for t in u.grad_full.values():
                    t.zero_()
                u.grad_shard.clear()  # stage 1: the boundary's reduce-scatter output
                self.shards_current = False
            else:
                for fi in list(u.grad_bound):
                    self._unbind_grads(u, fi)
                u.grad_full.clear()  # per-backward buffers
                u.late.clear()
                for fi in u.grad_shard:
                    u.fresh.add(fi)  # the first reduce-scatter overwrites it: zeroed only if read
                    u.stale.add(fi)

    def remove(self) -> None:
        for h in self._hook_handles:
            h.remove()
        self._hook_handles.clear()

    # ------------------------------------------------------------------------------ gather
    def gather(self, unit: Unit, async_op: bool = False) -> None:
        if self.stage != 3:
            return
        if unit.state is FlatState.GATHERED:
            return
        if unit.state is FlatState.GATHERING:
            self.wait(unit)
            return
        self._agree_on_unit(unit)
        hpz = self.hierarchy is not None and self.hierarchy.hpz is not None
        backward = self._in_backward_step or in_backward()
        unit.keep_secondary = hpz and not backward and self._training_forward
        for fi, f in enumerate(unit.flats):
            f.alloc_full()
            self.gathered_bytes += f.padded_numel * f.full.element_size()
            host = f.shard if self.shard_source is None else self.shard_source.acquire(f)
            # an offloaded shard comes up to the device first; the copy lives until the wait
            shard = host if host.device == f.full.device else host.to(f.full.device, non_blocking=True)
            if self.shard_source is not None:
                event = None
                if shard is not host and shard.is_cuda:
                    event = torch.cuda.Event()
                    event.record()
                unit.sourced.append((f, event))
            with torch.no_grad(), torch.autograd._unsafe_preserve_version_counter(f.full):
                if self.hierarchy is None:
                    unit.handles.append(self.comm.all_gather(f.full, shard, async_op=async_op))
                else:  # hpZ: backward gathers the secondary shards inside the node
                    secondary = unit.secondary.get(fi) if backward else None
                    unit.handles.append(self.hierarchy.gather_params(f.full, shard, secondary, async_op))
            unit.in_flight.append(shard)
            f.state = FlatState.GATHERING
        if not async_op:
            self.wait(unit)

    def _agree_on_unit(self, unit: Unit) -> None:
        """Stage 3: every rank must gather the same unit at the same point, or the all-gathers
        pair different units' shards (wrong weights, or a size mismatch that aborts gloo).
        Ranks that run different units (rank-dependent control flow: a layer skipped on one
        rank, LayerDrop with per-rank randomness) are not supported at stage 3, so one small
        control all-reduce of every rank's unit index, before the data moves, turns that into
        the same clear error on every rank."""
        if not self.check_unit_order:
            return
        device = unit.flats[0].device if unit.flats else torch.device("cpu")
        mine = torch.zeros(self.comm.world_size, dtype=torch.int64, device=device)
        mine[self.comm.rank] = unit.index + 1
        self.comm.all_reduce(mine, op="sum", control=True)
        seen = mine.tolist()
        if any(i != unit.index + 1 for i in seen):
            by_index = {u.index + 1: u.name for u in self.units}
            what = ", ".join(f"rank {r}: {by_index.get(i, 'nothing')}" for r, i in enumerate(seen))
            raise RuntimeError(
                f"hf_zero: ZeRO stage 3 needs every rank to run the same units in the same order, but the "
                f"ranks are about to gather different units ({what}). The model's control flow depends on "
                "the rank or its data (a layer skipped on some ranks, LayerDrop with per-rank randomness): "
                "use stage 2 (which supports it), or make the choice the same on every rank (e.g. seed "
                "LayerDrop's generator identically on all ranks)"
            )

    def wait(self, unit: Unit) -> None:
        for h in unit.handles:
            h.wait()
        unit.handles.clear()
        unit.in_flight.clear()
        for f, event in unit.sourced:
            self.shard_source.release(f, event)
        unit.sourced.clear()
        for fi, f in enumerate(unit.flats):
            f.state = FlatState.GATHERED
            if unit.keep_secondary:
                unit.secondary[fi] = f.full[self.hierarchy.secondary_slice(f.padded_numel)].clone()
        unit.keep_secondary = False

    def read_ahead_for_forward(self) -> None:
        """After an optimizer step: start reading the root's and the first units' shards for
        the next forward (assumed to run in this step's order)."""
        if self.shard_source is not None:
            order = [self.root] + (self.forward_order or self.last_forward_order)
            self._read_ahead(order, 0, count=1 + self.shard_source.read_ahead_units)

    def _read_ahead(self, order: List[Unit], start: int, count: Optional[int] = None) -> None:
        """Parameter offload to NVMe: start reading the shards of ``count`` units (default: the
        source's read-ahead) from ``order[start]`` on, those not gathered."""
        if self.shard_source is None:
            return
        upcoming = order[start : start + (count or self.shard_source.read_ahead_units)]
        self.shard_source.prefetch([f for u in upcoming if u.state is FlatState.SHARDED for f in u.flats])

    def release(self, unit: Unit, force: bool = False) -> None:
        """Free ``unit``'s gathered parameters, unless it is pinned, or sticky (gathered on
        demand in this forward) and not ``force``-d."""
        if self.stage != 3 or unit.state is FlatState.SHARDED or unit.pins:
            return
        if unit.sticky and not force:
            return
        self.wait(unit)
        unit.sticky = False
        unit.carried = False
        self.peak_gathered_bytes = max(self.peak_gathered_bytes, self.gathered_bytes)
        for f in unit.flats:
            f.free_full()
            self.gathered_bytes -= f.padded_numel * f.full.element_size()

    def reset_gather_peak(self) -> int:
        """The most bytes gathered at once since the last call (stage 3); starts a new count."""
        peak = max(self.peak_gathered_bytes, self.gathered_bytes)
        self.peak_gathered_bytes = self.gathered_bytes
        return peak

    def release_all(self) -> None:
        for u in self.units:
            self.release(u, force=True)

    def gather_on_demand(self, unit: Unit) -> bool:
        """A parameter of sharded ``unit`` is used by an operation. Inside the engine's forward
        (or a recomputation in backward) gather the unit and keep it until backward ends
        (True); elsewhere nothing can be gathered safely (False: the caller raises)."""
        if self.stage != 3 or not (self.in_forward or in_backward()):
            return False
        self.gather(unit)
        unit.sticky = True
        return True

    # ------------------------------------------------------------------------------ forward
    def _make_pre_forward(self, unit: Unit):
        def hook(module, args):
            if self.hooks_suspended:
                return None
            if self.post_gathers is not None and self.post_gathers.pending:
                self.post_gathers.wait(unit)  # stages 1-2: its updated weights, before it runs
            if in_backward():  # activation-checkpoint recomputation
                self._note_replay(unit)
                self.gather(unit)
                return None
            if unit.is_root:
                self.last_forward_order = self.forward_order or self.last_forward_order
                self.forward_order = []
                self._training_forward = torch.is_grad_enabled()
                self.in_forward = True
            else:
                self.forward_order.append(unit)
                if self._training_forward and not torch.is_grad_enabled():
                    unit.silent_uses += 1  # reentrant checkpointing: replayed in backward
            self.gather(unit)
            order = self.last_forward_order  # this forward is expected to follow the last one
            nxt = 0 if unit.is_root else self._after(order, unit)
            self._read_ahead(order, nxt)
            if self.prefetch_enabled and not unit.is_root and nxt < len(order):
                self.gather(order[nxt], async_op=True)
            return None

        return hook

    def _make_post_forward(self, unit: Unit):
        def hook(module, args, output):
            if self.hooks_suspended:
                return None
            if in_backward():
                # Recomputation inside backward: keep the unit gathered; its backward follows.
                if unit is not self.root:
                    self._register_output_hooks(unit, output, armed=unit.replaying)
                    unit.replaying = False
                return None
            if unit.is_root:
                self._training_forward = False
                self.in_forward = False
                if self.post_gathers is not None:  # units that did not run: before backward
                    self.post_gathers.wait_all()
                grad = torch.is_grad_enabled()
                last = self.forward_order[-1] if self.forward_order else None
                for u in self.units:  # prefetched but not run this time (and, without grad, sticky)
                    if u is not self.root and not (grad and u.carried and u is last):
                        self.release(u, force=not grad)
                if grad:  # backward starts with the last units of this forward
                    self._read_ahead(self.forward_order[::-1], 0)
            replaced = self._copy_aliases(unit, output) if self.stage == 3 else None
            if replaced is not None:
                output = replaced
            hooked = torch.is_grad_enabled() and self._register_output_hooks(unit, output)
            # The root stays gathered until backward ends when its outputs cannot be seen, and,
            # with shards on NVMe, always after a training forward: backward needs it first, so
            # keeping it saves a read of the (usually largest) unit per step.
            if not (unit.is_root and torch.is_grad_enabled() and (not hooked or self.shard_source is not None)):
                if hooked and self._carries(unit):
                    unit.carried = True  # backward begins with it: no release, no second gather
                else:
                    self.release(unit, force=unit.is_root and not torch.is_grad_enabled())
            return replaced

        return hook

    def _carries(self, unit: Unit) -> bool:
        """Stage 3: keep ``unit`` gathered into backward, as the last unit of a training forward
        that ends as the previous one did (all ranks run the same units in the same order)."""
        return (self.stage == 3 and self._training_forward and not unit.is_root and unit.backward_reads_weights
                and not unit.pins and bool(self.last_forward_order) and unit is self.last_forward_order[-1])

    def regathered_in_backward(self) -> List[Unit]:
        """Stage 3, in the steady state (a training forward in the last one's order): the units
        backward all-gathers again. The root, and every unit of that forward except the one it
        ends with (carried into backward, see ``_carries``) and plain embeddings (their backward
        reads no weight). The counters' reference for ``memory_report`` and the benchmarks."""
        order = self.forward_order or self.last_forward_order
        carried = order[-1] if order else None
        return [self.root] + [u for u in order if u is not carried and u.backward_reads_weights]

    @staticmethod
    def _copy_aliases(unit: Unit, output):
        """``output`` with every tensor that shares storage with ``unit``'s flat buffers (its
        own parameters or views of them) replaced by a copy (differentiable, so gradients still
        reach the parameters), or None when nothing aliases them."""
        storages = {f.full.untyped_storage().data_ptr() for f in unit.flats}
        storages.discard(0)
        if not storages:
            return None
        changed = []

        def fix(obj):
            if isinstance(obj, torch.Tensor):
                if obj.untyped_storage().data_ptr() in storages:
                    changed.append(True)
                    return obj.clone()
                return obj
            if type(obj) in (tuple, list):
                return type(obj)(fix(o) for o in obj)
            if isinstance(obj, dict):  # in place: keeps dict subclasses (ModelOutput) intact
                for k in list(obj.keys()):
                    v = fix(obj[k])
                    if v is not obj[k]:
                        obj[k] = v
                return obj
            return obj

        with torch._C.DisableTorchFunctionSubclass():
            out = fix(output)
        return out if changed else None

    def _register_output_hooks(self, unit: Unit, output, armed: bool = True) -> bool:
        """Hook every output of this call that requires grad; with ``armed``, count the call as
        a use of ``unit`` whose backward is to come. False when no output requires grad."""
        use = _Use(unit)
        hooked = False
        for t in _tensors_in(output):
            if t.requires_grad:
                t.register_hook(lambda grad, use=use: self._pre_backward(use))
                hooked = True
        if hooked and armed:
            use.armed = True
            unit.pending_uses += 1
        return hooked

    def _note_replay(self, unit: Unit) -> None:
        """A forward of ``unit`` inside backward: if a silent use (a no-grad call of a training
        forward) is waiting, this recomputation replays it and its outputs' use will count."""
        if unit.silent_uses > 0 and not unit.replaying:
            unit.silent_uses -= 1
            unit.replaying = True
            # backward has moved on to this unit: reduce what is ready before it gathers, as a
            # use start does, so every rank issues the same reductions before this all-gather
            self._begin_backward()
            self._event += 1
            self._advance()

    @staticmethod
    def _after(order: List[Unit], unit: Unit) -> int:
        """The position just after ``unit`` in ``order`` (``len(order)`` if it is not there)."""
        return next((i + 1 for i, u in enumerate(order) if u is unit), len(order))

    # ------------------------------------------------------------------------------ backward
    def _begin_backward(self) -> None:
        if self._in_backward_step:
            return
        self._in_backward_step = True
        seen, order = set(), []
        for u in reversed(self.forward_order):
            if id(u) not in seen:
                seen.add(id(u))
                order.append(u)
        # Units of this step that never ran go after, in module order, then the root.
        order += [u for u in reversed(self.units) if id(u) not in seen and not u.is_root]
        self.backward_order = order + [self.root]
        self._reduced_upto = 0
        self.reduced_early = 0
        self._reducing = self.stage >= 2 or (self.stage == 1 and self.reduce_in_backward)
        self.shards_current = False
        if self.stage <= 1:
            self._rebind_persistent_grads()
        for u in self.units:
            u.waiting = set(u.expected)
            u.reduced = False
            u.dirty = False
            u.active = False
            u.complete = False
        torch.autograd.Variable._execution_engine.queue_callback(self._end_of_backward_callback)

    def _end_of_backward_callback(self) -> None:
        if self.on_backward_end is not None:
            self.on_backward_end()

    def _pre_backward(self, use: _Use) -> None:
        """The first gradient reached an output of ``use``: its unit's backward use begins."""
        self._begin_backward()
        unit = use.unit
        if not use.started:  # (else: another output of a use already begun)
            use.started = True
            self._started.append(use)
            if use.armed:
                use.armed = False
                unit.pending_uses -= 1
            unit.waiting = set(unit.expected)
        # An event: units whose last use began before it are done (if their countdown did not
        # say so already). Every all-gather in backward follows an event and the reductions it
        # makes ready, so all ranks issue the same reductions between two all-gathers.
        self._event += 1
        unit.start_event = self._event
        unit.active = True
        if self.stage >= 2:
            self._bind_unit_grads(unit)
        if unit.is_root:
            self.gather(unit)
            return
        pos = self._position(unit)
        self._release_before(pos)
        self._advance()
        if unit.backward_reads_weights:
            self.gather(unit)
        upcoming = [u for u in self.backward_order[pos + 1 : -1] if u.backward_reads_weights]
        self._read_ahead(upcoming, 0)
        if self.prefetch_enabled and upcoming:
            self.gather(upcoming[0], async_op=True)

    def _position(self, unit: Unit) -> int:
        for i, u in enumerate(self.backward_order):
            if u is unit:
                return i
        raise RuntimeError(f"unit {unit.name} is not in this step's backward order")

    def _release_before(self, pos: int) -> None:
        """Stage 3: free the units before ``pos`` in the backward order (backward moved past
        them; one used again later in this backward is gathered again then)."""
        for u in self.backward_order[:pos]:
            if not u.is_root:
                self.release(u)

    def _on_grad(self, param: nn.Parameter) -> None:
        g = param.grad  # before _begin_backward, which may re-bind the views
        self._begin_backward()
        unit, fi, pi = self._slot[id(param)]
        f = unit.flats[fi]
        bound = unit.grad_bound.get(fi)
        late = False
        if bound is not None:
            # ``.grad`` viewed the flat buffer: autograd accumulated in place, nothing to do.
            # Otherwise ``.grad`` was set to None since (autograd stored this backward's
            # gradient alone: add it), or ``create_graph=True`` (grad mode on) made the sum
            # out of place (it holds what the buffer had: store it).
            view = f.param_view(bound, pi)
            if g is None or g.data_ptr() != view.data_ptr():
                summed = torch.is_grad_enabled()  # create_graph: autograd's out-of-place sum
                with torch.no_grad():
                    if g is not None:
                        view.copy_(g) if summed else view.add_(g)
                param.grad = view
        else:
            late = unit.reduced and self.stage >= 2
            store = unit.late if late else unit.grad_full
            buf = store.get(fi)
            if buf is None:
                if late:
                    buf = torch.zeros(f.padded_numel, dtype=self.comm_dtype or f.dtype, device=f.device)
                elif self.stage >= 2:
                    buf = self.grad_pool.take(f.padded_numel, self.comm_dtype or f.dtype, f.device)
                else:
                    buf = torch.zeros(f.padded_numel, dtype=self.accum_dtype or f.dtype, device=f.device)
                store[fi] = buf
            with torch.no_grad():
                f.param_view(buf, pi).add_(param.grad)
            param.grad = None
        if late:
            return
        if self.stage == 1 and unit.reduced:
            unit.dirty = True  # its reduce-scatter may have missed this: redone at the end
            return
        unit.waiting.discard(id(param))
        # The root's parameters (head, embeddings) can be done long before the layers', so only
        # the end of backward reduces the root.
        if self._reducing and not unit.waiting and not unit.is_root:
            self._advance()

    def _ready(self, unit: Unit) -> bool:
        """Whether ``unit``'s gradient is complete for this backward (the module docstring)."""
        if unit.pending_uses > 0 or unit.silent_uses > 0 or unit.replaying:
            return False
        if not unit.active or not unit.waiting:
            return True
        return self._event > unit.start_event  # backward began another unit's use since

    def _advance(self) -> None:
        """Stages 2-3 (and stage 1 at the accumulation boundary): reduce, in reduction order,
        the ready units from the first one not yet reduced (the root waits for the end of
        backward)."""
        if not self._reducing:
            return
        last = len(self.reduce_order) - 1
        while self._reduced_upto < last and self._ready(self.reduce_order[self._reduced_upto]):
            self._reduce_next()
            self.reduced_early += 1

    def _reduce_next(self) -> None:
        unit = self.reduce_order[self._reduced_upto]
        self._reduced_upto += 1
        unit.complete = (unit.active and not unit.waiting and unit.pending_uses == 0
                         and unit.silent_uses == 0 and not unit.replaying)
        self.reduce_unit(unit)
        unit.reduced = True
        if self.on_unit_reduced is not None and self.stage >= 2:
            self.wait_reductions()
            self.on_unit_reduced(unit)

    def finish_backward(self) -> None:
        """Reduce everything not reduced yet (and what came late), release every unit, and
        forget this backward's uses. Idempotent."""
        if not self._in_backward_step:
            return
        if self.stage >= 2:
            while self._reduced_upto < len(self.reduce_order):
                self._reduce_next()
            self.wait_reductions()
            self.last_late = self._reduce_late()
            self.grad_pool.trim()
        elif self._reducing:  # stage 1 at the boundary: the rest, then what changed after
            while self._reduced_upto < len(self.reduce_order):
                self._reduce_next()
            self.wait_reductions()
            self.last_late = self._reduce_dirty()
            self.shards_current = True
            # what the shards were reduced from: a later in-place change of a buffer (a user's
            # ``p.grad.mul_``, ``safe_set_full_grad``) bumps its version and is reduced again
            self._reduced_versions = self._grad_versions()
        self.release_all()
        for u in self.units:
            u.secondary.clear()  # hpZ: a secondary shard serves one forward's backward
        for use in self._started:
            use.started = False
            if self.retain_uses and not use.armed:  # its graph may run backward again
                use.armed = True
                use.unit.pending_uses += 1
        self._started.clear()
        for u in self.units:
            u.active = False
        self._in_backward_step = False

    def _agreed(self, mine: List[bool]) -> List[Unit]:
        """The units of the reduction order flagged (``mine``, one flag per unit) on any rank:
        one max all-reduce of the flags (control)."""
        order = self.reduce_order
        if self.comm.world_size > 1:
            device = next((f.device for u in self.units for f in u.flats), torch.device("cpu"))
            flags = torch.tensor([1.0 if m else 0.0 for m in mine], device=device)
            self.comm.all_reduce(flags, op="max", control=True)
            mine = [flag > 0 for flag in flags.tolist()]
        return [u for u, m in zip(order, mine) if m]

    def _reduce_dirty(self) -> List[Unit]:
        """Stage 1, end of a boundary backward: all ranks agree which units got gradients after
        their reduce-scatter was issued, and reduce-scatter those again (their full buffers hold
        every gradient of the window, so the new result replaces the old)."""
        dirty = self._agreed([u.dirty for u in self.reduce_order])
        for unit in dirty:
            self._reduce_full(unit)
            unit.dirty = False
        self.wait_reductions()
        return dirty

    def _reduce_late(self) -> List[Unit]:
        """Stages 2-3, end of backward: all ranks agree which units got gradients after their
        reduction, and reduce-scatter those (zeros where a rank has none) in reduction order."""
        late = self._agreed([bool(u.late) for u in self.reduce_order])
        for unit in late:
            for fi, f in enumerate(unit.flats):
                if not f.trainable:
                    continue
                full = unit.late.pop(fi, None)
                if full is None:
                    full = torch.zeros(f.padded_numel, dtype=self.comm_dtype or f.dtype, device=f.device)
                self._reduce_scatter_into(unit, fi, full, async_op=True)
        self.wait_reductions()
        return late

    def new_step(self) -> None:
        """After an optimizer step: forget uses still counted (forward outputs never
        backwarded), so they cannot hold back the next step's reductions."""
        for u in self.units:
            u.secondary.clear()  # hpZ: the weights change at the step
            u.pending_uses = 0
            u.silent_uses = 0
            u.replaying = False
        self._training_forward = False

    # ------------------------------------------------------------------------------ reduction
    def _shard_accumulator(self, unit: Unit, fi: int) -> torch.Tensor:
        acc = unit.grad_shard.get(fi)
        if acc is None:
            f = unit.flats[fi]
            acc = torch.empty(f.shard_numel, dtype=self.accum_dtype or f.dtype, device=f.device)
            unit.grad_shard[fi] = acc
            unit.fresh.add(fi)
            unit.stale.add(fi)
        return acc

    def grad_shard(self, unit: Unit, fi: int) -> Optional[torch.Tensor]:
        """Stages 1-3: this rank's reduced gradient shard of flat ``fi`` (None if it has none)."""
        acc = unit.grad_shard.get(fi)
        if acc is not None and fi in unit.stale:
            acc.zero_()
            unit.stale.discard(fi)
        return acc

    def _reduce_scatter_into(self, unit: Unit, fi: int, full: torch.Tensor, async_op: bool = False,
                             recycle: bool = False) -> None:
        """Average ``full`` over ranks into this rank's shard accumulator (first reduction of a
        window: straight into it; later ones: through a temporary and an add). With
        ``async_op`` the collective runs while backward goes on; :meth:`wait_reductions`
        completes it (``full`` stays referenced until then, and with ``recycle`` goes back to the
        gradient pool after)."""
        f = unit.flats[fi]
        if self.predivide != 1.0:
            full.div_(self.predivide)
        acc = self._shard_accumulator(unit, fi)
        direct = fi in unit.fresh and acc.dtype == full.dtype
        if not direct and fi in unit.stale:
            acc.zero_()
        unit.stale.discard(fi)  # (direct: the reduce-scatter writes all of it)
        out = acc if direct else torch.empty(f.shard_numel, dtype=full.dtype, device=full.device)
        if self.hierarchy is None:  # a recycled (pooled) buffer is not read again: gloo may overwrite it
            handle = self.comm.reduce_scatter(out, full, async_op=async_op, scratch=recycle)
        else:  # MiCS: inside the shard group; qgZ: quantized, node first
            handle = self.hierarchy.reduce_scatter(out, full, async_op=async_op)
        unit.fresh.discard(fi)
        self._pending.append((handle, full, out, acc, direct, recycle))
        if not async_op or len(self._pending) > self.max_pending_reductions:
            self.wait_reductions(keep=0 if not async_op else self.max_pending_reductions)

    def wait_reductions(self, keep: int = 0) -> None:
        """Complete the oldest pending reduce-scatters until at most ``keep`` remain."""
        post = self.comm.world_size / self.predivide
        while len(self._pending) > keep:
            handle, full, out, acc, direct, recycle = self._pending.pop(0)
            handle.wait()
            if self.hierarchy is not None:
                self.hierarchy.finish_gradient(out)  # MiCS: sum over the replicas
            if recycle:
                self.grad_pool.give(full)
            if post != 1.0:
                out.div_(post)
            if not direct:
                acc.add_(out)

    def reduce_unit(self, unit: Unit) -> None:
        """Stage 2/3: reduce-scatter this backward's gradients of ``unit`` into the shards
        (stage 1: the window's gradients, see :meth:`_reduce_full`)."""
        if self.stage == 1:
            self._reduce_full(unit)
            return
        for fi, f in enumerate(unit.flats):
            if not f.trainable:
                continue
            self._unbind_grads(unit, fi)
            full = unit.grad_full.pop(fi, None)
            if full is None:
                full = self.grad_pool.take(f.padded_numel, self.comm_dtype or f.dtype, f.device)
            self._reduce_scatter_into(unit, fi, full, async_op=True, recycle=True)

    def _reduce_full(self, unit: Unit) -> None:
        """Stage 1: reduce-scatter (asynchronously) ``unit``'s persistent full gradient buffers,
        which hold the whole accumulation window, *replacing* its shard accumulators. The buffers
        stay the parameters' ``.grad`` (unreduced, as before): a prescale or a cast to
        ``communication_data_type`` works on a copy."""
        for fi, f in enumerate(unit.flats):
            if not f.trainable:
                continue
            full = unit.grad_full.get(fi)
            if full is None:
                full = torch.zeros(f.padded_numel, dtype=self.accum_dtype or f.dtype, device=f.device)
                unit.grad_full[fi] = full
            if self.comm_dtype not in (None, full.dtype):
                work = full.to(self.comm_dtype)
            else:
                work = full.clone() if self.predivide != 1.0 else full
            if fi in unit.grad_shard:  # overwritten, not added to
                unit.fresh.add(fi)
                unit.stale.add(fi)
            self._reduce_scatter_into(unit, fi, work, async_op=True)

    def _grad_versions(self) -> Dict[tuple, int]:
        return {(u.index, fi): t._version for u in self.units for fi, t in u.grad_full.items()}

    def reduce_boundary(self) -> None:
        """Stages 0-1, at the accumulation boundary: average the accumulated full gradients
        (stage 0: all-reduce; stage 1: reduce-scatter, unless the boundary backward did already,
        :attr:`shards_current`)."""
        if self.stage == 1:
            if not self.shards_current:
                todo = self.reduce_order
            else:  # the boundary backward reduced them all: only buffers changed since, agreed
                now, then = self._grad_versions(), self._reduced_versions
                todo = self._agreed([any(now.get((u.index, fi)) != then.get((u.index, fi)) for fi in u.grad_full)
                                     for u in self.reduce_order])
            for unit in todo:
                self._reduce_full(unit)
            self.wait_reductions()
            self.shards_current = False
            return
        n = self.comm.world_size
        for unit in self.units:
            for fi, f in enumerate(unit.flats):
                if not f.trainable:
                    continue
                full = unit.grad_full.get(fi)
                if full is None:
                    full = torch.zeros(f.padded_numel, dtype=self.accum_dtype or f.dtype, device=f.device)
                    unit.grad_full[fi] = full
                work = full if self.comm_dtype in (None, full.dtype) else full.to(self.comm_dtype)
                if self.predivide != 1.0:
                    work.div_(self.predivide)
                self.comm.all_reduce(work)
                if n / self.predivide != 1.0:
                    work.div_(n / self.predivide)
                if work is not full:
                    full.copy_(work)
