"""Flat parameter buffers: one unit's parameters of one dtype and trainability, in one 1-D tensor.

Note:
    * Layout: parameters are laid end to end in ``params`` order, then zero padding up to
      ``padded_numel``, a multiple of ``alignment * shard_world``. Rank ``r`` owns the contiguous
      slice ``[r * shard_numel, (r + 1) * shard_numel)``. Padding is always zero, so norms and
      reductions over a shard need no masking.
    * Every parameter's ``.data`` is a view into ``full``; gathering writes straight into
      ``full`` and no per-parameter copy ever happens.
    * With ``sharded=True`` (stage 3), ``shard`` is the only persistent storage (or, with
      parameter offload to NVMe, ``shard`` is None and a swap file holds it); ``full`` keeps
      its shape and its storage object while the unit is not gathered, but holds no memory:
      on the CPU with a :class:`~hf_zero.engine.pool.GatherPool` its pages are moved into the
      pool (the window reads zeros) and a gather moves resident pages back; otherwise its
      storage is resized to zero bytes. Either way tensors that autograd saved stay valid
      objects and see the data again after the next gather. With ``sharded=False``, ``full`` is always allocated and ``shard`` is a view of it.
    * The shard world may differ from the process world: stage 0 (plain data parallel) uses a
      shard world of one, so every rank owns the whole buffer.
    * ``segments_in_shard()`` is the single source of truth for which parameter elements a rank
      owns; the optimizer and the checkpoint format are both built from it.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch
import torch.nn as nn


class FlatState(enum.Enum):
    SHARDED = "sharded"      # only this rank's shard is in memory (stage 3)
    GATHERING = "gathering"  # an all-gather into ``full`` was issued and not yet waited for
    GATHERED = "gathered"    # ``full`` holds every parameter's current value


@dataclass(frozen=True)
class Segment:
    """Elements ``[param_start, param_start + length)`` of parameter ``param_index`` (flattened)
    live at ``[shard_start, shard_start + length)`` of this rank's shard."""

    param_index: int
    param_start: int
    shard_start: int
    length: int


