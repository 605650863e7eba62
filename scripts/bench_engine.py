#!/usr/bin/env python
"""Benchmark hf_zero stages 0-3 against torch DDP on CPU processes over gloo.

One command runs everything; this file is both the launcher and the worker:

    python scripts/bench_engine.py            # full run (a few minutes on 2 cores)
    python scripts/bench_engine.py --quick    # smoke run (about a minute)

What it measures
----------------
* Timing launch: ``--world-size`` worker processes (torchrun-style environment, gloo,
  OMP_NUM_THREADS=1) build all five variants from the same seed -- DDP with a plain AdamW and
  hf_zero stages 0, 1, 2, 3 with the same AdamW handed to ``hf_zero.initialize`` -- and train
  them on identical batches. After ``--warmup`` untimed steps per variant they run ``--rounds``
  rounds; in each round every variant does ``--steps-per-round`` timed optimizer steps, the
  variant order rotating from round to round, so load from other users of the machine falls on
  all variants alike. A step's time is the slowest rank's time for forward + backward +
  optimizer step. A variant's steps within a round run back to back: one untimed barrier
  before them, and the last one includes finishing the work its step left in the background
  (``_bench.StepBlocks``), so overlap with the next forward counts and nothing escapes the clock.
* Model-state bytes per rank: ``engine.memory_report()["model_state_bytes"]``; for DDP the sum
  of parameter, gradient and AdamW-state tensor sizes (DDP's own gradient buckets are reported
  apart, they are not model states).
* Communication per step per rank: ``memory_report()["comm_bytes_last_step"]["data"]``; for
  DDP the ring all-reduce volume 2(N-1)/N x gradient bytes.
* Loss agreement: after the same number of steps on the same data, every variant evaluates
  the same held-out batch; the report gives each loss and the largest difference.
* Peak RSS: RSS is per process, and the timing launch holds all five models in one process, so
  its peak says nothing per variant. Unless ``--no-rss``, the launcher therefore starts one
  extra launch per variant, sequentially, each building only that variant and running a few
  steps, and reports ``getrusage(RUSAGE_SELF).ru_maxrss`` of every rank at the end (plus the
  process's VmHWM before the model was built, as the baseline of torch + transformers).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench import (  # noqa: E402,F401  (stdlib-only at import time; re-exported for bench_peers/bench_compile)
    MB,
    REPO,
    free_port,
    loadavg,
    machine_info,
    malloc_stats,
    markdown_table,
    per_rank,
    percentile,
    proc_status_kb,
    StepBlocks,
    run_rounds,
    spawn_ranks,
    wait_ranks,
    worker_cmd,
    write_json,
)

VARIANTS = ("ddp", "0", "1", "2", "3")


# ---------------------------------------------------------------------------------- helpers
def variant_name(v: str) -> str:
    return "torch DDP" if v == "ddp" else f"hf_zero stage {v}"


# ---------------------------------------------------------------------------------- worker
def build_model(args):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        max_position_embeddings=max(args.seq_len, 128),
    )
    torch.manual_seed(args.seed)
    model = LlamaForCausalLM(cfg).float()
    model.train()
    return model


def make_batches(args, rank: int, count: int):
    """``count`` training batches for ``rank`` plus one held-out batch, identical for every
    variant. Each sequence repeats a random 16-token motif with noise, so the loss can fall."""
    import torch

    out = []
    for i in range(count + 1):
        g = torch.Generator().manual_seed(args.seed * 1_000_003 + i * 97 + rank * 7919 + 1)
        motif = torch.randint(0, args.vocab, (args.micro_batch, 16), generator=g)
        reps = -(-args.seq_len // 16)
        ids = motif.repeat(1, reps)[:, : args.seq_len].clone()
        noise = torch.rand(ids.shape, generator=g) < 0.1
        ids[noise] = torch.randint(0, args.vocab, (int(noise.sum()),), generator=g)
        out.append(ids)
    return out[:count], out[count]


class PeakSampler:
    """A thread reading VmRSS every ``period`` seconds until ``stop()``; ``at_peak`` holds
    ``malloc_stats()`` (plus ``vmrss``) taken at the highest VmRSS seen."""

    def __init__(self, period: float = 0.002):
        import threading

        self.at_peak: dict = {}
        self._best = -1
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(period,), daemon=True)
        self._thread.start()

    def _run(self, period: float) -> None:
        while not self._done.wait(period):
            rss = proc_status_kb("VmRSS") * 1024
            if rss > self._best:
                self._best = rss
                self.at_peak = {"vmrss": rss, **malloc_stats()}

    def stop(self) -> None:
        self._done.set()
        self._thread.join()


class Variant:
    """One model under one data-parallel wrapper, with a uniform step()."""

    def __init__(self, key: str, args, world: int):
        import torch

        self.key = key
        self.world = world
        model = build_model(args)
        self.num_params = sum(p.numel() for p in model.parameters())
        self.trainable_numel = sum(p.numel() for p in model.parameters() if p.requires_grad)
        opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
        if key == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            self.ddp = DistributedDataParallel(model)
            self.model = model
            self.opt = opt
            self.engine = None
        else:
            import hf_zero

            config = {
                "train_micro_batch_size_per_gpu": args.micro_batch,
                "gradient_accumulation_steps": 1,
                "zero_optimization": {"stage": int(key)},
            }
            self.engine, self.opt, _, _ = hf_zero.initialize(model=model, optimizer=opt, config=config)
            self.model = model
        self.steps = 0
        self.last_loss = float("nan")

    def step(self, ids) -> float:
        if self.engine is None:
            loss = self.ddp(input_ids=ids, labels=ids).loss
            loss.backward()
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
        else:
            loss = self.engine(input_ids=ids, labels=ids).loss
            self.engine.backward(loss)
            self.engine.step()
        self.steps += 1
        self.last_loss = float(loss.detach())
        return self.last_loss

    def settle(self) -> None:
        """Finish what the step left running in the background (hf_zero stages 1-2: the
        post-step all-gathers, otherwise waited for by the next forward)."""
        if self.engine is not None:
            self.engine.wait_for_parameters()

    def eval_loss(self, ids) -> float:
        import torch
        import torch.distributed as dist

        with torch.no_grad():
            if self.engine is None:
                loss = self.model(input_ids=ids, labels=ids).loss
            else:
                self.engine.eval()
                loss = self.engine(input_ids=ids, labels=ids).loss
                self.engine.train()
        t = loss.detach().double().reshape(1)
        dist.all_reduce(t)
        return float(t.item()) / self.world

    def report(self) -> dict:
        """Model-state bytes and last-step communication of this rank."""
        if self.engine is not None:
            r = self.engine.memory_report()
            return {
                "param_bytes": r["param_bytes"],
                "grad_bytes": r["grad_bytes"],
                "master_bytes": r["master_bytes"],
                "optimizer_state_bytes": r["optimizer_state_bytes"],
                "model_state_bytes": r["model_state_bytes"],
                "comm_bytes_last_step": r["comm_bytes_last_step"]["data"],
                "comm_detail": r["comm_bytes_last_step"],
                "engine_num_parameters": r["num_parameters"],
                "backward_gathered_numel": r["backward_gathered_numel"],
            }
        params = [p for p in self.model.parameters()]
        pbytes = sum(p.numel() * p.element_size() for p in params)
        # Gradients are freed by zero_grad(set_to_none=True) between steps, but exist from
        # backward to the optimizer step: count one gradient per trainable parameter.
        gbytes = sum(p.numel() * p.element_size() for p in params if p.requires_grad)
        sbytes = 0
        for st in self.opt.state.values():
            for v in st.values():
                if hasattr(v, "numel") and hasattr(v, "element_size"):
                    sbytes += v.numel() * v.element_size()
        n = self.world
        comm = 2 * (n - 1) / n * gbytes if n > 1 else 0.0
        bucket_bytes = None
        try:  # private API; only for information
            bucket_bytes = sum(
                b.buffer().numel() * b.buffer().element_size()
                for b in self.ddp.reducer._get_zeros_like_grad_buckets()
            )
        except Exception:
            pass
        return {
            "param_bytes": pbytes,
            "grad_bytes": gbytes,
            "master_bytes": 0,
            "optimizer_state_bytes": sbytes,
            "model_state_bytes": pbytes + gbytes + sbytes,
            "comm_bytes_last_step": int(round(comm)),
            "comm_detail": {"all_reduce": int(round(comm)), "data": int(round(comm))},
            "ddp_bucket_bytes_not_counted": bucket_bytes,
        }


def worker(args) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(args.threads)
    rank = int(os.environ["RANK"])
    world = int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo")
    say = (lambda *a: print(*a, file=sys.stderr, flush=True)) if rank == 0 else (lambda *a: None)
    keys = args.variants.split(",")
    result = {"rank": rank, "world_size": world, "role": args._role}

    if args._role == "rss":
        # One variant per launch: the process's peak RSS belongs to it alone.
        baseline_hwm_kb = proc_status_kb("VmHWM")
        v = Variant(keys[0], args, world)
        trace = [("built", proc_status_kb("VmRSS") * 1024, proc_status_kb("VmHWM") * 1024)]
        batches, _ = make_batches(args, rank, args.rss_steps)
        heap = []
        peak = PeakSampler()  # glibc's heap at the highest RSS it sees (every 2 ms)
        for i, ids in enumerate(batches):
            dist.barrier()
            v.step(ids)
            trace.append((f"step {i + 1}", proc_status_kb("VmRSS") * 1024, proc_status_kb("VmHWM") * 1024))
            heap.append(malloc_stats())
        peak.stop()
        dist.barrier()
        result["vmrss_vmhwm_trace_bytes"] = trace
        result["malloc_after_each_step"] = heap
        result["malloc_at_sampled_peak"] = peak.at_peak
        result.update(
            variant=keys[0],
            baseline_vmhwm_bytes=baseline_hwm_kb * 1024,
            ru_maxrss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            vmhwm_bytes=proc_status_kb("VmHWM") * 1024,
            steps=args.rss_steps,
        )
    else:
        total = args.warmup + args.rounds * args.steps_per_round
        batches, held_out = make_batches(args, rank, total)
        variants = {}
        rss_before = proc_status_kb("VmRSS")
        for k in keys:
            say(f"[bench] building {variant_name(k)}")
            variants[k] = Variant(k, args, world)
        result["num_parameters"] = variants[keys[0]].num_params
        result["vmrss_after_build_bytes"] = proc_status_kb("VmRSS") * 1024
        result["vmrss_before_build_bytes"] = rss_before * 1024
        times = {k: [] for k in keys}
        losses = {k: [] for k in keys}

        blocks = StepBlocks()

        def run(k: str, timed: bool) -> None:
            v = variants[k]
            if blocks.begin(k, args.steps_per_round if timed else 1):
                dist.barrier()
            t0 = time.perf_counter()
            loss = v.step(batches[v.steps])
            if blocks.end():
                v.settle()
            dt = time.perf_counter() - t0
            losses[k].append(loss)
            if timed:
                times[k].append(dt)

        t_start = time.perf_counter()
        run_rounds(keys, run, times, args, say, "bench", t_start)
        result["wall_s"] = time.perf_counter() - t_start
        result["variants"] = {}
        for k in keys:
            v = variants[k]
            rep = v.report()
            result["variants"][k] = {
                "step_times_s": times[k],
                "train_losses": losses[k],
                "steps": v.steps,
                "eval_loss": v.eval_loss(held_out),
                **rep,
            }
        result["vmhwm_all_variants_bytes"] = proc_status_kb("VmHWM") * 1024

    out = Path(args._out) / f"{args._role}-{'-'.join(keys)}-rank{rank}.json"
    out.write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


# ---------------------------------------------------------------------------------- launcher
def launch(args, role: str, variants: str, out_dir: Path) -> list:
    procs = spawn_ranks(worker_cmd(__file__, *sys.argv[1:], "--variants", variants, "--_role", role,
                                   "--_out", out_dir), args.world_size, args.threads)
    failed = wait_ranks(procs, args.timeout)
    if failed:
        raise SystemExit(f"bench_engine: {role} launch ({variants}) failed on rank(s) {[failed]}")
    keys = "-".join(variants.split(","))
    return [json.loads((out_dir / f"{role}-{keys}-rank{r}.json").read_text()) for r in range(args.world_size)]


def summarize(args, main_ranks, rss_ranks, machine, load_start, load_end) -> dict:
    from hf_zero.memory import comm_bytes_per_step, model_state_bytes

    keys = args.variants.split(",")
    world = args.world_size
    psi = main_ranks[0]["num_parameters"]
    out = {
        "machine": machine,
        "loadavg_start": load_start,
        "loadavg_end": load_end,
        "settings": {k: v for k, v in vars(args).items() if not k.startswith("_")},
        "num_parameters": psi,
        "world_size": world,
        "backend": "gloo",
        "dtype": "fp32",
        "step_time_definition": ("per step, the slowest rank's forward+backward+optimizer step; median over timed steps; a variant's "
                                 "steps in a round run back to back and the last includes its background work (StepBlocks)"),
        "rss_method": (
            "separate sequential launch per variant; getrusage(RUSAGE_SELF).ru_maxrss of each rank at the end "
            f"(after {args.rss_steps} steps); baseline = VmHWM after imports and process-group init, before the model"
            if rss_ranks else "not measured (--no-rss)"
        ),
        "timing_launch_wall_s": max(r["wall_s"] for r in main_ranks),
        "timing_launch_vmhwm_all_variants_bytes": [r["vmhwm_all_variants_bytes"] for r in main_ranks],
        "variants": {},
    }
    for k in keys:
        per = [r["variants"][k] for r in main_ranks]
        step_times = [max(ts) for ts in zip(*(p["step_times_s"] for p in per))]
        stage = None if k == "ddp" else int(k)
        formula_stage = 0 if k == "ddp" else stage
        f_state = model_state_bytes(psi, formula_stage, world, param_bytes=4, grad_bytes=4, master_bytes=0,
                                    optimizer_state_bytes=8).total
        f_comm = comm_bytes_per_step(psi, formula_stage, world, param_bytes=4, grad_bytes=4,
                                     backward_gathered=per[0].get("backward_gathered_numel"))
        entry = {
            "name": variant_name(k),
            "step_times_s": step_times,
            "median_s": statistics.median(step_times) if step_times else float("nan"),
            "p25_s": percentile(step_times, 0.25),
            "p75_s": percentile(step_times, 0.75),
            "eval_loss": per[0]["eval_loss"],
            "last_train_loss_per_rank": [p["train_losses"][-1] for p in per],
            "steps": per[0]["steps"],
            "model_state_bytes_per_rank": [p["model_state_bytes"] for p in per],
            "model_state_breakdown_per_rank": [
                {x: p[x] for x in ("param_bytes", "grad_bytes", "master_bytes", "optimizer_state_bytes")} for p in per
            ],
            "comm_bytes_last_step_per_rank": [p["comm_bytes_last_step"] for p in per],
            "comm_detail_per_rank": [p["comm_detail"] for p in per],
            "formula_model_state_bytes": f_state,
            "formula_comm_bytes_per_step": f_comm,
        }
        if k == "ddp":
            entry["ddp_bucket_bytes_not_counted_per_rank"] = [p.get("ddp_bucket_bytes_not_counted") for p in per]
        if rss_ranks and k in rss_ranks:
            rr = rss_ranks[k]
            entry["peak_rss_bytes_per_rank"] = [r["ru_maxrss_bytes"] for r in rr]
            entry["baseline_vmhwm_bytes_per_rank"] = [r["baseline_vmhwm_bytes"] for r in rr]
            entry["malloc_after_last_step_per_rank"] = [(r.get("malloc_after_each_step") or [{}])[-1] for r in rr]
            entry["malloc_at_sampled_peak_per_rank"] = [r.get("malloc_at_sampled_peak") or {} for r in rr]
        else:
            entry["peak_rss_bytes_per_rank"] = [None] * world
        out["variants"][k] = entry
    base = out["variants"].get("ddp")
    for k, e in out["variants"].items():
        e["ratio_to_ddp"] = e["median_s"] / base["median_s"] if base else None
    losses = [e["eval_loss"] for e in out["variants"].values()]
    out["max_eval_loss_difference"] = max(losses) - min(losses)
    return out


def render(summary: dict) -> str:
    lines = []
    m = summary["machine"]
    world = summary["world_size"]
    lines.append(
        f"model: Llama, {summary['num_parameters']:,} parameters (fp32), {world} gloo processes, "
        f"micro batch {summary['settings']['micro_batch']} x seq {summary['settings']['seq_len']}, AdamW"
    )
    lines.append(
        f"machine: {m['cpu_model']}, {m['usable_cpus']} usable CPUs, torch {m['torch']}, "
        f"transformers {m['transformers']}, {summary['settings']['threads']} thread(s)/process"
    )
    lines.append(f"load average at start / end: {summary['loadavg_start']} / {summary['loadavg_end']}")
    lines.append("")
    rows = [("variant", "median s/step", "p25-p75 s", "ratio to DDP", "model-state MB/rank",
             "comm MB/step/rank", "final loss", "peak RSS MB/rank")]
    for k, e in summary["variants"].items():
        rows.append((
            e["name"],
            f"{e['median_s']:.3f}",
            f"{e['p25_s']:.3f}-{e['p75_s']:.3f}",
            f"{e['ratio_to_ddp']:.2f}" if e["ratio_to_ddp"] is not None else "n/a",
            per_rank(e["model_state_bytes_per_rank"]),
            per_rank(e["comm_bytes_last_step_per_rank"]),
            f"{e['eval_loss']:.6f}",
            per_rank(e["peak_rss_bytes_per_rank"], fmt="{:.0f}"),
        ))
    lines += markdown_table(rows)
    lines.append("")
    n_timed = len(next(iter(summary["variants"].values()))["step_times_s"])
    lines.append(
        f"Timed steps per variant: {n_timed} (after {summary['settings']['warmup']} warm-up), "
        f"{summary['settings']['rounds']} round-robin rounds; step time = slowest rank. MB = 10^6 bytes; "
        "'a / b' = rank 0 / rank 1 where they differ."
    )
    lines.append(
        f"final loss = mean over ranks of the loss on one held-out batch after "
        f"{next(iter(summary['variants'].values()))['steps']} steps; max difference across variants: "
        f"{summary['max_eval_loss_difference']:.3g}"
    )
    lines.append(f"peak RSS: {summary['rss_method']}")
    base = [b for e in summary["variants"].values() for b in (e.get("baseline_vmhwm_bytes_per_rank") or [])]
    if base:
        lines.append(f"  (baseline before any model: {min(base) / MB:.0f}-{max(base) / MB:.0f} MB; glibc malloc, "
                     "so freed heap memory can stay resident and count in the peak)")
    for key, what in (("malloc_at_sampled_peak_per_rank", "at the highest RSS sampled (every 2 ms)"),
                      ("malloc_after_last_step_per_rank", "after the last RSS step")):
        heaps = [(e["name"], (e.get(key) or [{}])[0]) for e in summary["variants"].values()]
        if not any(m.get("heap") is not None for _, m in heaps):
            continue
        lines.append(f"  glibc malloc {what}, rank 0 (MB): heap size = in use + free; free heap chunks below "
                     "the topmost one in use stay resident")
        for name, m in heaps:
            if m.get("heap") is not None:
                at = f" (RSS {m['vmrss'] / MB:.0f})" if "vmrss" in m else ""
                lines.append(f"    {name:<16} heap {m['heap'] / MB:.0f} = {m['in_use'] / MB:.0f} in use + "
                             f"{m['free'] / MB:.0f} free; malloc's own mappings {m['mmapped'] / MB:.0f}{at}")
    ddp = summary["variants"].get("ddp")
    if ddp and ddp.get("ddp_bucket_bytes_not_counted_per_rank", [None])[0]:
        lines.append(
            f"DDP model states = params + grads + AdamW states; its gradient buckets "
            f"({per_rank(ddp['ddp_bucket_bytes_not_counted_per_rank'])} MB/rank) are extra and not counted."
        )
    lines.append("")
    lines.append("measured vs hf_zero.memory formulas (fp32: params 4, grads 4, no master copy, AdamW 8 bytes/param):")
    for k, e in summary["variants"].items():
        lines.append(
            f"  {e['name']:<16} model states {per_rank(e['model_state_bytes_per_rank'], fmt='{:.2f}')} MB"
            f" (formula {e['formula_model_state_bytes'] / MB:.2f}),"
            f" comm {per_rank(e['comm_bytes_last_step_per_rank'], fmt='{:.2f}')} MB"
            f" (formula {e['formula_comm_bytes_per_step'] / MB:.2f})"
        )
    return "\n".join(lines)


def add_run_args(ap: argparse.ArgumentParser, *, rounds: int) -> None:
    """The model, data and schedule options shared with scripts/bench_peers.py."""
    ap.add_argument("--threads", type=int, default=1, help="torch / OpenMP threads per process")
    ap.add_argument("--micro-batch", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--intermediate", type=int, default=1408)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--weight-decay", type=float, default=0.01)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps per variant")
    ap.add_argument("--rounds", type=int, default=rounds)
    ap.add_argument("--steps-per-round", type=int, default=3)
    ap.add_argument("--rss-steps", type=int, default=3, help="steps run in each per-variant RSS launch")
    ap.add_argument("--no-rss", action="store_true", help="skip the per-variant peak-RSS launches")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: 1 warm-up step, 2 rounds of 1 step, 2-step RSS launches")
    ap.add_argument("--world-size", type=int, default=2)
    add_run_args(ap, rounds=8)
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma list of ddp,0,1,2,3")
    ap.add_argument("--json", default="runs/bench_engine.json", help="where to write all figures")
    ap.add_argument("--timeout", type=float, default=1500.0, help="seconds per launch")
    ap.add_argument("--_role", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--_out", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.quick:
        args.warmup, args.rounds, args.steps_per_round, args.rss_steps = 1, 2, 1, 2
    bad = [v for v in args.variants.split(",") if v not in VARIANTS]
    if bad:
        ap.error(f"unknown variant(s) {bad}; choose from {','.join(VARIANTS)}")
    return args


def main() -> None:
    args = parse_args()
    if args._role is not None:
        sys.path.insert(0, str(REPO))
        worker(args)
        return
    sys.path.insert(0, str(REPO))
    machine = machine_info()
    load_start = loadavg()
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="bench_engine_") as tmp:
        tmp = Path(tmp)
        print(f"[bench] timing launch: {args.world_size} processes, variants {args.variants}", file=sys.stderr, flush=True)
        main_ranks = launch(args, "main", args.variants, tmp)
        rss = {}
        if not args.no_rss:
            for k in args.variants.split(","):
                print(f"[bench] peak-RSS launch: {variant_name(k)}", file=sys.stderr, flush=True)
                rss[k] = launch(args, "rss", k, tmp)
    summary = summarize(args, main_ranks, rss, machine, load_start, loadavg())
    summary["total_wall_s"] = time.time() - t0
    command = "python scripts/bench_engine.py" + ("" if len(sys.argv) == 1 else " " + " ".join(sys.argv[1:]))
    summary["command"] = command
    table = render(summary)
    summary["table"] = table
    print(table)
    path = write_json(args.json, summary)
    print(f"\nwrote {path} (total {summary['total_wall_s']:.0f}s)")


if __name__ == "__main__":
    main()
