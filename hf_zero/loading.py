"""Loading pretrained weights for ZeRO with one copy of the model in host memory.

Note:
    * Rank 0 reads the checkpoint (``from_pretrained``); every other rank builds the same
      architecture on the meta device, which costs no memory. When the engine is built, rank 0
      broadcasts the weights one unit at a time and each rank keeps only its shard, so host
      memory holds one full model (on rank 0), not one per process.
    * The ranks must agree on the architecture: they all read the same ``config.json``.
"""

from __future__ import annotations

import os
from typing import Any

import torch


def from_pretrained(model_cls: Any, name_or_path: str, **kwargs) -> torch.nn.Module:
    """``model_cls.from_pretrained(name_or_path, **kwargs)`` on rank 0; the same model on the
    meta device elsewhere. Pass the result to ``hf_zero.initialize`` (or a ZeroTrainer /
    ZeroAccelerator), which fills in the weights from rank 0."""
    from .initialize import init_distributed

    rank, _ = init_distributed()
    if rank == 0:
        return model_cls.from_pretrained(name_or_path, **kwargs)
    from transformers import AutoConfig

    config = kwargs.pop("config", None) or AutoConfig.from_pretrained(name_or_path)
    dtype = kwargs.pop("dtype", None) or kwargs.pop("torch_dtype", None)
    with torch.device("meta"):
        model = model_cls.from_config(config) if hasattr(model_cls, "from_config") else model_cls(config)
    if isinstance(dtype, torch.dtype):
        model = model.to(dtype)
    return model


__all__ = ["from_pretrained"]
