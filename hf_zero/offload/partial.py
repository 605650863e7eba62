"""Partial optimizer offload (``offload_optimizer.ratio``, DeepSpeed's ZeRO-Offload++): which
flats' optimizer state lives on the host, and stepping a subset of the optimizer's parameters
from two threads at once.

Note:
    * The split is by trainable flat (a unit's flat buffer: hf_zero's optimizer sub-group),
      the same on every rank (it is computed from padded shard sizes, equal across ranks). The
      host gets the *trailing* flats, the fewest whose elements reach ``ratio`` of this rank's
      optimizer elements (rounded up, so the device never holds more than ``1 - ratio`` of
      it). DeepSpeed splits its sub-groups the same way (the last ones go to the CPU) but counts
      sub-groups, not elements. The trailing flats are the last layers: in backward their
      gradients are reduced first, so their host step starts earliest.
    * ``ratio`` 1.0 is full offload, 0.0 is none (the engine then has no host step at all).
    * ``subset_view(optimizer, pieces)`` is a shallow copy of the user's optimizer (same
      class, same ``state`` dict, same hooks) whose param groups hold only ``pieces`` and a
      snapshot of each group's hyperparameters taken when the view is made. Two views over
      disjoint pieces can step at the same time from two threads: neither mutates the user's
      ``param_groups`` and each touches only its own entries of ``state``.
"""

from __future__ import annotations

from typing import FrozenSet, List, Sequence

import torch


def host_flat_indices(numels: Sequence[int], ratio: float) -> FrozenSet[int]:
    """Indices (into ``numels``, the trainable flats in order) whose optimizer state is on the
    host: the trailing flats, the fewest whose elements reach ``ratio * sum(numels)``."""
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"offload_optimizer.ratio must be in [0, 1], got {ratio}")
    if ratio == 0.0 or not numels:
        return frozenset()
    if ratio == 1.0:
        return frozenset(range(len(numels)))
    target = ratio * sum(numels)
    chosen, acc = [], 0
    for i in range(len(numels) - 1, -1, -1):
        if acc >= target:
            break
        chosen.append(i)
        acc += numels[i]
    return frozenset(chosen)


def host_fraction(numels: Sequence[int], ratio: float) -> float:
    """The fraction of the elements :func:`host_flat_indices` actually puts on the host."""
    total = sum(numels)
    if total == 0:
        return 0.0
    return sum(numels[i] for i in host_flat_indices(numels, ratio)) / total


def subset_view(optimizer: torch.optim.Optimizer, pieces: Sequence) -> torch.optim.Optimizer:
    """A view of ``optimizer`` that steps only ``pieces`` (see the module note). Make it on the
    thread that owns the hyperparameters (the training loop's), step it anywhere."""
    view = object.__new__(type(optimizer))
    view.__dict__.update(optimizer.__dict__)
    view.__dict__.pop("step", None)  # an LR scheduler's step wrapper is bound to the original
    subset: List[list] = [[] for _ in optimizer.param_groups]
    for piece in pieces:
        subset[piece.group].append(piece.param)
    view.param_groups = [dict(g, params=ps) for g, ps in zip(optimizer.param_groups, subset)]
    optimizer._opt_called = True  # what the LR scheduler's wrapper records, for its order check
    return view
