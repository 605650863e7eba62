"""The ZeRO engine: units of flat buffers, stage hooks, the sharded optimizer step."""

from .collectives import Collectives, CommTotals
from .engine import ZeroEngine
from .optim import OptimizerNotSupported

__all__ = ["Collectives", "CommTotals", "ZeroEngine", "OptimizerNotSupported"]
