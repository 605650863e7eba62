"""Hierarchical data parallelism: MiCS / hybrid sharding, ZeRO++ hpZ, qwZ and qgZ.

Note:
    * :class:`ScaleSettings` is the frozen, validated view of the DeepSpeed keys
      ``mics_shard_size``, ``mics_hierarchical_params_gather``, ``zero_hpz_partition_size``,
      ``zero_quantized_weights`` and ``zero_quantized_gradients``; :func:`check_settings`
      refuses what is not built, and sizes that do not fit the world, with a ConfigError.
    * Groups (all of consecutive ranks, as DeepSpeed's): MiCS shard groups are ranks
      ``[k m, (k+1) m)``; replica groups are the ranks with the same position in their shard
      group (``{j, j+m, j+2m, ...}``). hpZ groups are ``[k h, (k+1) h)``. qgZ uses the node
      groups and the *cross* groups (the ranks with the same local rank on every node).
    * Ownership: a flat's shard world is the shard group (the world without MiCS) and rank
      ``r`` owns slice ``r mod m``; every replica group holds the same shards, so gradient
      norms are summed over the shard group only, and checkpoints are written by shard group 0
      alone (the on-disk layout is the one of a world of ``m``, read back at any world size).
    * MiCS gradients: reduce-scatter inside the shard group, then all-reduce of the shard over
      the replica group; the mean divides by the whole world. Exact up to summation order.
    * hpZ (stage 3): after a training forward's all-gather (over the world) a unit keeps a
      *secondary* shard, the slice ``[i P/h, (i+1) P/h)`` of the gathered buffer for its position
      ``i`` in the hpZ group; gathers in backward all-gather the secondary shards inside that
      group. Secondary shards live from the forward to the end of its backward. Exact.
    * qwZ (stage 3): the forward all-gather sends int8 blockwise values and fp32 scales
      (:mod:`hf_zero.engine.quant`); every rank, its own shard included, computes with the same
      dequantized weights. The fp32 masters and the optimizer never see quantization. With hpZ
      the secondary shard keeps the dequantized values, so backward sees forward's weights.
    * qgZ (stage 3): the gradient reduce-scatter runs in two all-to-all steps of int8 blockwise
      pieces, first inside the node (every rank receives its node's pieces of the chunk its
      local rank owns on every node, dequantizes and sums them), then across nodes between the
      ranks of equal local rank (the node sums, quantized once more, are exchanged and summed).
      Each rank ends with the sum over the world of its own slice, as a reduce-scatter would.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from ..config import ConfigError
from . import quant
from .collectives import Collectives, Handle
from .topology import Topology


@dataclass(frozen=True)
class ScaleSettings:
    mics_shard_size: int = -1  # -1 or 0: off (the whole world is one shard group)
    mics_hierarchical_params_gather: bool = False
    hpz_partition_size: int = 1  # 1: off
    quantized_weights: bool = False
    quantized_gradients: bool = False

    @classmethod
    def from_config(cls, zo) -> "ScaleSettings":
        return cls(zo.mics_shard_size, zo.mics_hierarchical_params_gather, zo.zero_hpz_partition_size,
                   zo.zero_quantized_weights, zo.zero_quantized_gradients)

    @property
    def mics(self) -> bool:
        return self.mics_shard_size > 0

    @property
    def hpz(self) -> bool:
        return self.hpz_partition_size > 1

    @property
    def active(self) -> bool:
        return self.mics or self.hpz or self.quantized_weights or self.quantized_gradients


def check_settings(s: ScaleSettings, *, stage: int, world_size: int, topology: Topology,
                   offload_param: bool) -> None:
    """Raise ConfigError for what needs a world (sizes); stage and combination rules are checked
    by the config itself (``ZeroOptimizationConfig``)."""
    z = "zero_optimization"
    if s.mics and world_size % s.mics_shard_size:
        raise ConfigError(f"{s.mics_shard_size} does not divide the world of {world_size} ranks: MiCS "
                          "replicates whole shard groups; pick a divisor (usually the ranks per node)",
                          key=f"{z}.mics_shard_size")
    if s.hpz:
        if world_size % s.hpz_partition_size:
            raise ConfigError(f"{s.hpz_partition_size} does not divide the world of {world_size} ranks; pick a "
                              f"divisor (usually the ranks per node, here {topology.ranks_per_node})",
                              key=f"{z}.zero_hpz_partition_size")
        if topology.ranks_per_node % s.hpz_partition_size:
            raise ConfigError(f"{s.hpz_partition_size} would make hpZ groups span nodes ({topology.ranks_per_node} "
                              "ranks per node): the secondary shards must stay inside a node; pick a divisor of "
                              "the ranks per node", key=f"{z}.zero_hpz_partition_size")
    if offload_param and (s.hpz or s.quantized_weights):
        raise ConfigError("hpZ and qwZ are not built with offload_param (the shards' source is the host or "
                          "NVMe); drop one of them", key=f"{z}.offload_param.device")


class Hierarchy:
    """The process groups of one engine and the data collectives that use them."""

    def __init__(self, world: Collectives, settings: ScaleSettings, topology: Topology):
        self.world = world
        self.settings = settings
        self.topology = topology
        n, me = world.world_size, world.global_rank
        self.shard = world
        self.replica: Optional[Collectives] = None
        self.hpz: Optional[Collectives] = None
        self.node: Optional[Collectives] = None
        self.cross: Optional[Collectives] = None
        # every rank creates every group, in the same order
        if settings.mics and settings.mics_shard_size < n:
            m = settings.mics_shard_size
            self.shard = world.subgroups([range(k * m, (k + 1) * m) for k in range(n // m)])
            self.replica = world.subgroups([range(j, n, m) for j in range(m)])
        if settings.hpz and settings.hpz_partition_size < n:
            h = settings.hpz_partition_size
            self.hpz = world.subgroups([range(k * h, (k + 1) * h) for k in range(n // h)])
        if settings.quantized_gradients:
            g = topology.ranks_per_node
            self.node = world.subgroups([topology.node_ranks(i) for i in range(topology.num_nodes)])
            self.cross = world.subgroups([range(j, n, g) for j in range(g)])
        del me

    # -- parameters -------------------------------------------------------------------------
    def secondary_slice(self, padded_numel: int) -> slice:
        """hpZ: the part of a gathered buffer this rank keeps as its secondary shard."""
        h = self.hpz.world_size
        size = padded_numel // h
        return slice(self.hpz.rank * size, (self.hpz.rank + 1) * size)

    def gather_params(self, full: torch.Tensor, shard: torch.Tensor, secondary: Optional[torch.Tensor],
                      async_op: bool) -> Handle:
        """All-gather a flat's parameters into ``full``: from the secondary shards inside the hpZ
        group when given, else from the primary shards (int8 with qwZ)."""
        if secondary is not None:
            return self.hpz.all_gather(full, secondary, async_op=async_op)
        if not self.settings.quantized_weights or self.shard.world_size == 1:
            return self.shard.all_gather(full, shard, async_op=async_op)
        block = quant.block_size(shard.numel())
        q, scale = quant.quantize(shard, block)
        n = self.shard.world_size
        q_all = torch.empty(q.numel() * n, dtype=torch.int8, device=q.device)
        s_all = torch.empty(scale.numel() * n, dtype=scale.dtype, device=scale.device)
        hq = self.shard.all_gather(q_all, q, async_op=async_op)
        hs = self.shard.all_gather(s_all, scale, async_op=async_op)

        def finish():
            hq.wait()
            hs.wait()
            # like the plain all-gather's write: not an autograd-visible change of ``full``
            with torch.no_grad(), torch.autograd._unsafe_preserve_version_counter(full):
                quant.dequantize(q_all, s_all, block, full)

        return _Then(finish, async_op)

    # -- gradients --------------------------------------------------------------------------
    def reduce_scatter(self, out: torch.Tensor, full: torch.Tensor, async_op: bool) -> Handle:
        """Sum ``full`` over the shard group into this rank's slice ``out`` (qgZ: quantized, in
        two steps); the replica all-reduce (MiCS) comes in :meth:`finish_gradient`."""
        if not self.settings.quantized_gradients or self.world.world_size == 1:
            return self.shard.reduce_scatter(out, full, async_op=async_op)
        g, nodes = self.topology.ranks_per_node, self.topology.num_nodes
        s = out.numel()
        # rank (node i, local j) owns block [i, j] of full viewed as [nodes, g, s]
        by_local = full.view(nodes, g, s).transpose(0, 1).reshape(g, nodes * s)
        node_sum = _quantized_reduce(self.node, by_local)  # [nodes * s]: blocks (i', j), summed in node
        out.copy_(_quantized_reduce(self.cross, node_sum.view(nodes, s)))
        return Handle()

    def finish_gradient(self, out: torch.Tensor) -> None:
        """MiCS: sum the shard-group sums over the replicas (every replica then holds the same)."""
        if self.replica is not None:
            self.replica.all_reduce(out)


def _quantized_reduce(comm: Collectives, pieces: torch.Tensor) -> torch.Tensor:
    """``pieces`` is [k, L] (k = the group's size): send piece j, int8 blockwise, to member j;
    return the fp sum of the k pieces received (this rank's own piece goes through the same
    quantization, so every member's sum is computed from the same values)."""
    k, length = pieces.shape
    if k == 1:
        return pieces[0].clone()
    block = quant.block_size(length)
    q, scale = quant.quantize(pieces.reshape(-1), block)
    q_in, s_in = torch.empty_like(q), torch.empty_like(scale)
    comm.all_to_all(q_in, q)
    comm.all_to_all(s_in, scale)
    vals = torch.empty(k * length, dtype=torch.float32, device=pieces.device)
    quant.dequantize(q_in, s_in, block, vals)
    return vals.view(k, length).sum(dim=0).to(pieces.dtype)


class _Then(Handle):
    """A handle whose ``wait()`` runs ``finish`` once (waits for its collectives and decodes)."""

    __slots__ = ("_finish",)

    def __init__(self, finish: Callable[[], None], async_op: bool):
        super().__init__(None, "quantized all_gather")
        self._finish = finish
        if not async_op:
            self.wait()

    def wait(self) -> None:
        if self._finish is not None:
            finish, self._finish = self._finish, None
            finish()

    @property
    def done(self) -> bool:
        return self._finish is None
