"""Topology: which node each rank runs on, and which link a rank's bytes take.

Note:
    * Nodes hold ``ranks_per_node`` consecutive ranks: rank ``r`` is on node
      ``r // ranks_per_node`` (torchrun assigns ranks that way: ``RANK = GROUP_RANK *
      LOCAL_WORLD_SIZE + LOCAL_RANK``). :meth:`Topology.from_launcher` takes ``ranks_per_node``
      from the config (``hf_zero.ranks_per_node``) or else the launcher's ``LOCAL_WORLD_SIZE``,
      and checks ``GROUP_RANK`` against it when the launcher sets it.
    * The per-link model (see docs/scale.md): a ring collective over a group sends, from each
      rank, its whole ring volume to its successor in the group's rank order, so a rank's bytes
      cross nodes exactly when its successor is on another node. An all-to-all sends each peer
      its own piece directly: that piece crosses nodes when the peer is on another node.
    * Immutable: a Topology is built once per engine and passed down.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Mapping, Optional, Sequence, Tuple

INTRA = "intra_node"
CROSS = "cross_node"


class TopologyError(ValueError):
    """The launcher's or the config's node layout is inconsistent with the world."""


@dataclass(frozen=True)
class Topology:
    world_size: int
    ranks_per_node: int

    def __post_init__(self) -> None:
        if self.world_size < 1 or self.ranks_per_node < 1:
            raise TopologyError(f"world_size {self.world_size} and ranks_per_node {self.ranks_per_node} must be >= 1")
        if self.world_size % self.ranks_per_node:
            raise TopologyError(
                f"{self.world_size} ranks do not fill nodes of {self.ranks_per_node} ranks each: hf_zero "
                "needs every node to run the same number of ranks (set hf_zero.ranks_per_node to a divisor "
                "of the world size, or launch the same --nproc_per_node on every node)")

    @property
    def num_nodes(self) -> int:
        return self.world_size // self.ranks_per_node

    def node_of(self, rank: int) -> int:
        return rank // self.ranks_per_node

    def local_rank_of(self, rank: int) -> int:
        return rank % self.ranks_per_node

    def node_ranks(self, node: int) -> Tuple[int, ...]:
        lo = node * self.ranks_per_node
        return tuple(range(lo, lo + self.ranks_per_node))

    def link(self, src: int, dst: int) -> str:
        return INTRA if self.node_of(src) == self.node_of(dst) else CROSS

    def ring_link(self, ranks: Sequence[int], me: int) -> str:
        """The link ``me`` sends on in a ring over ``ranks`` (in that order)."""
        i = list(ranks).index(me)
        return self.link(me, ranks[(i + 1) % len(ranks)])

    def ring_cross_edges(self, ranks: Sequence[int]) -> int:
        """How many of the ring's ``len(ranks)`` edges join two nodes."""
        k = len(ranks)
        return 0 if k < 2 else sum(self.node_of(ranks[i]) != self.node_of(ranks[(i + 1) % k]) for i in range(k))

    @classmethod
    def from_launcher(cls, world_size: int, rank: int, ranks_per_node: Optional[int] = None,
                      env: Optional[Mapping[str, str]] = None) -> "Topology":
        """The topology of this job: ``ranks_per_node`` (the config's) if given, else the
        launcher's ``LOCAL_WORLD_SIZE`` (one node when it is unset)."""
        env = os.environ if env is None else env
        source = "hf_zero.ranks_per_node"
        if ranks_per_node is None:
            source = "LOCAL_WORLD_SIZE"
            ranks_per_node = int(env.get("LOCAL_WORLD_SIZE", world_size) or world_size)
        topo = cls(world_size, ranks_per_node)
        group = env.get("GROUP_RANK")
        if source == "LOCAL_WORLD_SIZE" and group not in (None, "") and world_size > 1:
            if int(group) != topo.node_of(rank):
                raise TopologyError(
                    f"rank {rank}: the launcher says node (GROUP_RANK) {group}, but with LOCAL_WORLD_SIZE="
                    f"{ranks_per_node} rank {rank} belongs to node {topo.node_of(rank)}: ranks are not laid out "
                    "node by node; set hf_zero.ranks_per_node or launch with torchrun's default rank order")
        return topo
