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
                if (self.iteration - self.last_overflow_iteration) % self.window == 0:
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
