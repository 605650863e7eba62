"""Loss scaling for fp16 and the overflow check that decides whether a step is skipped.

Note:
    * The scale is a Python float: it changes only at optimizer-step boundaries, after the
      overflow flag was all-reduced, so every rank holds the same value at all times.
    * ``update(overflow)`` follows DeepSpeed's dynamic scaler: on overflow the hysteresis counter
      is spent first and the scale is divided by ``factor`` once it is used up (never below
      ``min_scale``); after ``window`` clean steps since the last overflow the scale grows by
      ``factor``. ``hysteresis=1`` halves at the first overflow, as ``torch.amp.GradScaler``.
    * A static scaler (``dynamic=False``) never changes and still reports overflows, so the step
      is skipped rather than poisoning the weights.
"""

from __future__ import annotations

from typing import Iterable

import torch


class LossScaler:
    def __init__(
        self,
        initial_scale: float = 1.0,
        *,
        dynamic: bool = False,
        window: int = 1000,
        hysteresis: int = 1,
        consecutive_hysteresis: bool = False,
        min_scale: float = 1.0,
        factor: float = 2.0,
    ):
        self.scale = float(initial_scale)
        self.dynamic = dynamic
        self.window = window
        self.hysteresis = hysteresis
        self.consecutive_hysteresis = consecutive_hysteresis
        self.min_scale = min_scale
        self.factor = factor
        self.hysteresis_left = hysteresis
        self.iteration = 0
        self.last_overflow_iteration = -1

    def update(self, overflow: bool) -> None:
        if self.dynamic:
            if overflow:
                if self.hysteresis_left <= 1:
                    self.scale = max(self.scale / self.factor, self.min_scale)
                else:
                    self.hysteresis_left -= 1
                self.last_overflow_iteration = self.iteration
            else:
                if self.consecutive_hysteresis:
                    self.hysteresis_left = self.hysteresis
                # clean updates since the last overflow, before this one: the scale grows on
                # the update that follows each full window of them (DeepSpeed 0.19.8's rule)
                stable = self.iteration - self.last_overflow_iteration - 1
                if stable > 0 and stable % self.window == 0:
                    if not self.consecutive_hysteresis:
                        self.hysteresis_left = self.hysteresis
                    self.scale *= self.factor
        self.iteration += 1

    def state_dict(self) -> dict:
        return {
            "scale": self.scale,
            "hysteresis_left": self.hysteresis_left,
            "iteration": self.iteration,
            "last_overflow_iteration": self.last_overflow_iteration,
        }

    def load_state_dict(self, state: dict) -> None:
        self.scale = float(state["scale"])
        self.hysteresis_left = int(state["hysteresis_left"])
        self.iteration = int(state["iteration"])
        self.last_overflow_iteration = int(state["last_overflow_iteration"])


def local_overflow(tensors: Iterable[torch.Tensor]) -> torch.Tensor:
    """1.0 if any element of ``tensors`` is inf or nan, else 0.0, as a float32 scalar tensor
    (on the tensors' device; no host sync)."""
    flags = [torch.logical_not(torch.isfinite(t).all()) for t in tensors if t.numel()]
    if not flags:
        return torch.zeros(())
    return torch.stack(flags).any().float()


class NonFiniteError(RuntimeError):
    """Training stopped: steps kept being skipped for non-finite gradients."""


class SkipPolicy:
    """What happens to an optimizer step whose gradients hold inf/NaN, in every precision.

    Note:
        * The decision is global: it is taken from a value every rank holds identically (the
          all-reduced overflow flag in fp16, the all-reduced squared gradient norm otherwise:
          a non-finite element makes the sum non-finite), so all ranks skip together and all
          raise together.
        * A skipped step changes no weight, optimizer state or LR schedule; the step counter
          and ``skipped_steps`` advance, and rank 0 logs it.
        * Stopping: dynamic fp16 raises, as DeepSpeed's ``DynamicLossScaler`` does, at an
          overflow while the scale is already ``min_loss_scale`` and no hysteresis is left.
          Otherwise (fp32, bf16, static fp16) after ``max_consecutive`` skips in a row (0: never).
    """

    def __init__(self, max_consecutive: int, rank: int, logger=None):
        self.max_consecutive = int(max_consecutive)
        self.rank = rank
        self.consecutive = 0
        self._log = logger

    def on_finite(self) -> None:
        self.consecutive = 0

    def on_skip(self, scaler: LossScaler, step: int, what: str) -> None:
        """Record a skipped step (call before ``scaler.update(True)``); raise when it must stop."""
        self.consecutive += 1
        at_min = scaler.dynamic and scaler.scale <= scaler.min_scale and scaler.hysteresis_left <= 1
        if self.rank == 0 and self._log is not None:
            self._log.warning("hf_zero: step %d skipped: %s (loss scale %g; %d skipped in a row)",
                              step, what, scaler.scale, self.consecutive)
        if at_min:
            raise NonFiniteError(
                f"step {step}: {what} with the loss scale already at its minimum "
                f"(fp16.min_loss_scale={scaler.min_scale:g}); it cannot be lowered further, so training "
                "stops (as DeepSpeed does). Check the data and learning rate, or train in bf16"
            )
        if not scaler.dynamic and self.max_consecutive and self.consecutive >= self.max_consecutive:
            raise NonFiniteError(
                f"step {step}: {what}; {self.consecutive} optimizer steps in a row were skipped "
                f"(hf_zero.max_consecutive_skipped_steps={self.max_consecutive}), so training stops. "
                "The weights are those before the first skipped step; check the data and learning rate"
            )
