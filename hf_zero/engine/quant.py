"""Int8 blockwise quantization for communication (ZeRO++ qwZ and qgZ).

Note:
    * A tensor of ``n`` elements is cut into blocks of ``block`` consecutive elements (``block``
      divides ``n``); each block is stored as int8 values ``round(x / s)`` with its own fp32
      scale ``s = max|x| / 127`` (symmetric, so zero stays exactly zero and padding stays zero).
      The error of an element is at most ``s / 2``: half a step of its block's grid.
    * An all-zero block has scale 0 and dequantizes to zeros. A block holding inf or NaN gets a
      non-finite scale and dequantizes to non-finite values, so overflow checks still see it.
    * Wire cost: ``n`` bytes of values plus ``4 n / block`` bytes of scales, against ``2 n``
      (bf16/fp16) or ``4 n`` (fp32) unquantized.
"""

from __future__ import annotations

from typing import Tuple

import torch

#: the largest block size tried; smaller powers of two are used when it does not divide the size
MAX_BLOCK = 256


def block_size(numel: int, largest: int = MAX_BLOCK) -> int:
    """The largest power of two <= ``largest`` that divides ``numel`` (1 at worst)."""
    b = largest
    while b > 1 and numel % b:
        b //= 2
    return b


def quantize(x: torch.Tensor, block: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """``x`` (1-D, any float dtype) as (int8 values, fp32 scale per block)."""
    blocks = x.detach().reshape(-1, block).float()
    scale = blocks.abs().amax(dim=1) / 127.0
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(blocks / safe[:, None]).clamp_(-127, 127).to(torch.int8)
    return q.reshape(-1), scale


def dequantize(q: torch.Tensor, scale: torch.Tensor, block: int, out: torch.Tensor) -> torch.Tensor:
    """Write the values of (``q``, ``scale``) into ``out`` (1-D, its dtype); returns ``out``."""
    vals = q.reshape(-1, block).float() * scale[:, None]
    out.copy_(vals.reshape(-1))
    return out


def wire_bytes(numel: int, block: int) -> int:
    """Bytes sent for ``numel`` quantized elements (values + scales)."""
    return numel + 4 * (numel // block)
