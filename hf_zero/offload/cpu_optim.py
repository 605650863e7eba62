"""The CPU optimizer step for offloaded fp32 shards, and how many threads a rank may use.

Note:
    * The step is memory-bandwidth bound: per element it reads param, grad, exp_avg, exp_avg_sq
      and writes three of them back. One call over a list of flat per-unit tensors (torch's
      fused kernel takes the list in one launch) runs as fast as one call on one flat tensor.
    * Threads: torch's intra-op pool does the work. The ranks on one host share its cores, so
      by default a rank gets ``cores // local ranks`` threads (at least one), counting only the
      cores this process may run on (``os.sched_getaffinity``). More threads than cores only
      adds contention. Set it with ``torch.set_num_threads`` (see ``torch_threads``).
    * The update is torch's AdamW (decoupled weight decay), with ``step`` the 1-based count of
      steps taken including this one.
"""

from __future__ import annotations

import contextlib
import math
import os
from typing import Iterator, List, Optional, Sequence, Tuple, Union

import torch

Tensors = Union[torch.Tensor, Sequence[torch.Tensor]]


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def cpu_threads_per_rank(local_world_size: int, configured: Optional[int] = None) -> int:
    """Threads for one rank's CPU optimizer step: ``configured`` if given, else the usable cores
    divided among the ``local_world_size`` ranks of this host (at least 1)."""
    if configured is not None:
        if int(configured) < 1:
            raise ValueError(f"configured CPU threads must be >= 1, got {configured}")
        return int(configured)
    if local_world_size < 1:
        raise ValueError(f"local_world_size must be >= 1, got {local_world_size}")
    return max(1, usable_cores() // local_world_size)


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run the block with ``torch.set_num_threads(n)``, restoring the previous count after."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _as_list(x: Tensors) -> List[torch.Tensor]:
    return [x] if isinstance(x, torch.Tensor) else list(x)


def _check(params, grads, exp_avg, exp_avg_sq) -> None:
    if not (len(params) == len(grads) == len(exp_avg) == len(exp_avg_sq)):
        raise ValueError("params, grads, exp_avg and exp_avg_sq need the same number of tensors")
    for p, g, m, v in zip(params, grads, exp_avg, exp_avg_sq):
        if not (p.shape == g.shape == m.shape == v.shape):
            raise ValueError(f"shape mismatch: param {tuple(p.shape)}, grad {tuple(g.shape)}, "
                             f"exp_avg {tuple(m.shape)}, exp_avg_sq {tuple(v.shape)}")
        if p.device.type != "cpu" or p.dtype != torch.float32:
            raise ValueError(f"fused_adamw_step works on fp32 CPU tensors, got {p.dtype} on {p.device}")


_FUSED = hasattr(torch, "_fused_adamw_")


def fused_adamw_step(params: Tensors, grads: Tensors, exp_avg: Tensors, exp_avg_sq: Tensors, step: int,
                     lr: float, betas: Tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                     weight_decay: float = 0.01, *, maximize: bool = False, impl: str = "auto") -> str:
    """One AdamW step, in place, on flat fp32 CPU tensors (one tensor or lists of them).

    ``impl``: "auto" (torch's fused kernel when present, else foreach), "fused", "foreach" or
    "loop". Gradients of another dtype (bf16) are converted to fp32 first. Returns the
    implementation used.
    """
    ps, gs, ms, vs = (_as_list(x) for x in (params, grads, exp_avg, exp_avg_sq))
    if step < 1:
        raise ValueError(f"step counts from 1 (the step being taken), got {step}")
    gs = [g if g.dtype == torch.float32 else g.float() for g in gs]
    _check(ps, gs, ms, vs)
    if not ps:
        return "none"
    beta1, beta2 = betas
    if impl == "auto":
        impl = "fused" if _FUSED else "foreach"
    if impl == "fused":
        steps = [torch.tensor(float(step))] * len(ps)   # read-only here: the kernel does not bump it
        torch._fused_adamw_(ps, gs, ms, vs, [], steps, lr=float(lr), beta1=beta1, beta2=beta2,
                            weight_decay=weight_decay, eps=eps, amsgrad=False, maximize=maximize)
        return impl
    bc1 = 1.0 - beta1 ** step
    bc2_sqrt = math.sqrt(1.0 - beta2 ** step)
    step_size = lr / bc1
    if maximize:
        gs = [-g for g in gs]
    if impl == "foreach":
        if weight_decay:
            torch._foreach_mul_(ps, 1.0 - lr * weight_decay)
        torch._foreach_lerp_(ms, gs, 1.0 - beta1)
        torch._foreach_mul_(vs, beta2)
        torch._foreach_addcmul_(vs, gs, gs, 1.0 - beta2)
        denom = torch._foreach_sqrt(vs)
        torch._foreach_div_(denom, bc2_sqrt)
        torch._foreach_add_(denom, eps)
        torch._foreach_addcdiv_(ps, ms, denom, -step_size)
        return impl
    if impl == "loop":
        for p, g, m, v in zip(ps, gs, ms, vs):
            if weight_decay:
                p.mul_(1.0 - lr * weight_decay)
            m.lerp_(g, 1.0 - beta1)
            v.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
            p.addcdiv_(m, v.sqrt().div_(bc2_sqrt).add_(eps), value=-step_size)
        return impl
    raise ValueError(f"unknown impl {impl!r}; use auto, fused, foreach or loop")


def adamw_reference(params: Tensors, grads: Tensors, exp_avg: Tensors, exp_avg_sq: Tensors, step: int,
                    lr: float, betas: Tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                    weight_decay: float = 0.01) -> None:
    """The AdamW update written out term by term (Loshchilov & Hutter), for tests."""
    beta1, beta2 = betas
    for p, g, m, v in zip(*(_as_list(x) for x in (params, grads, exp_avg, exp_avg_sq))):
        g = g.float()
        p.copy_(p * (1 - lr * weight_decay))
        m.copy_(beta1 * m + (1 - beta1) * g)
        v.copy_(beta2 * v + (1 - beta2) * g * g)
        m_hat = m / (1 - beta1 ** step)
        v_hat = v / (1 - beta2 ** step)
        p.copy_(p - lr * m_hat / (torch.sqrt(v_hat) + eps))
