"""Benchmark the offload storage layer against its ceilings, on this machine.

(a) The offloaded optimizer step: ``fused_adamw_step`` over per-unit flat tensors of a
    model-shaped set (a 134M-parameter Llama by default) vs torch's ``AdamW(fused=True)`` on ONE
    flat tensor of the same size, with the same thread count, rounds interleaved.
(b) Swap I/O: ``NvmeSwapStore`` write and read of ~1 GiB vs ``dd`` with ``oflag=direct`` /
    ``iflag=direct`` on the same directory, same request size, in the same run.

Prints a table and writes JSON (with the machine description) to runs/bench_offload.json.

    .venv/bin/python scripts/bench_offload.py [--path runs/nvme_bench] [--gib 1] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from hf_zero.offload import NvmeSwapStore, aligned_empty, cpu_threads_per_rank, fused_adamw_step  # noqa: E402
from hf_zero.offload.cpu_optim import torch_threads, usable_cores  # noqa: E402


# -- the machine ----------------------------------------------------------------------------

def machine(path: str) -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__, "kernel": platform.release(),
            "usable_cores": usable_cores(), "cpu_count": os.cpu_count()}
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        for key in ("Model name", "Core(s) per socket", "Socket(s)", "Thread(s) per core", "L3 cache"):
            m = re.search(rf"^{re.escape(key)}:\s*(.+)$", out, re.M)
            if m:
                info[key.lower().replace("(s)", "s").replace(" ", "_")] = m.group(1).strip()
    except OSError:
        pass
    try:
        mem = Path("/proc/meminfo").read_text()
        info["mem_total_gib"] = round(int(re.search(r"MemTotal:\s+(\d+)", mem).group(1)) / 2**20, 1)
    except (OSError, AttributeError):
        pass
    try:
        df = subprocess.run(["df", "-T", path], capture_output=True, text=True).stdout.splitlines()[-1].split()
        info["disk"] = {"device": df[0], "fstype": df[1], "mount": df[-1],
                        "free_gib": round(shutil.disk_usage(path).free / 2**30, 1)}
    except (OSError, IndexError):
        pass
    return info


def drop_caches() -> str:
    """Try to drop the page cache; say whether it worked (Cached in /proc/meminfo must fall)."""
    def cached():
        return int(re.search(r"^Cached:\s+(\d+)", Path("/proc/meminfo").read_text(), re.M).group(1))
    before = cached()
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError as e:
        return f"refused ({e.strerror})"
    after = cached()
    return f"worked (Cached {before // 1024} -> {after // 1024} MiB)" if after < before else \
        f"accepted but no effect (Cached {before // 1024} -> {after // 1024} MiB)"


# -- (a) the optimizer step -----------------------------------------------------------------

def llama_units(hidden: int, layers: int, inter: int, vocab: int) -> list:
    """Per-unit numels of a Llama-shaped model: one unit per decoder layer, plus the root
    (embeddings, untied head, final norm)."""
    layer = 4 * hidden * hidden + 3 * hidden * inter + 2 * hidden
    return [layer] * layers + [2 * vocab * hidden + hidden]


def bench_optimizer(sizes: list, threads: int, rounds: int) -> dict:
    total = sum(sizes)

    def state(n):
        return [torch.randn(n) * 0.02, torch.randn(n) * 1e-3, torch.zeros(n), torch.zeros(n)]

    torch.manual_seed(0)
    units = [state(n) for n in sizes]
    ps, gs, ms, vs = (list(x) for x in zip(*units))
    flat = torch.nn.Parameter(torch.randn(total) * 0.02)
    flat.grad = torch.randn(total) * 1e-3
    opt = torch.optim.AdamW([flat], lr=1e-4, weight_decay=0.01, fused=True)
    times = {"ours": [], "torch": []}
    with torch_threads(threads):
        step = 0
        for r in range(rounds + 1):            # round 0 warms up (first touch of the states)
            step += 1
            t0 = time.perf_counter()
            impl = fused_adamw_step(ps, gs, ms, vs, step, 1e-4, (0.9, 0.999), 1e-8, 0.01)
            t1 = time.perf_counter()
            opt.step()
            t2 = time.perf_counter()
            if r:
                times["ours"].append(t1 - t0)
                times["torch"].append(t2 - t1)
    ours, ref = statistics.median(times["ours"]), statistics.median(times["torch"])
    return {"params": total, "units": len(sizes), "threads": threads, "rounds": rounds, "impl": impl,
            "ours_s": ours, "torch_s": ref, "ours_gparam_s": total / ours / 1e9,
            "torch_gparam_s": total / ref / 1e9, "ratio": ref / ours,
            "ours_all_s": times["ours"], "torch_all_s": times["torch"]}


# -- (b) swap I/O ----------------------------------------------------------------------------

def run_dd(args: list) -> float:
    """Run dd; return its own reported seconds."""
    r = subprocess.run(["dd", *args], capture_output=True, text=True, check=True)
    m = re.search(r"copied, ([\d.]+) s", r.stderr)
    return float(m.group(1))


def bench_io(path: str, gib: float, block: int, io_threads: int, reps: int) -> dict:
    numel = int(gib * 2**30) // 4
    nbytes = numel * 4
    count = nbytes // block
    res = {"bytes": nbytes, "block_size": block, "io_threads": io_threads, "reps": reps}
    data = aligned_empty(numel)
    data.normal_()
    back = aligned_empty(numel)
    store = NvmeSwapStore(path, 0, {"bench": numel}, block_size=block, threads=io_threads)
    res["mode"] = "O_DIRECT" if store.direct else "buffered"
    res["mode_reason"] = store.mode_reason
    dd_file = os.path.join(path, "dd_bench.bin")
    try:
        fd = os.open(dd_file, os.O_RDWR | os.O_CREAT, 0o600)   # preallocated too, as ours is
        os.posix_fallocate(fd, 0, nbytes)
        os.close(fd)
        w, r, dw, dr, dz = [], [], [], [], []
        for _ in range(reps):                   # interleave ours and dd, writes then reads
            t0 = time.perf_counter()
            store.write("bench", data).result()
            if not store.direct:
                store.flush()
            w.append(time.perf_counter() - t0)
            dw.append(run_dd(["if=/dev/zero", f"of={dd_file}", f"bs={block}", f"count={count}",
                              "oflag=direct", "conv=notrunc"]))
        res["drop_caches"] = drop_caches()
        for _ in range(reps):
            back.zero_()
            t0 = time.perf_counter()
            store.read("bench", back).result()
            r.append(time.perf_counter() - t0)
            # dd reads OUR file: the same random bytes. This disk reads back blocks written as
            # zeros ~1.3x faster than random data, so dd's own zero file would flatter dd.
            dr.append(run_dd([f"if={store.files['bench']}", "of=/dev/null", f"bs={block}", f"count={count}",
                              "iflag=direct"]))
            dz.append(run_dd([f"if={dd_file}", "of=/dev/null", f"bs={block}", f"count={count}", "iflag=direct"]))
        res["round_trip_equal"] = bool(torch.equal(back.view(torch.int32), data.view(torch.int32)))
        # The staged path: a tensor that is not 4 KiB-aligned is copied through aligned buffers.
        unaligned = torch.empty(numel + 1)[1:]
        unaligned.copy_(data)
        t0 = time.perf_counter()
        store.write("bench", unaligned).result()
        sw = time.perf_counter() - t0
        t0 = time.perf_counter()
        store.read("bench", unaligned).result()
        sr = time.perf_counter() - t0
        del unaligned
    finally:
        store.close()
        if os.path.exists(dd_file):
            os.unlink(dd_file)
    gb = nbytes / 1e9
    res.update({
        "write_s": w, "read_s": r, "dd_write_s": dw, "dd_read_s": dr, "dd_read_zero_file_s": dz,
        "dd_read_zero_file_gb_s": gb / min(dz),
        "write_gb_s": gb / min(w), "read_gb_s": gb / min(r),
        "dd_write_gb_s": gb / min(dw), "dd_read_gb_s": gb / min(dr),
        "staged_write_gb_s": gb / sw, "staged_read_gb_s": gb / sr,
    })
    res["write_ratio"] = res["write_gb_s"] / res["dd_write_gb_s"]
    res["read_ratio"] = res["read_gb_s"] / res["dd_read_gb_s"]
    # The disk is shared and noisy: also the median over reps of each (ours, dd) back-to-back pair.
    res["paired_write_ratio_median"] = statistics.median(d / o for o, d in zip(w, dw))
    res["paired_read_ratio_median"] = statistics.median(d / o for o, d in zip(r, dr))
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--path", default="runs/nvme_bench", help="swap directory (on the disk to measure)")
    ap.add_argument("--gib", type=float, default=1.0, help="GiB moved per transfer")
    ap.add_argument("--block-size", type=int, default=1 << 20, help="bytes per I/O request (ours and dd's bs)")
    ap.add_argument("--io-threads", type=int, default=4)
    ap.add_argument("--io-reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="CPU threads for the optimizer step "
                    "(default: cpu_threads_per_rank(local ranks))")
    ap.add_argument("--local-ranks", type=int, default=1)
    ap.add_argument("--model", default="768,12,2048,32000", help="hidden,layers,intermediate,vocab")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--skip-io", action="store_true")
    ap.add_argument("--skip-optim", action="store_true")
    ap.add_argument("--out", default="runs/bench_offload.json")
    args = ap.parse_args()

    created = not os.path.exists(args.path)
    os.makedirs(args.path, exist_ok=True)
    threads = cpu_threads_per_rank(args.local_ranks, args.threads)
    result = {"command": " ".join(["python"] + sys.argv),
              "machine": machine(args.path)}
    try:
        if not args.skip_optim:
            hidden, layers, inter, vocab = (int(x) for x in args.model.split(","))
            result["optimizer"] = bench_optimizer(llama_units(hidden, layers, inter, vocab), threads, args.rounds)
        if not args.skip_io:
            result["io"] = bench_io(args.path, args.gib, args.block_size, args.io_threads, args.io_reps)
    finally:
        if created:
            shutil.rmtree(args.path, ignore_errors=True)

    m = result["machine"]
    print(f"machine: {m.get('model_name')} | {m['usable_cores']} usable cores | {m.get('mem_total_gib')} GiB | "
          f"torch {m['torch']} | disk {m.get('disk')}")
    print(f"{'measure':<44} {'ours':>10} {'reference':>10} {'ratio':>7}")
    if "optimizer" in result:
        o = result["optimizer"]
        label = "AdamW step Gparam/s (%dM params, %d thr)" % (o["params"] / 1e6, o["threads"])
        print(f"{label:<44} {o['ours_gparam_s']:>10.3f} {o['torch_gparam_s']:>10.3f} {o['ratio']:>7.2f}")
    if "io" in result:
        io = result["io"]
        tag = f"{io['mode']}, {io['bytes'] / 2**30:.1f} GiB, {io['block_size'] >> 10} KiB x {io['io_threads']}"
        print(f"{'swap write GB/s (' + tag + ')':<44} {io['write_gb_s']:>10.2f} {io['dd_write_gb_s']:>10.2f} "
              f"{io['write_ratio']:>7.2f}")
        print(f"{'swap read GB/s':<44} {io['read_gb_s']:>10.2f} {io['dd_read_gb_s']:>10.2f} {io['read_ratio']:>7.2f}")
        print(f"{'staged (unaligned tensor) write / read GB/s':<44} {io['staged_write_gb_s']:>10.2f} "
              f"{io['staged_read_gb_s']:>10.2f}")
        print(f"(dd reading the zero-filled file it wrote: {io['dd_read_zero_file_gb_s']:.2f} GB/s)")
        print(f"median of paired ratios: write {io['paired_write_ratio_median']:.2f}, "
              f"read {io['paired_read_ratio_median']:.2f} (best-of-{io['reps']} above)")
        print(f"drop_caches: {io['drop_caches']}; round trip equal: {io['round_trip_equal']}")
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
