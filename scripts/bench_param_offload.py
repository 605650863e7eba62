"""Stage-3 parameter offload on CPU: step time with the parameter shards resident, in (other) CPU
RAM, and in an NVMe swap file with 2 and 4 units of read-ahead; per step, the bytes read and
written, the time the gathers waited for reads, and the share of reads the read-ahead issued.

    .venv/bin/python scripts/bench_param_offload.py [--path runs/param_swap] [--rounds 5]

One process, stage 3, optimizer states in CPU RAM, fp32 (so every variant must give the same
losses, which the table checks), ``--threads`` intra-op threads (default 1: the other core runs
the I/O threads). "read-ahead" is the share of gathers whose read was issued before the gather
asked; "from RAM" the shards per step served from a write still in flight. All variants are alive at once and run in rotating rounds, so machine noise
hits them alike. Prints a table and writes runs/bench_param_offload.json. On a CPU-only box the
"device" is the CPU, so this measures what the swap costs on top of the step, not a GPU's idle
time.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

VARIANTS = {  # name -> offload_param section (None: shards stay where the engine computes)
    "resident": None,
    "cpu": {"device": "cpu"},
    "nvme-bc2": {"device": "nvme", "buffer_count": 2},
    "nvme-bc4": {"device": "nvme", "buffer_count": 4},
}


def build(args):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden,
                                        intermediate_size=int(args.hidden * 2.75), num_hidden_layers=args.layers,
                                        num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=512))


def engine_for(args, name, offload_param):
    import hf_zero

    zo = {"stage": 3, "offload_optimizer": {"device": "cpu"}}
    if offload_param is not None:
        zo["offload_param"] = dict(offload_param)
        if offload_param["device"] == "nvme":
            zo["offload_param"]["nvme_path"] = os.path.join(args.path, name)  # one live store per rank and dir
            os.makedirs(zo["offload_param"]["nvme_path"], exist_ok=True)
    cfg = {"train_micro_batch_size_per_gpu": 2, "gradient_clipping": 1.0, "zero_optimization": zo,
           "aio": {"block_size": args.block_size, "thread_count": args.io_threads},
           "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "weight_decay": 0.0}}}
    return hf_zero.initialize(model=build(args), config=cfg)[0]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--path", default=str(ROOT / "runs" / "param_swap"), help="swap directory (on the disk to measure)")
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--block-size", type=int, default=1 << 20)
    ap.add_argument("--io-threads", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps-per-round", type=int, default=3)
    ap.add_argument("--json", default=str(ROOT / "runs" / "bench_param_offload.json"))
    args = ap.parse_args()
    os.makedirs(args.path, exist_ok=True)
    torch.set_num_threads(args.threads)
    engines = {k: engine_for(args, k, v) for k, v in VARIANTS.items()}
    data = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, args.vocab, (2, args.seq_len), generator=data) for _ in range(64)]
    times = {k: [] for k in engines}
    losses = {k: [] for k in engines}
    counters = {k: {"steps": 0, "read": 0, "written": 0, "wait": 0.0, "acquires": 0, "hits": 0, "from_writes": 0} for k in engines}

    def run(k, timed):
        e = engines[k]
        ids = batches[len(losses[k]) % len(batches)]
        sw = e.param_swap
        before = (sw.bytes_read, sw.bytes_written, sw.wait_seconds, sw.acquires, sw.prefetch_hits,
                  sw.reads_from_pending_writes) if sw else None
        t0 = time.perf_counter()
        loss = e(input_ids=ids, labels=ids).loss
        e.backward(loss)
        e.step()
        dt = time.perf_counter() - t0
        losses[k].append(loss.item())
        if timed:
            times[k].append(dt)
            if sw is not None:
                c = counters[k]
                c["steps"] += 1
                c["read"] += sw.bytes_read - before[0]
                c["written"] += sw.bytes_written - before[1]
                c["wait"] += sw.wait_seconds - before[2]
                c["acquires"] += sw.acquires - before[3]
                c["hits"] += sw.prefetch_hits - before[4]
                c["from_writes"] += sw.reads_from_pending_writes - before[5]

    keys = list(engines)
    for k in keys:  # warm-up: two steps each
        run(k, False)
        run(k, False)
    for r in range(args.rounds):
        order = keys[r % len(keys):] + keys[: r % len(keys)]
        for k in order:
            for _ in range(args.steps_per_round):
                run(k, True)
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{k}={statistics.median(times[k]):.3f}s" for k in keys),
              flush=True)

    direct = {k: (e.param_swap.store.direct if e.param_swap else None) for k, e in engines.items()}
    for e in engines.values():
        e.destroy()
    base = statistics.median(times["resident"])
    rows = []
    for k in keys:
        c = counters[k]
        n = max(c["steps"], 1)
        med = statistics.median(times[k])
        rows.append({
            "variant": k, "step_s": med, "ratio_to_resident": med / base,
            "losses_equal_to_resident": losses[k] == losses["resident"],
            "mb_read_per_step": c["read"] / n / 1e6 if c["steps"] else None,
            "mb_written_per_step": c["written"] / n / 1e6 if c["steps"] else None,
            "read_wait_s_per_step": c["wait"] / n if c["steps"] else None,
            "read_ahead_share": c["hits"] / c["acquires"] if c["acquires"] else None,
            "reads_from_writes_per_step": c["from_writes"] / n if c["steps"] else None,
            "o_direct": direct[k],
        })
    print(f"\nstage 3, 1 process, fp32, {sum(p.numel() for p in build(args).parameters()) / 1e6:.1f}M Llama "
          f"(hidden {args.hidden}, {args.layers} layers), {args.threads} compute thread(s), swap in {args.path}")
    print(f"{'variant':<10} {'step s':>7} {'ratio':>6} {'MB read':>8} {'MB written':>10} {'read wait s':>11} "
          f"{'read-ahead':>10} {'from RAM':>8} {'losses ==':>9}")
    for r in rows:
        def f(v, fmt):
            return format(v, fmt) if v is not None else format("-", ">" + fmt.split(".")[0].rstrip("f%"))
        print(f"{r['variant']:<10} {r['step_s']:>7.3f} {r['ratio_to_resident']:>6.2f} {f(r['mb_read_per_step'], '8.1f')} "
              f"{f(r['mb_written_per_step'], '10.1f')} {f(r['read_wait_s_per_step'], '11.4f')} "
              f"{f(r['read_ahead_share'], '10.0%')} {f(r['reads_from_writes_per_step'], '8.1f')} "
              f"{str(r['losses_equal_to_resident']):>9}")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
