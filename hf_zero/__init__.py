"""hf_zero: ZeRO data parallelism for Hugging Face models, on torch.distributed.

The engine and the config load eagerly; the Accelerate / Trainer integrations and the
checkpoint tools load on first use, so ``import hf_zero`` stays light.

``hf_zero.enable()`` (or ``python -m hf_zero.run SCRIPT``) runs stock Trainer / Accelerator code
on hf_zero; with ``HF_ZERO_CONFIG`` set, importing hf_zero does the same, so that variable is
never silently ignored by a script that loads hf_zero.
"""

import importlib
import os

from .config import ConfigError, ZeroConfig
from .engine import Collectives, OptimizerNotSupported, ZeroEngine
from .engine.access import ShardedParameterError
from .engine.fragments import (
    local_range,
    safe_get_full_fp32_param,
    safe_get_full_grad,
    safe_get_full_optimizer_state,
    safe_get_local_fp32_param,
    safe_get_local_grad,
    safe_get_local_optimizer_state,
    safe_set_full_fp32_param,
    safe_set_full_grad,
    safe_set_full_optimizer_state,
    safe_set_local_fp32_param,
    safe_set_local_grad,
    safe_set_local_optimizer_state,
    safe_update_full_grad_vectorized,
)
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
    "enable": "hf_zero.integrations.bootstrap",
}


if os.environ.get("HF_ZERO_CONFIG"):
    from .integrations.bootstrap import enable as _enable

    _enable()


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'hf_zero' has no attribute {name!r}")


__all__ = ["ConfigError", "ZeroConfig", "ZeroEngine", "Collectives", "OptimizerNotSupported", "initialize",
           "gathered_parameters", "ShardedParameterError", "local_range",
           "safe_get_full_fp32_param", "safe_set_full_fp32_param", "safe_get_local_fp32_param",
           "safe_set_local_fp32_param", "safe_get_full_grad", "safe_set_full_grad", "safe_get_local_grad",
           "safe_set_local_grad", "safe_get_full_optimizer_state", "safe_set_full_optimizer_state",
           "safe_get_local_optimizer_state", "safe_set_local_optimizer_state",
           "safe_update_full_grad_vectorized",
           "__version__", *_LAZY]
