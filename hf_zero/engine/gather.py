"""``hf_zero.gathered_parameters``: full parameters on every rank for the length of a block.

Note:
    * The role of ``deepspeed.zero.GatheredParameters``. Collective: every rank enters the block
      with the same parameters in the same order. Parameters not managed by an engine are
      ignored, so the same code runs without one.
    * Stage 3: on entry the units holding the listed parameters are gathered and *pinned* (no
      hook releases a pinned unit); on exit they are unpinned and released again if they were
      sharded on entry. Nested blocks only count pins, so the outermost exit releases.
    * Stages 0-2: parameters are always full; entering changes nothing.
    * ``modifier_rank=r`` (any stage): on exit, the flat buffers holding the listed parameters
      are broadcast from rank ``r`` and written back, on every rank, into each rank's shard
      (the RAM shard, or its NVMe swap region with ``offload_param.device == "nvme"``) and its
      fp32 master (wherever optimizer offload keeps it). Changes other ranks make are
      overwritten. Changes must be in place (``p.data.copy_``, ``p.mul_`` under ``no_grad``):
      a parameter whose ``.data`` was replaced by another tensor is refused. Optimizer states
      are kept as they are (DeepSpeed's behaviour). When the block raises, nothing is broadcast
      (no collective on an error path): stage-3 units are released with their shards unchanged.
    * Stage 3, before any gather, the ranks agree on the units (one control all-reduce of their
      count and an order-sensitive checksum); ranks that entered with different parameters all
      raise the same error before any data moves. A rank whose list holds no parameter of the
      engine does not enter at all (no collective), so every rank must pass the same list.
    * :func:`whole_model_gathered` is the gather-once ``generate``: everything pinned, plain
      parameters (:func:`hf_zero.engine.access.unguarded`) and the forward hooks suspended.
    * :func:`full_model_fits` is the measured decision behind a gather-once ``generate``.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Dict, Iterable, Iterator, List, Optional

import torch
import torch.nn as nn

from .access import ParamAccess, access_of, unguarded
from .flat import FlatState

#: share of the measured free memory a gather-once generate may fill with parameters
FULL_GATHER_MEMORY_FRACTION = 0.8


def _as_params(params) -> List[torch.Tensor]:
    if isinstance(params, torch.Tensor):
        return [params]
    if isinstance(params, nn.Module):
        return list(params.parameters())
    return [p for p in params if p is not None]


@contextmanager
def gathered_parameters(params, modifier_rank: Optional[int] = None, fwd_module=None,
                        enabled: bool = True) -> Iterator[None]:
    """Within the block, ``params`` (a parameter, an iterable of them or a module) hold their
    full values on every rank; with ``modifier_rank``, changes made on that rank are kept
    everywhere on exit (see the module notes). ``fwd_module`` is accepted for DeepSpeed
    compatibility and unused."""
    del fwd_module
    if not enabled:
        yield
        return
    by_engine: Dict[int, List[ParamAccess]] = {}
    engines = {}
    for p in _as_params(params):
        acc = access_of(p)
        if acc is not None:
            by_engine.setdefault(id(acc.engine), []).append(acc)
            engines[id(acc.engine)] = acc.engine
    if modifier_rank is not None:
        for e in engines.values():
            if not 0 <= int(modifier_rank) < e.world_size:
                raise ValueError(f"gathered_parameters(modifier_rank={modifier_rank}): the world has ranks "
                                 f"0..{e.world_size - 1}")
    entered = []
    try:
        for key, accs in by_engine.items():
            entered.append((engines[key], accs, _enter(engines[key], accs)))
        yield
    except BaseException:
        for engine, accs, was_sharded in reversed(entered):
            _exit(engine, was_sharded)
        raise
    for engine, accs, was_sharded in reversed(entered):
        try:
            if modifier_rank is not None:
                _write_back(engine, accs, int(modifier_rank))
        finally:
            _exit(engine, was_sharded)


@contextmanager
def whole_model_gathered(engine) -> Iterator[None]:
    """Stage 3: the whole model gathered for the length of the block, as plain parameters, with
    the engine's forward hooks suspended (a gather-once ``generate``: every unit is pinned, so
    the hooks would only re-check what cannot change, at every token). Forwards inside the
    block must not need gradients. Collective on entry; on exit (also on error) the hooks are
    back, the parameters guarded and the units released."""
    runtime = engine.runtime
    if runtime.hooks_suspended:  # nested: the outer block holds everything already
        yield
        return
    with gathered_parameters(engine.module.parameters()), unguarded(engine):
        runtime.hooks_suspended = True
        try:
            yield
        finally:
            runtime.hooks_suspended = False


def _units(accs: List[ParamAccess]) -> list:
    seen, out = set(), []
    for a in accs:
        if id(a.unit) not in seen:
            seen.add(id(a.unit))
            out.append(a.unit)
    return out


def _enter(engine, accs: List[ParamAccess]) -> list:
    """Gather and pin the units of ``accs`` (stage 3); returns [(unit, was sharded)]."""
    engine.flush_pending_update()  # a delayed update must land first: the values must be current
    out = []
    if engine.stage != 3:
        return out
    units = _units(accs)
    _agree_on_units(engine, units)
    runtime = engine.runtime
    checked, runtime.check_unit_order = runtime.check_unit_order, False  # agreed once, above
    try:
        for u in units:  # issue every gather, then wait: the transfers overlap
            out.append((u, u.state is not FlatState.GATHERED))
            runtime.gather(u, async_op=True)
            u.pins += 1
        for u in units:
            runtime.wait(u)
    finally:
        runtime.check_unit_order = checked
    return out


def _agree_on_units(engine, units: list) -> None:
    """Stage 3, before any gather: every rank must gather the same units in the same order, or
    the all-gathers would pair different units' shards. One control all-reduce (max) of
    (count, order-sensitive checksum) and their negatives: the ranks agree when max == -min.
    Every rank raises the same error otherwise, before any data moves."""
    if engine.world_size == 1:
        return
    count = len(units)
    checksum = sum((k + 1) * (u.index + 1) for k, u in enumerate(units))
    v = torch.tensor([count, checksum, -count, -checksum], dtype=torch.float64, device=engine.device)
    engine.comm.all_reduce(v, op="max", control=True)
    if v[0] != -v[2] or v[1] != -v[3]:
        raise RuntimeError(
            f"hf_zero.gathered_parameters: the ranks entered with different parameters (this rank, "
            f"{engine.rank}: {count} unit(s): {', '.join(u.name for u in units) or 'none'}; unit counts across "
            f"ranks range {int(-v[2])}..{int(v[0])}). It is collective at stage 3: every rank must pass the "
            "same parameters in the same order (e.g. model.parameters() everywhere, and modify on one rank "
            "with modifier_rank=r)"
        )


def _exit(engine, was_sharded: list) -> None:
    for u, sharded in was_sharded:
        u.pins -= 1
        if u.pins == 0 and sharded:
            engine.runtime.release(u)


@torch.no_grad()
def _write_back(engine, accs: List[ParamAccess], src: int) -> None:
    """Broadcast from rank ``src`` the flats holding ``accs`` and store them as every rank's
    shard and fp32 master."""
    seen, flats = set(), []
    for a in accs:
        p = a.flat.params[a.index]
        with torch._C.DisableTorchFunctionSubclass():
            if p.data.data_ptr() != a.flat.param_view(a.flat.full, a.index).data_ptr() or \
                    tuple(p.shape) != a.flat.shapes[a.index]:
                raise ValueError(
                    f"gathered_parameters(modifier_rank={src}): parameter {a.name!r} no longer views the "
                    "engine's buffer (its .data was replaced). Modify parameters in place, e.g. "
                    "p.data.copy_(new) or p.mul_(0.5) under torch.no_grad(); shapes cannot change."
                )
        if id(a.flat) not in seen:
            seen.add(id(a.flat))
            flats.append(a.flat)
    for f in flats:
        engine.comm.broadcast(f.full, src=src)
        values = f.full[f.shard_start : f.shard_start + f.shard_numel]
        if f.sharded:
            engine.write_shard(f, values)
        if f.trainable and engine.optimizer is not None:
            # with the optimizer on NVMe the master is on disk (f.master is None) until made
            # resident: decide inside, where it is in RAM
            with engine.resident(f, write_back=True):
                if f.master is not None and not f.master_is_shard:
                    f.master.copy_(values)


def _available_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    raise RuntimeError("cannot measure free memory: neither psutil nor /proc/meminfo is available")


def full_gather_bytes(engine) -> int:
    """Bytes this rank would add by gathering every unit not gathered now."""
    return sum(f.padded_numel * f.full.element_size()
               for u in engine.units if u.state is not FlatState.GATHERED for f in u.flats)


def full_model_fits(engine) -> bool:
    """Collective: whether every rank has room to hold the whole model gathered. Measured on
    each rank: the bytes to gather (times the ranks sharing this host's RAM on CPU) against
    :data:`FULL_GATHER_MEMORY_FRACTION` of the free memory; the ranks agree (all-reduce), so
    all take the same path."""
    need = full_gather_bytes(engine)
    if engine.device.type != "cuda":
        need *= int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    fits = need <= FULL_GATHER_MEMORY_FRACTION * _available_bytes(engine.device)
    flag = torch.tensor([0.0 if fits else 1.0], device=engine.device)
    engine.comm.all_reduce(flag, op="max", control=True)
    return flag.item() == 0.0
