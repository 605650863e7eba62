"""The methods a DeepSpeed training script calls on its engine, on :class:`ZeroEngine`.

``hf_zero.initialize`` has ``deepspeed.initialize``'s signature, so a script written for
DeepSpeed runs its loop unchanged; these are the engine calls such scripts make besides
forward / backward / step / checkpoints (logging the learning rate, the global batch, whether a
step was applied, a 16-bit export).

Note:
    * DeepSpeed exposes some settings as methods (``engine.gradient_accumulation_steps()``,
      ``engine.gradient_clipping()``) where hf_zero's own code reads attributes. Both work: the
      value is an ``int`` / ``float`` that also answers a call with itself
      (:class:`CallableInt`, :class:`CallableFloat`).
    * ``set_gradient_accumulation_boundary(True/False)`` overrides the micro-step counter's
      decision until it is set to None again, as DeepSpeed's does (pipeline and custom loops).
    * ``was_step_applied()`` is False after a micro-step that was not a boundary and after a
      boundary step that was skipped (fp16 overflow, non-finite gradients).
    * ``save_16bit_model`` writes Hugging Face safetensors through ``save_pretrained`` in the
      compute dtype, never a pickled ``pytorch_model.bin`` (no pickle in hf_zero's files).
    * ``no_sync()`` changes nothing: gradients are reduced as the accumulation boundary says
      (at stages 0-1 only there; at stages 2-3 into the shards at every backward, which gives
      the same sums). DeepSpeed refuses it at stages 2-3; here it stays a no-op because
      Accelerate and the Trainer enter ``model.no_sync()`` on every non-boundary micro-step.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterator, List, Optional

class CallableInt(int):
    """An int that also returns itself when called (``engine.gradient_accumulation_steps()``)."""

    def __call__(self) -> int:
        return int(self)


class CallableFloat(float):
    """A float that also returns itself when called (``engine.gradient_clipping()``)."""

    def __call__(self) -> float:
        return float(self)


class DeepSpeedEngineMethods:
    """Mixed into :class:`hf_zero.engine.engine.ZeroEngine`; reads its attributes only."""

    # -- settings, as DeepSpeed's engine names them
    @property
    def gradient_accumulation_steps(self) -> CallableInt:
        return CallableInt(self._gradient_accumulation_steps)

    @gradient_accumulation_steps.setter
    def gradient_accumulation_steps(self, value: int) -> None:
        self._gradient_accumulation_steps = int(value)

    @property
    def gradient_clipping(self) -> CallableFloat:
        return CallableFloat(self._gradient_clipping)

    @gradient_clipping.setter
    def gradient_clipping(self, value: float) -> None:
        self._gradient_clipping = float(value or 0.0)

    def train_micro_batch_size_per_gpu(self) -> int:
        return int(self.micro_batch_size)

    def train_batch_size(self) -> int:
        """The global batch: micro batch x accumulation steps x data-parallel ranks."""
        return int(self.micro_batch_size) * int(self._gradient_accumulation_steps) * int(self.world_size)

    def zero_optimization_stage(self) -> int:
        return int(self.stage)

    def zero_optimization(self) -> bool:
        return self.stage > 0

    def fp16_enabled(self) -> bool:
        return bool(self.config.fp16.enabled)

    def bfloat16_enabled(self) -> bool:
        return bool(self.config.bf16.enabled)

    bf16_enabled = bfloat16_enabled

    @property
    def global_rank(self) -> int:
        return int(self.rank)

    @property
    def local_rank(self) -> int:
        return int(os.environ.get("LOCAL_RANK", self.rank))

    @property
    def dp_world_size(self) -> int:
        return int(self.world_size)

    @property
    def global_samples(self) -> int:
        """Samples consumed by the optimizer steps so far (skipped steps included, as DeepSpeed counts)."""
        return int(self.global_steps) * self.train_batch_size()

    # -- what the last step did
    def get_lr(self) -> List[float]:
        """The learning rate of each optimizer param group."""
        self._require_optimizer("get_lr")
        return [float(g["lr"]) for g in self.optimizer.param_groups]

    def get_mom(self) -> List:
        """Each param group's momentum: Adam's ``betas``, SGD's ``momentum``."""
        self._require_optimizer("get_mom")
        return [g["betas"] if "betas" in g else g.get("momentum", 0.0) for g in self.optimizer.param_groups]

    def was_step_applied(self) -> bool:
        return bool(self._step_applied)

    def set_gradient_accumulation_boundary(self, is_boundary: Optional[bool]) -> None:
        """Force the next ``step`` to be (True) or not be (False) an accumulation boundary, until
        set to None (then the micro-step counter decides again)."""
        self._boundary_override = None if is_boundary is None else bool(is_boundary)

    # -- memory and export
    def empty_partition_cache(self) -> None:
        """Stage 3: release the gathered units nothing holds: units pinned by
        ``gathered_parameters`` and units a pending backward will read stay."""
        for unit in self.runtime.units:
            self.runtime.release(unit)

    def save_16bit_model(self, save_dir, save_filename: str = "model.safetensors",
                         exclude_frozen_parameters: bool = False) -> bool:
        """Collective: the weights in the compute dtype (bf16 / fp16; fp32 runs keep fp32) as
        Hugging Face safetensors in ``save_dir`` (``save_filename`` is accepted for
        DeepSpeed's signature; the files are named as ``save_pretrained`` names them)."""
        del save_filename
        if exclude_frozen_parameters:
            raise ValueError("hf_zero: save_16bit_model(exclude_frozen_parameters=True) is not supported: "
                             "the export is a whole Hugging Face model that from_pretrained loads")
        self.save_pretrained(save_dir)  # the compute dtype
        return True

    @contextmanager
    def no_sync(self) -> Iterator[None]:
        """A no-op (see the module notes): accumulation follows the boundary, not this context."""
        yield
