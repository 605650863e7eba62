"""GPU benchmark of ZeRO stage 2 with CPU optimizer offload on one GPU (bf16, recomputation).

For each model shape: forward + backward alone, a full step without offload (where it fits),
with exact CPU offload, with the one-step delayed update, and with partial offload
(``offload_optimizer.ratio`` 0.3 and 0.5: that fraction of the optimizer state on the CPU, the
rest stepped on the GPU at the same time); tokens/s, the share of the step the GPU idles
(1 - fwd+bwd / step), pinned host<->device copy GB/s, and peak GPU memory against the formula
(hf_zero.estimate, the same setup). Prints a table and writes JSON. Run through
scripts/gpu_check.sh. ``--device cpu --shapes tiny`` runs the same code on the CPU (no copy
rate, no CUDA peak memory) to check the script itself on a machine without a GPU.
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
    "small": dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=6, num_attention_heads=8, vocab_size=8192),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, vocab_size=512),
}
VOCAB = 32000

#: mode -> offload_optimizer section (None: no offload)
MODES = {
    "none": None,
    "offload": {"device": "cpu", "pin_memory": True},
    "delayed": {"device": "cpu", "pin_memory": True, "delayed_update": True},
    "ratio0.3": {"device": "cpu", "pin_memory": True, "ratio": 0.3},
    "ratio0.5": {"device": "cpu", "pin_memory": True, "ratio": 0.5},
}


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


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


def llama_config(shape: str):
    from transformers import LlamaConfig

    dims = {"vocab_size": VOCAB, **SHAPES[shape]}
    return LlamaConfig(max_position_embeddings=4096, num_key_value_heads=dims["num_attention_heads"], **dims)


def build(shape: str, device: str):
    from transformers import LlamaForCausalLM

    with torch.device(device):
        model = LlamaForCausalLM(llama_config(shape)).to(torch.bfloat16)
    model.gradient_checkpointing_enable()
    model.config.use_cache = False
    return model


def formula_gpu_bytes(shape: str, offload, micro: int, seq: int) -> float:
    """hf_zero.estimate's per-GPU total (model states + live units + activations) for the run."""
    from hf_zero.estimate import ActivationSpec, Setup, estimate, shape_from_config

    setup = Setup(2, "cpu" if offload else "none", "none", float((offload or {}).get("ratio", 1.0)))
    return estimate(shape_from_config(llama_config(shape)), setup, 1,
                    activations=ActivationSpec(seq_len=seq, micro_batch=micro, recompute=True)).gpu_total


def run(shape, mode, micro, seq, steps, device="cuda"):
    import hf_zero

    torch.manual_seed(0)
    model = build(shape, device)
    n_params = sum(p.numel() for p in model.parameters())
    zo = {"stage": 2}
    if MODES[mode] is not None:
        zo["offload_optimizer"] = dict(MODES[mode])
    cfg = {"train_micro_batch_size_per_gpu": micro, "gradient_accumulation_steps": 1, "bf16": {"enabled": True},
           "gradient_clipping": 1.0, "zero_optimization": zo,
           "optimizer": {"type": "AdamW", "params": {"lr": 1e-5, "weight_decay": 0.0}}}
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    engine, *_ = hf_zero.initialize(model=model, config=cfg)
    assert engine.device.type == device, (engine.device, device)
    ids = torch.randint(0, model.config.vocab_size, (micro, seq), device=device)
    times, fb = [], []
    for i in range(steps + 2):
        sync(device)
        t0 = time.perf_counter()
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        sync(device)
        t1 = time.perf_counter()
        engine.step()
        sync(device)
        t2 = time.perf_counter()
        if i >= 2:
            times.append(t2 - t0)
            fb.append(t1 - t0)
    step = statistics.median(times)
    fwd_bwd = statistics.median(fb)
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else None
    rep = engine.memory_report()
    copies = None if engine.host is None else {"issued": engine.host.copies.issued,
                                                "on_copy_stream": engine.host.copies.async_issued}
    engine.destroy()
    del engine, model
    if device == "cuda":
        torch.cuda.empty_cache()
    return {"shape": shape, "mode": mode, "params": n_params, "step_s": step, "fwd_bwd_s": fwd_bwd,
            "tokens_per_s": micro * seq / step, "gpu_idle_share": max(0.0, 1 - fwd_bwd / step),
            "peak_gpu_gb": None if peak is None else peak / 1e9,
            "formula_gpu_gb": formula_gpu_bytes(shape, MODES[mode], micro, seq) / 1e9,
            "device_model_state_gb": rep["device_model_state_bytes"] / 1e9,
            "optimizer_host_fraction": rep["optimizer_host_fraction"], "copies": copies, "loss": float(loss)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="1.3B,3.4B")
    ap.add_argument("--micro", type=int, default=4)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, of {', '.join(MODES)}")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                    help="cpu: check the script without a GPU (use --shapes tiny --seq 32 --micro 2)")
    ap.add_argument("--json", default="runs/bench_offload_gpu.json")
    args = ap.parse_args()
    modes = args.modes.split(",")
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        ap.error(f"unknown mode(s) {unknown}; choose from {', '.join(MODES)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("no CUDA device: run on a GPU machine (scripts/gpu_check.sh), or pass --device cpu to check the script")
    if args.device == "cuda":
        torch.set_num_threads(os.cpu_count() or 1)
    cuda = args.device == "cuda"
    result = {"gpu": torch.cuda.get_device_name() if cuda else "none (cpu)", "torch": torch.__version__,
              "cpu_threads": torch.get_num_threads(), "copy_gbps": pinned_copy_gbps() if cuda else None,
              "micro": args.micro, "seq": args.seq, "runs": []}
    print(f"GPU {result['gpu']}; pinned copy GB/s {result['copy_gbps']}")
    for shape in args.shapes.split(","):
        for mode in modes:
            try:
                r = run(shape, mode, args.micro, args.seq, args.steps, args.device)
            except torch.cuda.OutOfMemoryError:
                r = {"shape": shape, "mode": mode, "error": "out of GPU memory"}
                torch.cuda.empty_cache()
            result["runs"].append(r)
            print(json.dumps(r))
    print(f"\n{'shape':6} {'mode':8} {'s/step':>7} {'fwd+bwd':>8} {'tok/s':>8} {'GPU idle':>8} {'peak GB':>8} "
          f"{'formula':>8} {'states GB':>9} {'host %':>6}")
    for r in result["runs"]:
        if "error" in r:
            print(f"{r['shape']:6} {r['mode']:8} {r['error']}")
            continue
        peak = "-" if r["peak_gpu_gb"] is None else f"{r['peak_gpu_gb']:.1f}"
        print(f"{r['shape']:6} {r['mode']:8} {r['step_s']:7.3f} {r['fwd_bwd_s']:8.3f} {r['tokens_per_s']:8.0f} "
              f"{r['gpu_idle_share']:8.2f} {peak:>8} {r['formula_gpu_gb']:8.1f} {r['device_model_state_gb']:9.1f} "
              f"{100 * r['optimizer_host_fraction']:6.0f}")
    os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
