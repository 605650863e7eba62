#!/usr/bin/env python
"""What the reduction rule's agreement costs: step time at stages 2 and 3 on gloo CPU processes.

    python scripts/bench_reduction.py [--world-size 2] [--steps 30] [--src DIR]

This file is the launcher and the worker. Each worker builds a random Llama (``--hidden``,
``--layers``; fp32, AdamW, accumulation 1) once per variant and times ``--steps`` optimizer
steps after 3 untimed ones; a step's time is the slowest rank's forward + backward + step
(ranks aligned by an untimed barrier), and the median is reported. Variants:

* ``stage 2``: the end-of-backward agreement on late gradients (one control all-reduce of a
  flag per unit per backward) is the only collective the reduction rule adds.
* ``stage 3``: that, plus the unit-order check before every all-gather (one control all-reduce
  of ``world`` int64 per gather).
* ``stage 3, no order check``: the same with ``runtime.check_unit_order = False``, to isolate
  the check.

``--src DIR`` imports hf_zero from another checkout (e.g. the code before the rule) for an
old/new comparison; variants that need attributes the old code lacks are skipped there.
Prints one line per variant and writes JSON to ``--out`` (default runs/bench_reduction.json).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench import REPO, spawn_ranks, timed_step, wait_ranks, worker_cmd  # noqa: E402
VARIANTS = (("stage 2", 2, True), ("stage 3", 3, True), ("stage 3, no order check", 3, False))


def step(engine, ids) -> None:
    loss = engine(input_ids=ids, labels=ids).loss
    engine.backward(loss)
    engine.step()


def worker(args) -> None:
    import torch
    import torch.distributed as dist
    from transformers import LlamaConfig, LlamaForCausalLM

    import hf_zero
    from hf_zero.initialize import init_distributed

    rank, world = init_distributed()
    torch.set_num_threads(1)
    results = {"hf_zero": hf_zero.__file__}
    for name, stage, check in VARIANTS:
        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 2,
                          num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=4,
                          max_position_embeddings=args.seq)
        model = LlamaForCausalLM(cfg)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        engine, _, _, _ = hf_zero.initialize(model=model, optimizer=opt, config={
            "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
            "zero_optimization": {"stage": stage}})
        if not check:
            if not hasattr(engine.runtime, "check_unit_order"):
                results[name] = None
                engine.destroy()
                continue
            engine.runtime.check_unit_order = False
        g = torch.Generator().manual_seed(rank + 1)
        times = []
        for i in range(3 + args.steps):
            ids = torch.randint(0, args.vocab, (2, args.seq), generator=g)
            _, dt = timed_step(lambda: step(engine, ids))
            if i >= 3:
                times.append(dt)
        results[name] = {"median_s": statistics.median(times), "min_s": min(times)}
        engine.destroy()
    if rank == 0:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=1))
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--world-size", type=int, default=2)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--src", default=str(REPO), help="checkout whose hf_zero is imported")
    ap.add_argument("--out", default=str(REPO / "runs" / "bench_reduction.json"))
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    procs = spawn_ranks(worker_cmd(__file__, "--worker", *sys.argv[1:]), args.world_size, threads=1,
                        pythonpath=(args.src,))
    if wait_ranks(procs):
        raise SystemExit("a worker failed")
    res = json.loads(Path(args.out).read_text())
    print(f"hf_zero from {res.pop('hf_zero')}; world {args.world_size}, Llama hidden {args.hidden} x "
          f"{args.layers} layers, seq {args.seq}")
    for name, r in res.items():
        print(f"  {name:26s} " + ("n/a" if r is None else f"median {r['median_s'] * 1e3:7.1f} ms  "
                                   f"min {r['min_s'] * 1e3:7.1f} ms"))


if __name__ == "__main__":
    main()
