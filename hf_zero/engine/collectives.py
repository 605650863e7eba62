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
    * Links (see :mod:`hf_zero.engine.topology` and docs/scale.md): with a
      :class:`~hf_zero.engine.topology.Topology`, every count is also filed under the link the
      bytes take, ``"intra_node"`` or ``"cross_node"``. A ring collective sends all of a rank's
      volume to its successor in the group's rank order; an all-to-all sends each peer its piece.
      Without a topology everything is intra-node (one node).
    * Sub-groups (:meth:`Collectives.subgroups`: MiCS shard and replica groups, hpZ's node
      groups) share their parent's counters, so the engine's per-step totals cover all of them.
    * gloo on the CPU: its ``reduce_scatter_tensor`` clones the whole input and all-reduces the
      clone, and its ``all_gather_into_tensor`` gathers into a new full-size buffer and copies
      out: one transient full-size allocation per call, which the heap keeps resident as holes
      between the step's other allocations. Here an all-gather is one in-place broadcast per
      rank into its piece of the output (the same bytes), and a reduce-scatter whose caller
      lets it overwrite the input (``scratch=True``: a pooled gradient buffer) all-reduces the
      input in place and copies this rank's slice out, as gloo does, minus the clone.
    * ``all_gather_into_tensor`` / ``reduce_scatter_tensor`` are deprecated in torch 2.13 in
      favour of ``all_gather_single`` / ``reduce_scatter_single``, which older torch (2.6-2.11)
      lacks; :func:`_resolve` picks whichever exists.
