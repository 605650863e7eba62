"""Counted collectives: the only place where hf_zero talks to ``torch.distributed``.

Note:
    * Every data-moving collective of the engine goes through :class:`Collectives`, so tests can
      count what a step sends and patch the transport.
    * Byte counts are the *algorithmic* volume a rank sends with ring algorithms, independent of
      the backend's actual implementation: all-gather and reduce-scatter send ``(N-1)/N`` of the
      full buffer, all-reduce twice that, broadcast the whole tensor from the source. These are
      the quantities the ZeRO paper's communication analysis uses, so they compare directly with
      ``hf_zero.memory.comm_bytes_per_step``.
    * Scalars used for control (grad norm, overflow flag) are counted apart as ``"control"`` so
      they do not blur the data volume.
    * With a world of one, no process group is needed: gathers and reductions become copies.
    * ``all_gather_into_tensor`` / ``reduce_scatter_tensor`` are deprecated in torch 2.13 in
      favour of ``all_gather_single`` / ``reduce_scatter_single``, which older torch (2.6-2.11)
      lacks; :func:`_resolve` picks whichever exists.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist


def _resolve(new_name: str, old_name: str):
    return getattr(dist, new_name, None) or getattr(dist, old_name)


_all_gather_single = _resolve("all_gather_single", "all_gather_into_tensor")
_reduce_scatter_single = _resolve("reduce_scatter_single", "reduce_scatter_tensor")


class CollectiveTimeout(RuntimeError):
    """A collective did not complete within the process group's timeout (a peer frozen or gone)."""


def _timed_out(exc: RuntimeError, what: str) -> RuntimeError:
    if "timed out" in str(exc).lower() or "timeout" in str(exc).lower():
        rank = dist.get_rank() if dist.is_initialized() else 0
        return CollectiveTimeout(
            f"rank {rank}: {what} did not complete within the process group timeout: another rank is "
            f"frozen, dead or not calling it (set the timeout with initialize(timeout=...)); gloo says: {exc}"
        )
    return exc


class Handle:
    """A possibly asynchronous collective; ``wait()`` is idempotent."""

    __slots__ = ("_work", "_what")

    def __init__(self, work=None, what: str = "collective"):
        self._work = work
        self._what = what

    def wait(self) -> None:
        if self._work is not None:
            try:
                self._work.wait()
            except RuntimeError as exc:
                raise _timed_out(exc, self._what) from exc
            self._work = None

    @property
    def done(self) -> bool:
        return self._work is None


@dataclass(frozen=True)
class CommTotals:
    """Bytes this rank sent, per collective kind, over some interval."""

    all_gather: int = 0
    reduce_scatter: int = 0
    all_reduce: int = 0
    broadcast: int = 0
    control: int = 0

    @property
    def data(self) -> int:
        """Bytes of parameters and gradients (everything except control scalars)."""
        return self.all_gather + self.reduce_scatter + self.all_reduce + self.broadcast

    def as_dict(self) -> dict:
        return {
            "all_gather": self.all_gather,
            "reduce_scatter": self.reduce_scatter,
            "all_reduce": self.all_reduce,
            "broadcast": self.broadcast,
            "control": self.control,
            "data": self.data,
        }


class Collectives:
    """The engine's collectives over one process group, with byte counters."""

    def __init__(self, group: Optional[dist.ProcessGroup] = None):
        self.group = group
        if dist.is_available() and dist.is_initialized():
            self.rank = dist.get_rank(group)
            self.world_size = dist.get_world_size(group)
        else:
            self.rank, self.world_size = 0, 1
        self._sent: Counter = Counter()

    # -- accounting -------------------------------------------------------------------------
    def _count(self, kind: str, nbytes: float) -> None:
        self._sent[kind] += int(round(nbytes))

    def totals(self) -> CommTotals:
        return CommTotals(**{k: int(v) for k, v in self._sent.items()})

    def take_totals(self) -> CommTotals:
        """Return the totals since the last call and reset the counters."""
        out = self.totals()
        self._sent.clear()
        return out

    # -- collectives ------------------------------------------------------------------------
    def all_gather(self, output: torch.Tensor, shard: torch.Tensor, async_op: bool = False) -> Handle:
        """Gather equal shards of every rank into ``output`` (rank r's shard at ``r * len``)."""
        assert output.numel() == shard.numel() * self.world_size, (output.shape, shard.shape)
        if self.world_size == 1:
            if output.data_ptr() != shard.data_ptr():
                output.copy_(shard)
            return Handle()
        n = self.world_size
        self._count("all_gather", (n - 1) * shard.numel() * shard.element_size())
        try:
            return Handle(_all_gather_single(output, shard, group=self.group, async_op=async_op), "all_gather")
        except RuntimeError as exc:
            raise _timed_out(exc, "all_gather") from exc

    def reduce_scatter(self, shard_out: torch.Tensor, full: torch.Tensor, async_op: bool = False) -> Handle:
        """Sum ``full`` over ranks and keep this rank's contiguous slice in ``shard_out``."""
        assert full.numel() == shard_out.numel() * self.world_size, (full.shape, shard_out.shape)
        if self.world_size == 1:
            if shard_out.data_ptr() != full.data_ptr():
                shard_out.copy_(full)
            return Handle()
        n = self.world_size
        self._count("reduce_scatter", (n - 1) * shard_out.numel() * shard_out.element_size())
        try:
            return Handle(_reduce_scatter_single(shard_out, full, group=self.group, async_op=async_op), "reduce_scatter")
        except RuntimeError as exc:
            raise _timed_out(exc, "reduce_scatter") from exc

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum", control: bool = False) -> None:
        """In-place all-reduce with ``op`` in {"sum", "max"}."""
        if self.world_size == 1:
            return
        n = self.world_size
        nbytes = 2 * (n - 1) / n * tensor.numel() * tensor.element_size()
        self._count("control" if control else "all_reduce", nbytes)
        reduce_op = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op]
        try:
            dist.all_reduce(tensor, op=reduce_op, group=self.group)
        except RuntimeError as exc:
            raise _timed_out(exc, f"all_reduce ({op})") from exc

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> None:
        if self.world_size == 1:
            return
        if self.rank == src:
            self._count("broadcast", tensor.numel() * tensor.element_size())
        dist.broadcast(tensor, src=dist.get_global_rank(self.group, src) if self.group else src, group=self.group)

    def barrier(self) -> None:
        if self.world_size > 1:
            try:
                dist.barrier(group=self.group)
            except RuntimeError as exc:
                raise _timed_out(exc, "barrier") from exc
