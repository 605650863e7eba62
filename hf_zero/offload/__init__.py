"""Optimizer offload: the NVMe swap store and the CPU optimizer step.

``nvme`` keeps flat fp32 tensors (master weights, optimizer states) in preallocated per-rank
files moved with direct I/O, and ``SwapPipeline`` overlaps reading, stepping and writing them
unit by unit; ``cpu_optim`` is the fused CPU AdamW step on flat tensors and the thread rule;
``partial`` splits the state between host and device (``offload_optimizer.ratio``); ``streams``
moves shards between them off the compute stream.
"""

from hf_zero.offload.cpu_optim import adamw_reference, cpu_threads_per_rank, fused_adamw_step
from hf_zero.offload.nvme import (
    ALIGN,
    ALIGN_ELEMS,
    NvmeSwapStore,
    OffloadError,
    Region,
    SwapIntegrityError,
    SwapPipeline,
    aligned_empty,
    capacity_bytes,
    region_layout,
)

__all__ = [
    "ALIGN", "ALIGN_ELEMS", "NvmeSwapStore", "OffloadError", "Region", "SwapIntegrityError", "SwapPipeline",
    "adamw_reference", "aligned_empty", "capacity_bytes", "cpu_threads_per_rank",
    "fused_adamw_step", "region_layout",
]