"""

from __future__ import annotations

import weakref
from collections import Counter
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Sequence

from .topology import CROSS, INTRA, Topology

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


class _Then:
    """Works that complete together, then ``after()`` runs (once, at the first ``wait``)."""

    __slots__ = ("works", "after")

    def __init__(self, works, after=None):
        self.works = list(works)
        self.after = after

    def wait(self) -> None:
        while self.works:
            self.works[0].wait()
            self.works.pop(0)
        if self.after is not None:
            after, self.after = self.after, None
            after()


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
    #: the cross-node part of each kind above (kind -> bytes); the rest went intra-node
    cross: Mapping[str, int] = field(default_factory=dict)

    @property
    def data(self) -> int:
        """Bytes of parameters and gradients (everything except control scalars)."""
        return self.all_gather + self.reduce_scatter + self.all_reduce + self.broadcast

    @property
    def cross_node(self) -> int:
        """Data bytes (not control) this rank sent to another node."""
        return sum(v for k, v in self.cross.items() if k != "control")

    @property
    def intra_node(self) -> int:
        return self.data - self.cross_node

    def as_dict(self) -> dict:
        kinds = ("all_gather", "reduce_scatter", "all_reduce", "broadcast", "control")
        return {
            **{k: getattr(self, k) for k in kinds},
            "data": self.data,
            CROSS: {**{k: int(self.cross.get(k, 0)) for k in kinds}, "data": self.cross_node},
            INTRA: {**{k: getattr(self, k) - int(self.cross.get(k, 0)) for k in kinds}, "data": self.intra_node},
        }


class Collectives:
    """The engine's collectives over one process group, with byte counters."""

    def __init__(self, group: Optional[dist.ProcessGroup] = None, topology: Optional[Topology] = None,
                 _counters: Optional[tuple] = None):
        self.group = group  # held weakly (see the ``group`` property)
        if dist.is_available() and dist.is_initialized():
            self.rank = dist.get_rank(group)
            self.world_size = dist.get_world_size(group)
            self.global_rank = dist.get_rank()
            self.ranks: List[int] = (list(dist.get_process_group_ranks(group)) if group is not None
                                     else list(range(dist.get_world_size())))
        else:
            self.rank, self.world_size, self.global_rank, self.ranks = 0, 1, 0, [0]
        self.topology = topology
        self._backend: Optional[str] = None  # the group's backend, looked up once
        self._sent, self._cross = _counters if _counters is not None else (Counter(), Counter())

    @property
    def group(self) -> Optional[dist.ProcessGroup]:
        """The process group (None: the default one). Held by weak reference: c10d's registry
        owns it, so destroying the process groups frees its gloo threads even while an engine
        is still referenced (see hf_zero.engine.teardown)."""
        if self._group_ref is None:
            return None
        group = self._group_ref()
        if group is None:
            raise RuntimeError(f"rank {self.global_rank}: the process group over ranks {self.ranks} was destroyed; "
                               "this engine can no longer communicate (destroy_process_group ran)")
        return group

    @group.setter
    def group(self, group: Optional[dist.ProcessGroup]) -> None:
        self._group_ref = None if group is None else weakref.ref(group)

    # -- topology and sub-groups ------------------------------------------------------------
    def set_topology(self, topology: Topology) -> None:
        """Count this group's bytes by link from now on (the engine sets it once, at start)."""
        self.topology = topology

    def subgroups(self, partition: Sequence[Sequence[int]]) -> "Collectives":
        """Collective over this (world) group: create one process group per rank list of
        ``partition`` (global ranks; together every rank exactly once) and return the one
        this rank belongs to, counting into this object's counters."""
        flat = sorted(r for g in partition for r in g)
        if flat != sorted(self.ranks):
            raise ValueError(f"sub-groups {list(map(list, partition))} must hold every rank of {self.ranks} once")
        mine = None
        for ranks in partition:
            ranks = list(ranks)
            group = dist.new_group(ranks) if self.world_size > 1 else None
            if self.global_rank in ranks:
                mine = Collectives(group, self.topology, _counters=(self._sent, self._cross))
                if self.world_size == 1 or len(ranks) == 1:
                    mine.rank, mine.world_size, mine.ranks = ranks.index(self.global_rank), len(ranks), ranks
        assert mine is not None
        return mine

    def link(self) -> str:
        """The link this rank's ring sends go over in this group."""
        if self.topology is None or self.world_size == 1:
            return INTRA
        return self.topology.ring_link(self.ranks, self.global_rank)

    # -- accounting -------------------------------------------------------------------------
    def _count(self, kind: str, nbytes: float, link: Optional[str] = None) -> None:
        n = int(round(nbytes))
        self._sent[kind] += n
        if (link or self.link()) == CROSS:
            self._cross[kind] += n

    def totals(self) -> CommTotals:
        return CommTotals(**{k: int(v) for k, v in self._sent.items()},
                          cross={k: int(v) for k, v in self._cross.items()})

    def take_totals(self) -> CommTotals:
        """Return the totals since the last call and reset the counters."""
        out = self.totals()
        self._sent.clear()
        self._cross.clear()
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
            if self._gloo_cpu(output):  # in place, no full-size temporary (see the notes)
                k = shard.numel()
                mine = output[self.rank * k : (self.rank + 1) * k]
                if mine.data_ptr() != shard.data_ptr():
                    mine.copy_(shard)
                works = [dist.broadcast(output[r * k : (r + 1) * k], src=self.ranks[r], group=self.group,
                                        async_op=True) for r in range(n)]
                handle = Handle(_Then(works), "all_gather")
                if not async_op:
                    handle.wait()
                return handle
            return Handle(_all_gather_single(output, shard, group=self.group, async_op=async_op), "all_gather")
        except RuntimeError as exc:
            raise _timed_out(exc, "all_gather") from exc

    def reduce_scatter(self, shard_out: torch.Tensor, full: torch.Tensor, async_op: bool = False,
                       scratch: bool = False) -> Handle:
        """Sum ``full`` over ranks and keep this rank's contiguous slice in ``shard_out``. With
        ``scratch`` the caller will not read ``full`` again, and it may be overwritten."""
        assert full.numel() == shard_out.numel() * self.world_size, (full.shape, shard_out.shape)
        if self.world_size == 1:
            if shard_out.data_ptr() != full.data_ptr():
                shard_out.copy_(full)
            return Handle()
        n = self.world_size
        self._count("reduce_scatter", (n - 1) * shard_out.numel() * shard_out.element_size())
        try:
            if scratch and self._gloo_cpu(full):  # gloo's own algorithm, minus its clone of ``full``
                k = shard_out.numel()
                mine = full[self.rank * k : (self.rank + 1) * k]
                work = dist.all_reduce(full, group=self.group, async_op=True)
                handle = Handle(_Then([work], lambda: shard_out.copy_(mine)), "reduce_scatter")
                if not async_op:
                    handle.wait()
                return handle
            return Handle(_reduce_scatter_single(shard_out, full, group=self.group, async_op=async_op), "reduce_scatter")
        except RuntimeError as exc:
            raise _timed_out(exc, "reduce_scatter") from exc

    def _gloo_cpu(self, t: torch.Tensor) -> bool:
        if t.device.type != "cpu":
            return False
        if self._backend is None:
            self._backend = str(dist.get_backend(self.group))
        return self._backend == "gloo"

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

    def all_to_all(self, output: torch.Tensor, input: torch.Tensor) -> None:
        """Piece ``j`` of ``input`` (equal pieces, one per rank) goes to rank ``j``; rank ``i``'s
        piece for this rank lands at piece ``i`` of ``output``. Each peer's piece is counted on
        the link to that peer."""
        assert input.numel() == output.numel() and input.numel() % self.world_size == 0
        if self.world_size == 1:
            output.copy_(input)
            return
        piece = input.numel() // self.world_size * input.element_size()
        for j, peer in enumerate(self.ranks):
            if peer != self.global_rank:
                link = self.topology.link(self.global_rank, peer) if self.topology is not None else INTRA
                self._count("reduce_scatter", piece, link)
        try:
            dist.all_to_all_single(output, input, group=self.group)
        except RuntimeError as exc:
            raise _timed_out(exc, "all_to_all") from exc

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
