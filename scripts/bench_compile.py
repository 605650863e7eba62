#!/usr/bin/env python
"""Benchmark torch.compile under hf_zero: eager vs compiled step time at stages 0-3, in one run.

    python scripts/bench_compile.py                 # bench_engine.py's 27.7M Llama (--shape engine), inductor
    python scripts/bench_compile.py --quick         # a small model (--shape quick), a couple of minutes
    python scripts/bench_compile.py --backend aot_eager

This file is both the launcher and the worker (``--world-size`` gloo processes, OMP_NUM_THREADS
as ``--threads``). Every rank builds, from the same seed, one engine per (stage, mode): mode
``eager``, or ``compiled`` (``model = torch.compile(model, backend=...)`` before
``hf_zero.initialize``, the way users write it), each with its own AdamW, and trains them on
identical batches (bench_engine.py's model and data). The schedule is bench_engine.py's: ``--warmup``
untimed steps per variant (the first compiled step compiles; its time is reported as
``first_step_s``), then ``--rounds`` rounds of ``--steps-per-round`` timed steps, the variant order
rotating each round so machine noise falls on all variants alike. A step's time is the slowest
rank's forward + backward + optimizer step. Reported per stage: median eager and compiled step
times and their ratio, the first (compiling) step of each, graph breaks and graphs compiled
(``torch._dynamo.utils.counters``), and the largest train-loss difference between the two modes.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _bench as H  # noqa: E402  (launcher, timing schedule, statistics, machine header)
import bench_engine as BE  # noqa: E402  (bench_engine.py's model, data and run options)


#: model shapes: ``engine`` is bench_engine.py's (its argument defaults), ``quick`` a small one
SHAPES = ("engine", "quick")


def variant_keys(stages) -> list:
    return [f"{s}-{m}" for s in stages for m in ("eager", "compiled")]


class Variant:
    def __init__(self, key: str, args):
        import torch

        import hf_zero

        stage, mode = key.split("-")
        self.key, self.stage, self.mode = key, int(stage), mode
        model = BE.build_model(args)
        opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
        if mode == "compiled":
            model = torch.compile(model, backend=args.backend)
        config = {"train_micro_batch_size_per_gpu": args.micro_batch, "gradient_accumulation_steps": 1,
                  "zero_optimization": {"stage": self.stage}}
        self.engine, *_ = hf_zero.initialize(model=model, optimizer=opt, config=config)
        self.steps = 0

    def step(self, ids) -> float:
        loss = self.engine(input_ids=ids, labels=ids).loss
        self.engine.backward(loss)
        self.engine.step()
        self.steps += 1
        return float(loss.detach())


def counters_now() -> dict:
    from torch._dynamo.utils import counters

    return {"graph_breaks": int(sum(counters["graph_break"].values())),
            "graphs": int(counters["stats"].get("unique_graphs", 0))}


def worker(args) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(args.threads)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo")
    say = (lambda *a: print(*a, file=sys.stderr, flush=True)) if rank == 0 else (lambda *a: None)
    keys = variant_keys([int(s) for s in args.stages.split(",")])
    total = args.warmup + args.rounds * args.steps_per_round
    batches, _ = BE.make_batches(args, rank, total)
    variants = {}
    for k in keys:
        say(f"[bench_compile] building stage {k}")
        variants[k] = Variant(k, args)
    times = {k: [] for k in keys}
    losses = {k: [] for k in keys}
    first = {}
    compile_stats = {}
    recompiles = {k: 0 for k in keys}  # graphs compiled during a variant's steps after its first

    def run(k: str, timed: bool) -> None:
        from torch._dynamo.utils import counters

        v = variants[k]
        if v.steps == 0:
            counters.clear()
        graphs_before = counters_now()["graphs"]
        loss, dt = H.timed_step(lambda: v.step(batches[v.steps]))  # the slowest rank's step
        losses[k].append(loss)
        if v.steps == 1:
            first[k] = dt
            compile_stats[k] = counters_now()
        else:
            recompiles[k] += counters_now()["graphs"] - graphs_before
        if timed:
            times[k].append(dt)

    t_start = time.perf_counter()
    H.run_rounds(keys, run, times, args, say, "bench_compile", t_start)
    result = {"rank": rank, "world_size": world, "wall_s": time.perf_counter() - t_start,
              "variants": {k: {"step_times_s": times[k], "train_losses": losses[k], "first_step_s": first[k],
                               "is_compiled": variants[k].engine.is_compiled,
                               "recompiles": recompiles[k], **compile_stats[k]}
                           for k in keys}}
    (Path(args._out) / f"rank{rank}.json").write_text(json.dumps(result))
    for v in variants.values():
        v.engine.destroy()
    torch._dynamo.reset()
    dist.barrier()
    dist.destroy_process_group()


def launch(args, out_dir: Path) -> list:
    procs = H.spawn_ranks(H.worker_cmd(__file__, *sys.argv[1:], "--_role", "worker", "--_out", out_dir),
                          args.world_size, args.threads)
    failed = H.wait_ranks(procs, args.timeout)
    if failed:
        raise SystemExit(f"bench_compile: the launch failed on rank(s) {[failed]}")
    return [json.loads((out_dir / f"rank{r}.json").read_text()) for r in range(args.world_size)]


def summarize(args, ranks, machine, load_start, load_end) -> dict:
    r0 = ranks[0]["variants"]
    rows = []
    for s in [int(x) for x in args.stages.split(",")]:
        e, c = r0[f"{s}-eager"], r0[f"{s}-compiled"]
        me, mc = statistics.median(e["step_times_s"]), statistics.median(c["step_times_s"])
        rows.append({
            "stage": s,
            "eager_median_s": me, "compiled_median_s": mc, "compiled_over_eager": mc / me,
            "eager_p90_s": H.percentile(e["step_times_s"], 0.9), "compiled_p90_s": H.percentile(c["step_times_s"], 0.9),
            "eager_first_step_s": e["first_step_s"], "compiled_first_step_s": c["first_step_s"],
            "graph_breaks": c["graph_breaks"], "graphs": c["graphs"], "is_compiled": c["is_compiled"],
            "recompiles_after_first_step": max(rk["variants"][f"{s}-compiled"]["recompiles"] for rk in ranks),
            "max_train_loss_diff": max(abs(a - b) for rk in ranks
                                       for a, b in zip(rk["variants"][f"{s}-eager"]["train_losses"],
                                                       rk["variants"][f"{s}-compiled"]["train_losses"])),
        })
    return {"machine": machine, "loadavg_start": load_start, "loadavg_end": load_end,
            "settings": {k: v for k, v in vars(args).items() if not k.startswith("_")},
            "step_time_definition": "per step, the slowest rank's forward+backward+optimizer step; median over timed steps",
            "rows": rows, "raw": ranks}


def table(summary) -> str:
    lines = ["| stage | eager median (s) | compiled median (s) | compiled / eager | first step eager / compiled (s) "
             "| graph breaks | graphs | max loss diff |", "|---|---|---|---|---|---|---|---|"]
    for r in summary["rows"]:
        lines.append(f"| {r['stage']} | {r['eager_median_s']:.3f} | {r['compiled_median_s']:.3f} | "
                     f"**{r['compiled_over_eager']:.2f}** | {r['eager_first_step_s']:.1f} / {r['compiled_first_step_s']:.1f} | "
                     f"{r['graph_breaks']} | {r['graphs']} | {r['max_train_loss_diff']:.1e} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    BE.add_run_args(ap, rounds=4)
    ap.add_argument("--quick", action="store_true", help="a small model and fewer rounds (= --shape quick)")
    ap.add_argument("--shape", choices=SHAPES, default="engine",
                    help="engine: bench_engine.py's 27.7M Llama (its defaults); quick: hidden 128, 2 layers, vocab 1024")
    ap.add_argument("--backend", default="inductor", help="torch.compile backend (inductor, aot_eager, ...)")
    ap.add_argument("--stages", default="0,1,2,3")
    ap.add_argument("--world-size", type=int, default=2)
    ap.add_argument("--json", default="runs/bench_compile.json")
    ap.add_argument("--timeout", type=float, default=3000.0)
    ap.add_argument("--_role", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--_out", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.quick:
        args.shape = "quick"
    if args.shape == "quick":
        args.hidden, args.intermediate, args.layers, args.vocab, args.rounds = 128, 352, 2, 1024, 2
    if args._role == "worker":
        worker(args)
        return
    machine, load_start = H.machine_info(), H.loadavg()
    print(f"[bench_compile] {machine['cpu_model']}, load average {load_start}, backend {args.backend}, "
          f"shape {args.shape}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        ranks = launch(args, Path(tmp))
    summary = summarize(args, ranks, machine, load_start, H.loadavg())
    out = H.write_json(args.json, summary, indent=1)
    print(table(summary))
    print("graphs compiled after each compiled variant's first step (recompiles): "
          + ", ".join(f"stage {r['stage']} {r['recompiles_after_first_step']}" for r in summary["rows"]), flush=True)
    print(f"commit {machine['git_commit']}, load average {load_start} -> {summary['loadavg_end']}; "
          f"figures in {out}", flush=True)


if __name__ == "__main__":
    main()
