"""The ZeRO memory and communication formulas, per rank, in bytes.

Note:
    * Model states only: parameters, gradients, fp32 master weights, optimizer states. The
      engine's :meth:`~hf_zero.engine.engine.ZeroEngine.memory_report` measures the same four
      quantities on its real tensors; the tests assert that they agree.
    * ``master_bytes`` is 0 when training in fp32: the master shard then *is* the parameter shard.
    * Communication is the ring-algorithm volume a rank sends in one micro-step with
      accumulation 1 (all-gather and reduce-scatter send (N-1)/N of the buffer, all-reduce twice
      that): DDP and stages 0-2 send 2(N-1)/N Ψ elements, stage 3 3(N-1)/N (1.5x), because it
      gathers parameters once in forward and once more in backward.
    * :func:`link_bytes_per_step` splits a step's bytes by link (intra-node / cross-node) for the
      hierarchical modes (MiCS, hpZ, qwZ, qgZ), summed over the cluster; docs/scale.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence


@dataclass(frozen=True)
class ModelStateBytes:
    params: float
    grads: float
    master: float
    optimizer_states: float

    @property
    def total(self) -> float:
        return self.params + self.grads + self.master + self.optimizer_states


def model_state_bytes(
    num_params: float,
    stage: int,
    world_size: int,
    *,
    param_bytes: int = 2,
    grad_bytes: int = 2,
    master_bytes: int = 4,
    optimizer_state_bytes: int = 8,
) -> ModelStateBytes:
    """Per-rank bytes of each model state at ``stage`` (defaults: bf16 weights, fp32 AdamW)."""
    if stage not in (0, 1, 2, 3):
        raise ValueError(f"stage must be 0-3, got {stage}")
    n, psi = world_size, num_params
    return ModelStateBytes(
        params=param_bytes * psi / (n if stage >= 3 else 1),
        grads=grad_bytes * psi / (n if stage >= 2 else 1),
        master=master_bytes * psi / (n if stage >= 1 else 1),
        optimizer_states=optimizer_state_bytes * psi / (n if stage >= 1 else 1),
    )


def comm_bytes_per_step(num_params: float, stage: int, world_size: int, *, param_bytes: int = 2,
                        grad_bytes: int = 2, gather_after_step: bool = True,
                        backward_gathered: Optional[float] = None) -> float:
    """Bytes one rank sends in one micro-step (accumulation 1).

    ``gather_after_step``: stages 1-2 all-gather the updated parameters after the step (always);
    stage 3 never does (its parameters stay sharded).
    ``backward_gathered``: stage 3, the parameters all-gathered again in backward (default: all
    of them). The engine skips the unit carried from forward into backward and plain
    embeddings (docs/engine.md, "Stage 3 lifecycle"): :func:`backward_gathered_numel`.
    """
    n = world_size
    if n == 1:
        return 0.0
    frac = (n - 1) / n
    if stage == 0:
        return 2 * frac * num_params * grad_bytes
    reduce = frac * num_params * grad_bytes
    if stage in (1, 2):
        return reduce + (frac * num_params * param_bytes if gather_after_step else 0.0)
    again = num_params if backward_gathered is None else backward_gathered
    return reduce + frac * (num_params + again) * param_bytes


def backward_gathered_numel(unit_numels: Sequence[int], forward_order: Sequence[int],
                            embedding_units: Sequence[int] = ()) -> int:
    """Stage 3: elements all-gathered in backward per micro-step, from the units' (padded)
    element counts, the indices of the units in forward order (root excluded) and the indices
    of plain ``nn.Embedding`` units: every unit but the last of forward (carried into backward)
    and the embeddings (their backward reads no weight)."""
    ran = set(forward_order)
    skip = set(embedding_units) | ({forward_order[-1]} if forward_order else set())
    return sum(n for i, n in enumerate(unit_numels) if i in ran and i not in skip)


# ---------------------------------------------------------------------------- bytes by link
def _groups(world: int, size: int, strided: bool = False) -> list:
    """Consecutive groups of ``size`` ranks, or (``strided``) the ranks of equal position in them."""
    if strided:
        return [list(range(j, world, size)) for j in range(size)]
    return [list(range(k * size, (k + 1) * size)) for k in range(world // size)]


def link_bytes_per_step(flats, stage: int, nodes: int, ranks_per_node: int, *, accum: int = 1,
                        mics_shard_size: int = -1, hpz_partition_size: int = 1, quantized_weights: bool = False,
                        quantized_gradients: bool = False, param_bytes: int = 2, grad_bytes: int = 2,
                        backward_gathered: Optional[Sequence[bool]] = None) -> dict:
    """Data bytes of one optimizer step (``accum`` micro-steps), summed over *all* ranks of a
    cluster of ``nodes`` x ``ranks_per_node``, by link: ``{"intra_node": ..., "cross_node": ...}``.

    ``flats``: the padded element counts of the trainable flat buffers (one number for a whole
    model is fine when padding does not matter). The model is the counters' own (docs/scale.md):
    a ring collective over a group of ``k`` ranks sends ``(k-1)/k`` of the buffer (twice that for
    an all-reduce) from every member to its ring successor, so the cluster's cross-node bytes are
    the ring's node-crossing edges times one member's volume; an all-to-all sends every peer its
    own ``1/k`` piece. qwZ and qgZ send int8 values plus one fp32 scale per block of
    :func:`hf_zero.engine.quant.block_size` elements. ``backward_gathered``: stage 3, one flag
    per flat, False for a flat not all-gathered again in backward (see
    :func:`comm_bytes_per_step`); default all True.
    """
    from .engine.quant import block_size, wire_bytes
    from .engine.topology import Topology

    topo = Topology(nodes * ranks_per_node, ranks_per_node)
    world = topo.world_size
    m = mics_shard_size if mics_shard_size > 0 else world
    tot = {"intra_node": 0.0, "cross_node": 0.0}
    if world == 1:
        return tot

    def ring(groups, per_member: float) -> None:
        for g in groups:
            k = len(g)
            if k < 2:
                continue
            cross = topo.ring_cross_edges(g)
            tot["cross_node"] += cross * per_member
            tot["intra_node"] += (k - cross) * per_member

    def all_to_all(groups, piece: float) -> None:
        for g in groups:
            for a in g:
                for b in g:
                    if a != b:
                        tot[topo.link(a, b)] += piece

    shard_groups, replica_groups = _groups(world, m), (_groups(world, m, strided=True) if m < world else [])

    def reduce_grads(numel: int, times: int) -> None:
        s = numel // m
        for _ in range(times):
            if quantized_gradients:
                g, n = ranks_per_node, nodes
                length = n * s
                all_to_all(_groups(world, g), wire_bytes(length, block_size(length)))
                all_to_all(_groups(world, g, strided=True), wire_bytes(s, block_size(s)))
            else:
                ring(shard_groups, (m - 1) * s * grad_bytes)
            ring(replica_groups, 2 * (len(replica_groups[0]) - 1) / len(replica_groups[0]) * s * grad_bytes
                 if replica_groups else 0)

    again = list(backward_gathered) if backward_gathered is not None else [True] * len(flats)
    for numel, gathered_in_backward in zip(flats, again):
        s = numel // m
        if stage == 0:
            ring([list(range(world))], 2 * (world - 1) / world * numel * grad_bytes)
        elif stage in (1, 2):
            reduce_grads(numel, 1 if stage == 1 else accum)
            ring(shard_groups, (m - 1) * s * param_bytes)
        else:
            wq = wire_bytes(s, block_size(s)) if quantized_weights else s * param_bytes
            for _ in range(accum):
                ring(shard_groups, (m - 1) * wq)  # forward
                if not gathered_in_backward:
                    continue  # carried from forward, or a weight its backward never reads
                if hpz_partition_size > 1:
                    h = hpz_partition_size
                    ring(_groups(world, h), (h - 1) * (numel // h) * param_bytes)
                else:
                    ring(shard_groups, (m - 1) * wq)  # backward
            reduce_grads(numel, accum)
    return tot
