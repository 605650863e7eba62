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
"""

from __future__ import annotations

from dataclasses import dataclass


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
                        grad_bytes: int = 2, gather_after_step: bool = True) -> float:
    """Bytes one rank sends in one micro-step (accumulation 1).

    ``gather_after_step``: stages 1-2 all-gather the updated parameters after the step (always);
    stage 3 never does (its parameters stay sharded).
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
    return reduce + 2 * frac * num_params * param_bytes
