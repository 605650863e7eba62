"""hf_zero: ZeRO data parallelism for Hugging Face models, on torch.distributed.

The engine and the config load eagerly; the Accelerate / Trainer integrations and the
checkpoint tools load on first use, so ``import hf_zero`` stays light.
"""

import importlib

from .config import ConfigError, ZeroConfig
from .engine import Collectives, OptimizerNotSupported, ZeroEngine
from .engine.access import ShardedParameterError
from .engine.gather import gathered_parameters
from .initialize import initialize

__version__ = "0.1.0"

_LAZY = {
    "ZeroPlugin": "hf_zero.integrations.accelerate",
    "ZeroAccelerator": "hf_zero.integrations.accelerate",
    "ZeroTrainingArguments": "hf_zero.integrations.trainer",
    "ZeroTrainer": "hf_zero.integrations.trainer",
    "ZeroTrainerMixin": "hf_zero.integrations.trainer",
    "ZeroCallback": "hf_zero.integrations.trainer",
    "consolidate": "hf_zero.checkpoint.consolidate",
    "from_pretrained": "hf_zero.loading",
}


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'hf_zero' has no attribute {name!r}")


__all__ = ["ConfigError", "ZeroConfig", "ZeroEngine", "Collectives", "OptimizerNotSupported", "initialize",
           "gathered_parameters", "ShardedParameterError",
           "__version__", *_LAZY]
