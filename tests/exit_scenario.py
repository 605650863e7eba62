"""A torchrun script for tests/test_teardown.py: build an engine, take one step, then end the
process normally (``ok``), after destroying the process group itself (``destroy``, as many
scripts do), or with an uncaught exception on rank 1 (``raise``). The model is a transformers model,
so ``torch.distributed.nn`` is imported after the process group exists (the pinning order).

An ``atexit`` callback registered *before* the engine runs *after* hf_zero's (callbacks run last in,
first out), so it sees whether hf_zero tore the process group down at exit, and which gloo worker threads are still
alive (they must not be: finalization kills any of them that asks for the GIL), and records both.
"""

import atexit
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from models import batches, build

mode, out_dir = sys.argv[1], Path(sys.argv[2])


def _gloo_threads():
    names = (Path(f"/proc/self/task/{t}/comm").read_text().strip() for t in os.listdir("/proc/self/task"))
    return sorted(n for n in names if "gloo" in n)


def _record():
    rank = int(os.environ["RANK"])
    (out_dir / f"exit_rank{rank}.json").write_text(json.dumps(
        {"initialized_at_exit": dist.is_initialized(), "gloo_threads_at_exit": _gloo_threads()}))


atexit.register(_record)

import hf_zero  # noqa: E402
from hf_zero.initialize import init_distributed  # noqa: E402

init_distributed()  # the group first, the model second: the order that pins the group
model = build("llama")
config = {"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": 2},
          "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}}
engine, *_ = hf_zero.initialize(model=model, config=config)
batch = batches(1, 1, engine.world_size)[0][0][engine.rank]
loss = engine(**batch).loss
engine.backward(loss)
engine.step()
if mode == "destroy":
    dist.barrier()
    dist.destroy_process_group()
if mode == "raise" and engine.rank == 1:
    raise RuntimeError("deliberate failure after one step")