def padded_size(numel: int, alignment: int, shard_world: int) -> int:
    quantum = alignment * shard_world
    return max(quantum, -(-numel // quantum) * quantum)


class FlatParam:
    """Parameters ``params`` (same dtype and device) flattened into one padded buffer."""

    def __init__(
        self,
        params: Sequence[nn.Parameter],
        names: Sequence[str],
        *,
        dtype: torch.dtype,
        device: torch.device,
        shard_rank: int,
        shard_world: int,
        sharded: bool,
        alignment: int = 16,
        master_dtype: Optional[torch.dtype] = None,
        master_device: Optional[torch.device] = None,
        source: Optional[torch.Tensor] = None,
        pool=None,
    ):
        assert len(params) == len(names) and params, "a flat buffer needs at least one parameter"
        self.params: List[nn.Parameter] = list(params)
        self.names: List[str] = list(names)
        self.shapes = [tuple(p.shape) for p in params]
        self.numels = [p.numel() for p in params]
        self.offsets = []
        total = 0
        for n in self.numels:
            self.offsets.append(total)
            total += n
        self.numel = total
        self.dtype = dtype
        self.device = device
        self.trainable = params[0].requires_grad
        assert all(p.requires_grad == self.trainable for p in params)
        self.shard_rank = shard_rank
        self.shard_world = shard_world
        self.sharded = sharded
        self.padded_numel = padded_size(total, alignment, shard_world)
        self.shard_numel = self.padded_numel // shard_world
        self.shard_start = shard_rank * self.shard_numel

        # The initial values: ``source`` (the parameters already flattened, e.g. as broadcast
        # from rank 0 in fp32) or the parameters themselves. Padding stays zero.
        if source is None:
            source = torch.cat([p.detach().reshape(-1) for p in self.params]) if self.params else torch.zeros(0)
        assert source.numel() == total, (source.numel(), total)
        # stage 3 on the CPU: ``full`` lives in a fixed window whose pages a GatherPool moves in
        # and out (hf_zero.engine.pool); elsewhere its storage is resized
        self.pool = pool if sharded and device.type == "cpu" else None
        if self.pool is not None:
            self.full = self.pool.window(self.padded_numel, dtype)
        else:
            self.full = torch.zeros(self.padded_numel, dtype=dtype, device=device)
        with torch.no_grad():
            self.full[:total].copy_(source)
        self.shard = self.full[self.shard_start : self.shard_start + self.shard_numel]
        self.state = FlatState.GATHERED
        # The fp32 master shard, taken from the parameters' original values (before any cast to
        # the compute dtype); it aliases ``shard`` when dtype and device agree. With offload it
        # lives on ``master_device`` (the CPU), pinned when CUDA is there to copy from.
        self.master: Optional[torch.Tensor] = None
        master_device = torch.device(master_device) if master_device is not None else device
        self.master_is_shard = master_dtype == dtype and master_device == device
        if self.trainable and master_dtype is not None:
            if self.master_is_shard:
                self.master = self.shard
            else:
                pin = master_device.type == "cpu" and device.type == "cuda"
                self.master = torch.zeros(self.shard_numel, dtype=master_dtype, device=master_device, pin_memory=pin)
                lo = self.shard_start
                hi = min(total, lo + self.shard_numel)
                if hi > lo:
                    self.master[: hi - lo].copy_(source[lo:hi])
        self._bind_views()

    # -- views ------------------------------------------------------------------------------
    def _bind_views(self) -> None:
        for p, off, n, shape in zip(self.params, self.offsets, self.numels, self.shapes):
            p.data = self.full[off : off + n].view(shape)

    def param_view(self, full: torch.Tensor, index: int) -> torch.Tensor:
        off, n = self.offsets[index], self.numels[index]
        return full[off : off + n].view(self.shapes[index])

    def segments_in_shard(self) -> List[Segment]:
        """The parameter pieces this rank owns, in shard order."""
        lo, hi = self.shard_start, self.shard_start + self.shard_numel
        out = []
        for i, (off, n) in enumerate(zip(self.offsets, self.numels)):
            a, b = max(lo, off), min(hi, off + n)
            if a < b:
                out.append(Segment(i, a - off, a - lo, b - a))
        return out

    # -- stage 3 lifecycle ------------------------------------------------------------------
    def detach_shard(self, shard_device: Optional[torch.device] = None) -> None:
        """Make ``shard`` its own storage, on ``shard_device`` (parameter offload: the CPU, pinned
        when the compute device is a GPU), and free ``full`` (entering the sharded state)."""
        assert self.sharded and self.state is FlatState.GATHERED
        target = torch.device(shard_device) if shard_device is not None else self.device
        pin = target.type == "cpu" and self.device.type == "cuda"
        shard = torch.empty(self.shard_numel, dtype=self.dtype, device=target, pin_memory=pin)
        shard.copy_(self.shard)
        self.shard = shard
        if self.master is not None and self.master.device == shard.device and self.master.dtype == shard.dtype:
            self.master = shard  # fp32 with both offloaded to the CPU: one copy, not two
            self.master_is_shard = True
        self.free_full()

    def drop_shard(self) -> None:
        """Forget ``shard`` and free ``full`` (parameter offload to NVMe: the shard's only copy is
        then in a swap file, see :mod:`hf_zero.offload.param_swap`; ``shard`` is None)."""
        assert self.sharded and self.state is FlatState.GATHERED
        if self.master is not None and self.master_is_shard:  # the master stays: its own copy
            self.master = self.master.clone()
            self.master_is_shard = False
        self.shard = None
        self.free_full()

    def free_full(self) -> None:
        assert self.sharded
        if self.pool is not None:
            if self.state is not FlatState.SHARDED:
                self.pool.release(self.full)
        else:
            self.full.untyped_storage().resize_(0)
        self.state = FlatState.SHARDED

    def alloc_full(self) -> None:
        """Memory for ``full`` (its contents are undefined until the gather fills them)."""
        if self.pool is not None:
            if self.state is FlatState.SHARDED:
                self.pool.acquire(self.full)
            return
        storage = self.full.untyped_storage()
        nbytes = self.padded_numel * self.full.element_size()
        if storage.nbytes() != nbytes:
            storage.resize_(nbytes)

    @property
    def persistent_param_bytes(self) -> int:
        """Bytes of parameter storage this rank keeps between uses (wherever the shard lives)."""
        n = self.shard_numel if self.sharded else self.padded_numel
        return n * self.full.element_size()
