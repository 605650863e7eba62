"""A torchrun script for tests/test_teardown.py: build an engine, take one step, then end the
process normally (``ok``) or with an uncaught exception on rank 1 (``raise``).

An ``atexit`` callback registered *before* the engine runs *after* hf_zero's (callbacks run last in,
first out), so it sees whether hf_zero tore the process group down at exit and records it.
"""

import atexit
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from models import batches, build

mode, out_dir = sys.argv[1], Path(sys.argv[2])


def _record():
    rank = int(__import__("os").environ["RANK"])
    (out_dir / f"exit_rank{rank}.json").write_text(json.dumps({"initialized_at_exit": dist.is_initialized()}))


atexit.register(_record)

import hf_zero  # noqa: E402

model = build("llama")
config = {"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": 2},
          "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}}
engine, *_ = hf_zero.initialize(model=model, config=config)
batch = batches(1, 1, engine.world_size)[0][0][engine.rank]
loss = engine(**batch).loss
engine.backward(loss)
engine.step()
if mode == "raise" and engine.rank == 1:
    raise RuntimeError("deliberate failure after one step")
