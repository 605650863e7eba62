"""End-to-end offload on CPU: step time without offload, with exact CPU offload (clipping on, so
the CPU step waits for backward), with eager per-unit steps (no clipping: a unit's CPU step runs
on the worker thread while backward continues), and with the one-step delayed update; the share
of the CPU optimizer step that was hidden; and the delayed update's loss curve against the exact
one on the embedded addition data.

    .venv/bin/python scripts/bench_offload_e2e.py [--steps 30] [--curve-steps 150]

One process, stage 2, fp32, one intra-op thread (so the worker thread's optimizer step can run
on the second core while the main thread computes). Prints tables and writes
runs/bench_offload_e2e.json. On a GPU the same comparison is scripts/bench_offload_gpu.py.
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


def build(hidden, layers, vocab):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=int(hidden * 2.75),
                                        num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=8,
                                        max_position_embeddings=512))


def engine_for(model, mode, clip, lr=1e-3):
    import hf_zero

    zo = {"stage": 2}
    if mode != "none":
        zo["offload_optimizer"] = {"device": "cpu", "delayed_update": mode == "delayed"}
    cfg = {"train_micro_batch_size_per_gpu": 2, "gradient_clipping": clip, "zero_optimization": zo,
           "optimizer": {"type": "AdamW", "params": {"lr": lr, "weight_decay": 0.0}}}
    return hf_zero.initialize(model=model, config=cfg)[0]


def timing(args):
    rows = []
    for mode, clip in (("none", 1.0), ("exact", 1.0), ("eager", 0.0), ("delayed", 1.0)):
        engine = engine_for(build(args.hidden, args.layers, 8192), "none" if mode == "none" else
                            ("delayed" if mode == "delayed" else "cpu"), clip)
        g = torch.Generator().manual_seed(1)
        times, fb = [], []
        for i in range(args.steps + 2):
            ids = torch.randint(0, 8192, (2, 128), generator=g)
            t0 = time.perf_counter()
            loss = engine(input_ids=ids, labels=ids).loss
            engine.backward(loss)
            t1 = time.perf_counter()
            engine.step()
            t2 = time.perf_counter()
            if i >= 2:
                times.append(t2 - t0)
                fb.append(t1 - t0)
        engine.destroy()
        rows.append({"mode": mode, "clip": clip, "step_s": statistics.median(times), "fwd_bwd_s": statistics.median(fb)})
    base = rows[0]["step_s"]
    cpu_step = rows[1]["step_s"] - base  # what exact offload adds: the CPU step on the critical path
    for r in rows:
        r["ratio_to_no_offload"] = r["step_s"] / base
        r["cpu_step_hidden_share"] = None if r["mode"] in ("none", "exact") or cpu_step <= 0 else \
            max(0.0, min(1.0, (rows[1]["step_s"] - r["step_s"]) / cpu_step))
    return rows


def curve(args):
    from transformers import LlamaConfig, LlamaForCausalLM

    digits = "0123456789+= "
    rows = [json.loads(l) for l in open(ROOT / "data" / "addition" / "train.jsonl")]

    def encode(r):
        return [digits.index(c) for c in r["prompt"] + r["answer"]]

    out = {}
    for mode in ("exact", "delayed"):
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(vocab_size=14, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16))
        engine = engine_for(model, "cpu" if mode == "exact" else "delayed", 1.0, lr=3e-3)
        g = torch.Generator().manual_seed(2)
        losses = []
        for step in range(args.curve_steps):
            idx = torch.randint(0, len(rows), (64,), generator=g)
            ids = torch.tensor([encode(rows[int(i)]) for i in idx])
            labels = ids.clone()
            labels[:, :6] = -100
            loss = engine(input_ids=ids, labels=labels).loss
            engine.backward(loss)
            engine.step()
            losses.append(loss.item())
        engine.destroy()
        out[mode] = losses
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--curve-steps", type=int, default=150)
    ap.add_argument("--json", default=str(ROOT / "runs" / "bench_offload_e2e.json"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows = timing(args)
    print(f"{'mode':8} {'clip':>4} {'s/step':>7} {'fwd+bwd':>8} {'vs none':>8} {'CPU step hidden':>16}")
    for r in rows:
        hidden = "-" if r["cpu_step_hidden_share"] is None else f"{100 * r['cpu_step_hidden_share']:.0f}%"
        print(f"{r['mode']:8} {r['clip']:4.1f} {r['step_s']:7.3f} {r['fwd_bwd_s']:8.3f} {r['ratio_to_no_offload']:8.2f} {hidden:>16}")
    curves = curve(args)
    print("\nloss (mean of 10 steps) at step:  " + "  ".join(f"{s:>5}" for s in range(10, args.curve_steps + 1, 20)))
    for mode, losses in curves.items():
        pts = [statistics.mean(losses[max(0, s - 10):s]) for s in range(10, args.curve_steps + 1, 20)]
        print(f"{mode:8}                          " + "  ".join(f"{p:5.3f}" for p in pts))
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    Path(args.json).write_text(json.dumps({"machine": {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__},
                                           "timing": rows, "curves": curves, "args": vars(args)}, indent=1))


if __name__ == "__main__":
    main()
