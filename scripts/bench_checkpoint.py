"""Benchmark of sharded checkpoints: save, load and consolidation time and peak memory for a
random Llama of ~0.5-1B parameters on 2 gloo processes, against `dd` on the same disk.

    .venv/bin/python scripts/bench_checkpoint.py [--layers 16] [--dir runs/ckpt_bench]

The script launches its own two workers (torchrun-style environment). Rank 0 builds the model;
rank 1 builds it on the meta device (hf_zero's one-copy loading), stage 3, fp32, AdamW with its
states created by one step. Phases: save_checkpoint, load_checkpoint (page cache dropped first
when the container allows it), `hf-zero consolidate` in a child process, and `dd` writing and
reading the same number of bytes with direct I/O. Peak RSS growth per phase is measured with
/proc/self/clear_refs + VmHWM. Prints a table and writes JSON (default runs/bench_checkpoint.json).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def hwm_mb() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def reset_hwm() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def drop_caches() -> bool:
    try:
        subprocess.run(["sync"], check=True)
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3")
        return True
    except OSError:
        return False


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def worker(args) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    sys.path.insert(0, str(ROOT))
    import hf_zero
    from hf_zero.initialize import init_distributed

    rank, world = init_distributed()
    cfg = LlamaConfig(vocab_size=32000, hidden_size=args.hidden, intermediate_size=args.intermediate,
                      num_hidden_layers=args.layers, num_attention_heads=16, num_key_value_heads=16,
                      max_position_embeddings=256)
    torch.manual_seed(0)
    if rank == 0:
        model = LlamaForCausalLM(cfg)
    else:
        with torch.device("meta"):
            model = LlamaForCausalLM(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    # the asynchronous save keeps its snapshot memory for the next one (on the CPU only when
    # asked): the repeated asynchronous save below measures a snapshot into reused memory
    engine, *_ = hf_zero.initialize(model=model, optimizer=opt, config={
        "train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3},
        "hf_zero": {"async_save_keep_staging": True}})
    ids = torch.randint(0, 32000, (1, 8))
    loss = engine(input_ids=ids, labels=ids).loss
    engine.backward(loss)
    engine.step()
    out = {"params": sum(f.numel for u in engine.units for f in u.flats)}
    ck = Path(args.dir) / "ckpt"
    for phase in ("save", "load"):
        if phase == "load" and rank == 0:
            out["cache_dropped"] = drop_caches()
        engine.comm.barrier()
        reset_hwm()
        base = hwm_mb()
        t = time.perf_counter()
        if phase == "save":
            engine.save_checkpoint(ck)
        else:
            engine.load_checkpoint(ck)
        out[f"{phase}_s"] = time.perf_counter() - t
        out[f"{phase}_rss_growth_mb"] = hwm_mb() - base
    # asynchronous save of the same state: the time training is blocked (snapshot to host
    # memory), then the time until the background write is published
    engine.comm.barrier()
    t = time.perf_counter()
    engine.save_checkpoint(Path(args.dir) / "ckpt_async", async_save=True)
    out["async_blocked_s"] = time.perf_counter() - t
    engine.wait_for_checkpoint()
    out["async_total_s"] = time.perf_counter() - t
    # the synchronous save again, last: tells the code's speed from the order it ran in (page
    # cache and writeback state, the box's load at the start)
    engine.comm.barrier()
    t = time.perf_counter()
    engine.save_checkpoint(Path(args.dir) / "ckpt_again")
    out["save_again_s"] = time.perf_counter() - t
    # the asynchronous save and the load again: the first of each takes memory this process
    # never touched (the snapshot, the whole rank file); on a VM whose host backs guest memory
    # lazily that first touch, not the code, can set the pace (see fresh_touch_gbps). The
    # second asynchronous save copies into the first one's memory; the load then gives it back
    engine.comm.barrier()
    t = time.perf_counter()
    engine.save_checkpoint(Path(args.dir) / "ckpt_async_again", async_save=True)
    out["async_again_blocked_s"] = time.perf_counter() - t
    engine.wait_for_checkpoint()
    if rank == 0:
        drop_caches()
    engine.comm.barrier()
    t = time.perf_counter()
    engine.load_checkpoint(ck)
    out["load_again_s"] = time.perf_counter() - t
    # first touch of fresh memory (1 GiB, allocated and filled once): the speed of page faults
    engine.comm.barrier()
    fresh = torch.empty(1 << 30, dtype=torch.uint8)
    t = time.perf_counter()
    fresh.fill_(1)
    out["fresh_touch_gbps"] = (1 << 30) / (time.perf_counter() - t) / 1e9
    del fresh
    Path(args.dir, f"rank{rank}.json").write_text(json.dumps(out))
    engine.destroy()


def dd(path: Path, nbytes: int) -> dict:
    block = 16 << 20
    count = max(1, nbytes // block)
    res = {}
    for name, cmd in (("write", ["dd", "if=/dev/zero", f"of={path}", f"bs={block}", f"count={count}", "oflag=direct", "conv=fsync"]),
                      ("read", ["dd", f"if={path}", "of=/dev/null", f"bs={block}", "iflag=direct"])):
        if name == "read":
            drop_caches()
        p = subprocess.run(cmd, capture_output=True, text=True)
        m = re.search(r"(\d+) bytes .* copied, ([\d.]+) s", p.stderr)
        res[name] = int(m.group(1)) / float(m.group(2)) / 1e9 if m else None
    path.unlink(missing_ok=True)
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--hidden", type=int, default=1536)
    ap.add_argument("--intermediate", type=int, default=4096)
    ap.add_argument("--dir", default=str(ROOT / "runs" / "ckpt_bench"))
    ap.add_argument("--json", default=str(ROOT / "runs" / "bench_checkpoint.json"))
    ap.add_argument("--_worker", action="store_true")
    args = ap.parse_args()
    if args._worker:
        return worker(args)
    d = Path(args.dir)
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen([sys.executable, __file__, "--_worker", "--layers", str(args.layers),
                                       "--hidden", str(args.hidden), "--intermediate", str(args.intermediate),
                                       "--dir", args.dir], env=env))
    if any(p.wait() != 0 for p in procs):
        sys.exit("a worker failed")
    ranks = [json.loads((d / f"rank{r}.json").read_text()) for r in range(2)]
    ck_bytes = dir_bytes(d / "ckpt")
    # the consolidation's own peak RSS, and that of a process that only imports the same code
    # (peak anonymous memory is sampled every 20 ms: VmHWM also counts the pages of the
    # memory-mapped input files, which the kernel can drop at will)
    probe = ("import resource, sys, time, threading; from hf_zero.cli import main\n"
             "peak = [0]\n"
             "def anon():\n"
             "    for l in open('/proc/self/status'):\n"
             "        if l.startswith('RssAnon:'): return int(l.split()[1]) / 1024\n"
             "done = threading.Event()\n"
             "def sample():\n"
             "    while not done.is_set(): peak[0] = max(peak[0], anon()); time.sleep(0.02)\n"
             "threading.Thread(target=sample, daemon=True).start(); t = time.perf_counter()\n"
             "rc = main(sys.argv[1:]) if len(sys.argv) > 1 else 0\n"
             "done.set(); time.sleep(0.05)\n"
             "print('RESULT', time.perf_counter() - t, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, peak[0])")
    run = subprocess.run([sys.executable, "-c", probe, "consolidate", str(d / "ckpt"), str(d / "hf"),
                          "--max-shard-size", "1GB", "--quiet"], check=True, cwd=ROOT, capture_output=True, text=True)
    consolidate_s, consolidate_rss, consolidate_anon = map(float, run.stdout.split("RESULT")[1].split())
    idle = subprocess.run([sys.executable, "-c", probe], check=True, cwd=ROOT, capture_output=True, text=True)
    _, import_rss, import_anon = map(float, idle.stdout.split("RESULT")[1].split())
    hf_bytes = dir_bytes(d / "hf")
    disk = dd(d / "dd.bin", ck_bytes)
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    result = {"machine": {"cpu": cpu, "cores": os.cpu_count()}, "params": ranks[0]["params"],
              "checkpoint_bytes": ck_bytes, "export_bytes": hf_bytes, "ranks": ranks,
              "consolidate_s": consolidate_s, "consolidate_peak_rss_mb": consolidate_rss,
              "import_only_rss_mb": import_rss, "consolidate_peak_anon_mb": consolidate_anon,
              "import_only_anon_mb": import_anon,
              "dd_gbps": disk, "cache_dropped_before_load": ranks[0].get("cache_dropped")}
    gb = ck_bytes / 1e9
    save = max(r["save_s"] for r in ranks)
    load = max(r["load_s"] for r in ranks)
    print(f"\nmodel {result['params'] / 1e6:.0f}M params, checkpoint {gb:.2f} GB (fp32 master + 2 AdamW states), "
          f"export {hf_bytes / 1e9:.2f} GB; page cache dropped before load: {result['cache_dropped_before_load']}")
    print(f"{'phase':14} {'time s':>7} {'GB/s':>6} {'peak RSS growth MB (rank 0 / 1)':>34}")
    print(f"{'save':14} {save:7.2f} {gb / save:6.2f} {ranks[0]['save_rss_growth_mb']:>16.0f} / {ranks[1]['save_rss_growth_mb']:.0f}")
    print(f"{'load':14} {load:7.2f} {gb / load:6.2f} {ranks[0]['load_rss_growth_mb']:>16.0f} / {ranks[1]['load_rss_growth_mb']:.0f}")
    print(f"{'consolidate':14} {consolidate_s:7.2f} {hf_bytes / 1e9 / consolidate_s:6.2f} "
          f"{consolidate_rss - import_rss:>16.0f} (one process; anonymous memory only: "
          f"{consolidate_anon - import_anon:.0f})")
    blocked = max(r["async_blocked_s"] for r in ranks)
    total = max(r["async_total_s"] for r in ranks)
    print(f"{'async blocked':14} {blocked:7.2f} {'':6} ({blocked / save:.1%} of the synchronous save)")
    print(f"{'async total':14} {total:7.2f} {gb / total:6.2f}")
    again = max(r["save_again_s"] for r in ranks)
    print(f"{'save, again':14} {again:7.2f} {gb / again:6.2f} (the synchronous save repeated after the others)")
    load_again = max(r["load_again_s"] for r in ranks)
    blocked_again = max(r["async_again_blocked_s"] for r in ranks)
    touch = min(r["fresh_touch_gbps"] for r in ranks)
    print(f"{'load, again':14} {load_again:7.2f} {gb / load_again:6.2f} (page cache dropped again)")
    print(f"{'async blocked, again':20} {blocked_again:5.2f} {'':6} ({blocked_again / again:.1%} of the repeated synchronous save)")
    print(f"first touch of fresh memory: {touch:.2f} GB/s (1 GiB, slower rank)")
    wr, rd = disk["write"] or float("nan"), disk["read"] or float("nan")
    print(f"ratios: save {gb / save / wr:.2f}x dd write, load {gb / load / rd:.2f}x dd read, "
          f"consolidate {hf_bytes / 1e9 / consolidate_s / wr:.2f}x dd write, async blocked {blocked / save:.1%}")
    print(f"ratios, repeated: save {gb / again / wr:.2f}x dd write, load {gb / load_again / rd:.2f}x dd read, "
          f"async blocked {blocked_again / again:.1%}")
    result.update(async_blocked_s=blocked, async_total_s=total, save_again_s=again, load_again_s=load_again,
                  async_again_blocked_s=blocked_again, fresh_touch_gbps=touch,
                  load_average=os.getloadavg(), commit=subprocess.run(["git", "rev-parse", "--short", "HEAD"],
                                                                    cwd=ROOT, capture_output=True, text=True).stdout.strip())
    print(f"{'dd write':14} {'':7} {disk['write'] or float('nan'):6.2f}")
    print(f"{'dd read':14} {'':7} {disk['read'] or float('nan'):6.2f}")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=1))
    shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    main()
