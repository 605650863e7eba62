"""``hf_zero.initialize``: the ``deepspeed.initialize``-shaped entry point.

Note:
    * It joins the process group the launcher describes (``torchrun`` / ``accelerate launch``
      environment variables) or, with no launcher, runs as a world of one without one.
    * The device is ``cuda:LOCAL_RANK`` when CUDA is available (NCCL), else the CPU (gloo).
    * The config is resolved against the real world size before anything is built, so a batch
      size that cannot work fails before the model is touched.
"""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Any, Optional, Tuple

import torch
import torch.distributed as dist

from .config import ZeroConfig
from .engine.collectives import Collectives
from .engine.engine import ZeroEngine


def init_distributed(backend: Optional[str] = None, timeout_s: float = 1800.0) -> Tuple[int, int]:
    """Join the launcher's process group if there is one; return ``(rank, world_size)``.

    Raises when the launcher asked for ``WORLD_SIZE`` processes and a different number joined.
    """
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    elif "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ:
        if backend is None:
            backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))
        rank, world = dist.get_rank(), dist.get_world_size()
    else:
        return 0, 1
    expected = int(os.environ.get("WORLD_SIZE", world))
    if expected != world:
        raise RuntimeError(
            f"the launcher asked for WORLD_SIZE={expected} processes but {world} joined the process group"
        )
    return rank, world


def default_device() -> torch.device:
    if torch.cuda.is_available() and (not dist.is_initialized() or dist.get_backend() == "nccl"):
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def initialize(
    model: torch.nn.Module,
    optimizer: Any = None,
    model_parameters: Any = None,
    training_data: Any = None,
    lr_scheduler: Any = None,
    config: Any = None,
    collate_fn: Any = None,
    config_params: Any = None,
    dist_init_required: Optional[bool] = None,
    timeout: Optional[float] = None,
):
    """Wrap ``model`` for ZeRO training; returns ``(engine, optimizer, dataloader, lr_scheduler)``.

    ``config`` is a path to a DeepSpeed-format JSON file, a dict, or a :class:`ZeroConfig`
    (``config_params`` is accepted as DeepSpeed's older name for it). ``optimizer`` is a torch
    optimizer over the model's parameters, a callable building one from parameters, or None to
    use the config's ``optimizer`` section. ``lr_scheduler`` is a scheduler or a callable taking
    the optimizer. ``training_data`` (a torch Dataset) gets a distributed DataLoader with the
    micro-batch size. ``timeout`` (seconds, or a ``timedelta``): the process group's timeout for
    every collective when this call creates the group (default 1800 s, torch's), so a frozen
    peer ends the job with an error instead of a long wait.
    """
    if config is None:
        config = config_params
    if config is None:
        raise ValueError("initialize() needs config= (a JSON path, a dict or a ZeroConfig)")
    cfg = ZeroConfig.load(config)
    if dist_init_required is not False:
        if timeout is None:
            init_distributed()
        else:
            init_distributed(timeout_s=timeout.total_seconds() if isinstance(timeout, timedelta) else float(timeout))
    comm = Collectives()
    hidden = getattr(getattr(model, "config", None), "hidden_size", None)
    values = {"hidden_size": hidden} if hidden else {}
    cfg = cfg.resolve(world_size=comm.world_size, values=values)
    engine = ZeroEngine(
        model,
        cfg,
        comm=comm,
        device=default_device(),
        optimizer=optimizer,
        model_parameters=model_parameters,
        lr_scheduler=lr_scheduler,
    )
    dataloader = None
    if training_data is not None:
        dataloader = make_dataloader(training_data, engine.micro_batch_size, comm.rank, comm.world_size, collate_fn)
        engine.training_dataloader = dataloader
    return engine, engine.optimizer, dataloader, engine.lr_scheduler


class ResumableDataLoader:
    """The training DataLoader ``initialize`` returns: each rank reads its 1/world_size of the
    dataset in micro-batches, reshuffled every epoch (``DistributedSampler.set_epoch``), and
    knows its position, so a resumed engine continues with the next unseen micro-batch.

    The position is the engine's micro-step count (one micro-batch per ``engine.step()``):
    epoch ``micro_steps // len(self)``, batch ``micro_steps % len(self)`` within it. Checkpoints
    store it; ``engine.load_checkpoint`` moves the loader there.
    """

    def __init__(self, loader):
        self.loader = loader
        self.sampler = loader.sampler
        self.epoch = 0
        self._skip = 0

    def __len__(self) -> int:
        return len(self.loader)

    def seek(self, micro_steps: int) -> None:
        """Start the next iteration at the micro-batch following ``micro_steps`` consumed ones."""
        self.epoch, self._skip = divmod(int(micro_steps), max(1, len(self.loader)))

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batches_per_epoch": len(self.loader)}

    def __iter__(self):
        self.sampler.set_epoch(self.epoch)
        skip, self._skip = self._skip, 0
        for i, batch in enumerate(self.loader):
            if i >= skip:
                yield batch
        self.epoch += 1


def make_dataloader(dataset, micro_batch_size: int, rank: int, world_size: int, collate_fn=None, seed: int = 0):
    from torch.utils.data import DataLoader, DistributedSampler

    sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed)
    return ResumableDataLoader(DataLoader(dataset, batch_size=micro_batch_size, sampler=sampler, collate_fn=collate_fn))
