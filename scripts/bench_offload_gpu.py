"""GPU benchmark of ZeRO stage 2 with CPU optimizer offload on one GPU (bf16, recomputation).

For each model shape: forward + backward alone, a full step without offload (where it fits),
with exact CPU offload, and with the one-step delayed update; tokens/s, the share of the step
the GPU idles (1 - fwd+bwd / step), pinned host<->device copy GB/s, and peak GPU memory against
the formula. Prints a table and writes JSON. Needs CUDA; run through scripts/gpu_check.sh.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

SHAPES = {
    "1.3B": dict(hidden_size=2048, intermediate_size=5504, num_hidden_layers=24, num_attention_heads=16),
    "3.4B": dict(hidden_size=3200, intermediate_size=8640, num_hidden_layers=26, num_attention_heads=32),
    "7B": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32),
}


def pinned_copy_gbps(nbytes: int = 1 << 30) -> dict:
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    out = {}
    for name, fn in (("h2d", lambda: dev.copy_(host, non_blocking=True)), ("d2h", lambda: host.copy_(dev, non_blocking=True))):
        fn()
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(5):
            fn()
        torch.cuda.synchronize()
        out[name] = 5 * nbytes / (time.perf_counter() - t) / 1e9
    return out


def build(shape: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=32000, max_position_embeddings=4096, num_key_value_heads=SHAPES[shape]["num_attention_heads"],
                      **SHAPES[shape])
    with torch.device("cuda"):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.gradient_checkpointing_enable()
    model.config.use_cache = False
    return model


def run(shape, mode, micro, seq, steps):
    import hf_zero

    torch.manual_seed(0)
    model = build(shape)
    n_params = sum(p.numel() for p in model.parameters())
    zo = {"stage": 2}
    if mode in ("offload", "delayed"):
        zo["offload_optimizer"] = {"device": "cpu", "pin_memory": True, "delayed_update": mode == "delayed"}
    cfg = {"train_micro_batch_size_per_gpu": micro, "gradient_accumulation_steps": 1, "bf16": {"enabled": True},
           "gradient_clipping": 1.0, "zero_optimization": zo,
           "optimizer": {"type": "AdamW", "params": {"lr": 1e-5, "weight_decay": 0.0}}}
    torch.cuda.reset_peak_memory_stats()
    engine, *_ = hf_zero.initialize(model=model, config=cfg)
    ids = torch.randint(0, 32000, (micro, seq), device="cuda")
    times, fb = [], []
    for i in range(steps + 2):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        torch.cuda.synchronize()
        t1 = time.perf_counter()
        engine.step()
        torch.cuda.synchronize()
        t2 = time.perf_counter()
        if i >= 2:
            times.append(t2 - t0)
            fb.append(t1 - t0)
    step = statistics.median(times)
    fwd_bwd = statistics.median(fb)
    peak = torch.cuda.max_memory_allocated()
    rep = engine.memory_report()
    engine.destroy()
    del engine, model
    torch.cuda.empty_cache()
    return {"shape": shape, "mode": mode, "params": n_params, "step_s": step, "fwd_bwd_s": fwd_bwd,
            "tokens_per_s": micro * seq / step, "gpu_idle_share": max(0.0, 1 - fwd_bwd / step),
            "peak_gpu_gb": peak / 1e9, "device_model_state_gb": rep["device_model_state_bytes"] / 1e9,
            "loss": float(loss)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="1.3B,3.4B")
    ap.add_argument("--micro", type=int, default=4)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--json", default="runs/bench_offload_gpu.json")
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    result = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "cpu_threads": torch.get_num_threads(),
              "copy_gbps": pinned_copy_gbps(), "runs": []}
    print(f"GPU {result['gpu']}; pinned copy GB/s {result['copy_gbps']}")
    for shape in args.shapes.split(","):
        for mode in ("none", "offload", "delayed"):
            try:
                r = run(shape, mode, args.micro, args.seq, args.steps)
            except torch.cuda.OutOfMemoryError:
                r = {"shape": shape, "mode": mode, "error": "out of GPU memory"}
                torch.cuda.empty_cache()
            result["runs"].append(r)
            print(json.dumps(r))
    print(f"\n{'shape':6} {'mode':8} {'s/step':>7} {'fwd+bwd':>8} {'tok/s':>8} {'GPU idle':>8} {'peak GB':>8} {'states GB':>9}")
    for r in result["runs"]:
        if "error" in r:
            print(f"{r['shape']:6} {r['mode']:8} {r['error']}")
            continue
        print(f"{r['shape']:6} {r['mode']:8} {r['step_s']:7.3f} {r['fwd_bwd_s']:8.3f} {r['tokens_per_s']:8.0f} "
              f"{r['gpu_idle_share']:8.2f} {r['peak_gpu_gb']:8.1f} {r['device_model_state_gb']:9.1f}")
    os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
