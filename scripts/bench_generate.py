#!/usr/bin/env python
"""Stage-3 ``generate`` against the unsharded model: tokens per second on gloo CPU processes.

    python scripts/bench_generate.py [--world-size 2] [--repeats 7] [--new-tokens 32]

This file is the launcher and the worker. Every worker builds the same random Llama
(``--hidden``, ``--layers``, ``--vocab``; fp32) and generates greedily, with the KV cache,
``--new-tokens`` tokens (``min_new_tokens`` equal, so every call does the same work) from a
prompt of ``--prompt`` tokens, batch ``--batch``, its own prompt on each rank. Variants, each
timed ``--repeats`` times (interleaved: one call of each variant per round) after one untimed
round:

* ``unsharded``: ``model.generate`` on a plain copy of the model (every rank at once, so the
  ranks share the cores as in the other variants);
* ``stage 3, gather once``: ``engine.generate(gather="full")``: the whole model gathered once
  per call, released after;
* ``stage 3, per unit``: ``engine.generate(gather="per_unit")``: every unit all-gathered at
  every forward (``synced_gpus=True``), the least memory;
* and which path ``gather="auto"`` (the default) takes here.

A call's time is the slowest rank's (ranks aligned by an untimed barrier); tokens/s counts the
new tokens of one rank's batch over the median time; "same-round ratio" is the median over rounds
of unsharded time / variant time within one round, which a shared machine's changing load
disturbs least. The tokens of every variant are compared
with the unsharded ones. Prints a table and writes JSON to ``--out`` (default
runs/bench_generate.json).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
VARIANTS = ("unsharded", "stage 3, gather once", "stage 3, per unit")


def worker(args) -> None:
    import torch
    import torch.distributed as dist
    from transformers import LlamaConfig, LlamaForCausalLM

    import hf_zero
    from hf_zero.initialize import init_distributed

    rank, world = init_distributed()
    torch.set_num_threads(1)

    def build():
        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 2,
                          num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=4,
                          max_position_embeddings=args.prompt + args.new_tokens + 8)
        return LlamaForCausalLM(cfg).eval()

    g = torch.Generator().manual_seed(rank + 1)
    prompt = torch.randint(3, args.vocab, (args.batch, args.prompt), generator=g)
    kw = dict(attention_mask=torch.ones_like(prompt), pad_token_id=0, max_new_tokens=args.new_tokens,
              min_new_tokens=args.new_tokens, do_sample=False)
    plain = build()
    engine, *_ = hf_zero.initialize(model=build(), config={"train_micro_batch_size_per_gpu": 1,
                                                           "zero_optimization": {"stage": 3}})
    calls = {
        "unsharded": lambda: plain.generate(prompt, **kw),
        "stage 3, gather once": lambda: engine.generate(prompt, gather="full", **kw),
        "stage 3, per unit": lambda: engine.generate(prompt, gather="per_unit", **kw),
    }
    results = {"hf_zero": hf_zero.__file__, "world_size": world,
               "model": {"hidden": args.hidden, "layers": args.layers, "vocab": args.vocab,
                         "parameters": sum(p.numel() for p in plain.parameters())},
               "prompt": args.prompt, "new_tokens": args.new_tokens, "batch": args.batch, "variants": {}}
    times = {name: [] for name in VARIANTS}
    tokens = {}
    for i in range(1 + args.repeats):  # variants interleaved: a change in the machine's load hits all
        for name in VARIANTS:
            dist.barrier()
            t0 = time.perf_counter()
            with torch.no_grad():
                tokens[name] = calls[name]()
            dt = torch.tensor([time.perf_counter() - t0])
            dist.all_reduce(dt, op=dist.ReduceOp.MAX)
            if i:
                times[name].append(dt.item())
    for name in VARIANTS:
        same = torch.tensor([float(torch.equal(tokens[name], tokens["unsharded"]))])
        dist.all_reduce(same, op=dist.ReduceOp.MIN)
        med = statistics.median(times[name])
        paired = [t / u for t, u in zip(times["unsharded"], times[name])]  # same round, same load
        results["variants"][name] = {"median_s": med, "min_s": min(times[name]),
                                     "tokens_per_s": args.batch * args.new_tokens / med,
                                     "speed_vs_unsharded_paired": statistics.median(paired),
                                     "tokens_equal_unsharded": bool(same.item())}
    engine.generate(prompt, **kw)
    results["auto_path"] = engine.last_generate_path
    engine.destroy()
    if rank == 0:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=1))
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--world-size", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--prompt", type=int, default=16)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--out", default=str(REPO / "runs" / "bench_generate.json"))
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for r in range(args.world_size):
        env = dict(os.environ, RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(args.world_size),
                   LOCAL_WORLD_SIZE=str(args.world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                   OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
        procs.append(subprocess.Popen([sys.executable, __file__, "--worker", *sys.argv[1:]], env=env))
    if any(p.wait() != 0 for p in procs):
        raise SystemExit("a worker failed")
    res = json.loads(Path(args.out).read_text())
    m = res["model"]
    print(f"world {res['world_size']}, Llama hidden {m['hidden']} x {m['layers']} layers, vocab {m['vocab']} "
          f"({m['parameters'] / 1e6:.1f} M parameters), batch {res['batch']}, prompt {res['prompt']}, "
          f"{res['new_tokens']} new tokens, greedy with KV cache; gather='auto' took {res['auto_path']!r}")
    base = res["variants"]["unsharded"]["tokens_per_s"]
    print("| variant | median s / call | tokens/s | vs unsharded | same-round ratio | tokens equal |")
    print("|---|---|---|---|---|---|")
    for name, r in res["variants"].items():
        print(f"| {name} | {r['median_s']:.3f} | {r['tokens_per_s']:.1f} | {r['tokens_per_s'] / base:.2f}x | "
              f"{r['speed_vs_unsharded_paired']:.2f}x | {'yes' if r['tokens_equal_unsharded'] else 'NO'} |")


if __name__ == "__main__":
    main()
