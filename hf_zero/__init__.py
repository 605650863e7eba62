"""hf_zero: ZeRO data parallelism for Hugging Face models, on torch.distributed."""

from .config import ConfigError, ZeroConfig
from .engine import Collectives, OptimizerNotSupported, ZeroEngine
from .initialize import initialize

__version__ = "0.1.0"

__all__ = ["ConfigError", "ZeroConfig", "ZeroEngine", "Collectives", "OptimizerNotSupported", "initialize", "__version__"]
