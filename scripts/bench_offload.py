"""Benchmark the offload storage layer against its ceilings, on this machine.

(a) The offloaded optimizer step: ``fused_adamw_step`` over per-unit flat tensors of a
    model-shaped set (a 134M-parameter Llama by default) vs torch's ``AdamW(fused=True)`` on ONE
    flat tensor of the same size, with the same thread count, rounds interleaved.
(b) Swap I/O: ``NvmeSwapStore`` write and read of ~1 GiB vs ``dd`` with ``oflag=direct`` /
    ``iflag=direct`` on the same directory (reads: the same file), same ``bs`` as ``block_size``,
    in the same run: rounds in which every contestant runs once, the order rotated each round;
    the headline is the median over rounds of the paired (store, dd) ratio. ``--compare-with
    REV`` adds the store as committed at a git revision to the same rounds (before/after).

Prints a table and writes JSON (with the machine description) to runs/bench_offload.json.

    .venv/bin/python scripts/bench_offload.py [--path runs/nvme_bench] [--gib 1] [--threads N]
    .venv/bin/python scripts/bench_offload.py --skip-optim --compare-with HEAD --out runs/bench_offload_io.json
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
import types
from pathlib import Path
from typing import Optional

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


def reference_store(rev: str):
    """``NvmeSwapStore`` as committed at git revision ``rev`` (for a before/after in one run)."""
    src = subprocess.run(["git", "-C", str(REPO), "show", f"{rev}:hf_zero/offload/nvme.py"],
                         capture_output=True, text=True, check=True).stdout
    name = "_bench_nvme_" + re.sub(r"\W", "_", rev)
    mod = types.ModuleType(name)
    sys.modules[name] = mod                 # dataclasses look the module up by name
    exec(compile(src, f"{rev}:hf_zero/offload/nvme.py", "exec"), mod.__dict__)
    return mod.NvmeSwapStore


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _rounds(contestants: dict, reps: int) -> dict:
    """Time each contestant once per round, ``reps`` rounds, the order rotated every round (so
    each goes first equally often: this shared disk has bursts that favour whoever goes first)."""
    names = list(contestants)
    times = {k: [] for k in names}
    for r in range(reps):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            times[name].append(contestants[name]())
    return times


def _summary(times: list, gb: float) -> dict:
    return {"median_gb_s": gb / statistics.median(times), "best_gb_s": gb / min(times), "s": times}


def _paired(num: list, den: list) -> float:
    """Median over rounds of num[i] / den[i]: with times, the speed of den relative to num."""
    return statistics.median(n / d for n, d in zip(num, den))


def bench_io(path: str, gib: float, block: int, io_threads: int, reps: int, ref_rev: Optional[str],
             dd_big_block: int) -> dict:
    numel = int(gib * 2**30) // 4
    nbytes = numel * 4
    count = nbytes // block
    res = {"bytes": nbytes, "block_size": block, "io_threads": io_threads, "reps": reps, "reference_rev": ref_rev}
    data = aligned_empty(numel)
    data.normal_()
    back = aligned_empty(numel)
    back.zero_()                                # touched once, so no read pays the page faults
    stores = {"ours": NvmeSwapStore(path, 0, {"bench": numel}, block_size=block, threads=io_threads)}
    if ref_rev:
        stores["ref"] = reference_store(ref_rev)(path, 1, {"bench": numel}, block_size=block, threads=io_threads)
    store = stores["ours"]
    res["mode"] = "O_DIRECT" if store.direct else "buffered"
    res["mode_reason"] = store.mode_reason
    dd_file = os.path.join(path, "dd_bench.bin")
    gb = nbytes / 1e9

    def writer(s):
        def go():
            t = _timed(lambda: s.write("bench", data).result())
            if not s.direct:
                t += _timed(s.flush)
            return t
        return go

    def reader(s):
        return lambda: _timed(lambda: s.read("bench", back).result())

    try:
        fd = os.open(dd_file, os.O_RDWR | os.O_CREAT, 0o600)   # preallocated too, as ours is
        os.posix_fallocate(fd, 0, nbytes)
        os.close(fd)
        contestants = {k: writer(s) for k, s in stores.items()}
        contestants["dd"] = lambda: run_dd(["if=/dev/zero", f"of={dd_file}", f"bs={block}", f"count={count}",
                                            "oflag=direct", "conv=notrunc"])
        w = _rounds(contestants, reps)
        res["drop_caches"] = drop_caches()
        # dd reads OUR file: the same random bytes. This disk reads back blocks written as zeros
        # faster than random data, so dd's own zero file would flatter dd (measured separately).
        # dd has one request of bs bytes in flight, into one small buffer that stays in cache;
        # the store reads into a GiB tensor. dd at a big bs shows what bigger requests give dd.
        f = store.files["bench"]
        contestants = {k: reader(s) for k, s in stores.items()}
        contestants.update({
            "dd": lambda: run_dd([f"if={f}", "of=/dev/null", f"bs={block}", f"count={count}", "iflag=direct"]),
            "dd_big_bs": lambda: run_dd([f"if={f}", "of=/dev/null", f"bs={dd_big_block}",
                                         f"count={nbytes // dd_big_block}", "iflag=direct"]),
            "dd_zero_file": lambda: run_dd([f"if={dd_file}", "of=/dev/null", f"bs={block}", f"count={count}",
                                            "iflag=direct"]),
        })
        r = _rounds(contestants, reps)
        res["round_trip_equal"] = bool(torch.equal(back.view(torch.int32), data.view(torch.int32)))
        # The staged path: a tensor that is not 4 KiB-aligned is copied through aligned buffers.
        unaligned = torch.empty(numel + 1)[1:]
        unaligned.copy_(data)
        staged = {}
        for k, s in stores.items():
            staged[k] = {"write_gb_s": gb / _timed(lambda: s.write("bench", unaligned).result()),
                         "read_gb_s": gb / _timed(lambda: s.read("bench", unaligned).result())}
        del unaligned
    finally:
        for s in stores.values():
            s.close()
        if os.path.exists(dd_file):
            os.unlink(dd_file)
    res["write"] = {k: _summary(v, gb) for k, v in w.items()}
    res["read"] = {k: _summary(v, gb) for k, v in r.items()}
    res["dd_big_bs"] = dd_big_block
    res["staged"] = staged
    # The disk is shared and noisy: the headline ratio is the median over rounds of each
    # back-to-back (store, dd) pair; ratios of the best reps are kept for comparison.
    for op, t in (("write", w), ("read", r)):
        for k in stores:
            res[op][k]["paired_ratio_to_dd"] = _paired(t["dd"], t[k])
            res[op][k]["best_ratio_to_dd"] = min(t["dd"]) / min(t[k])
        if "ref" in stores:
            res[op]["ours"]["paired_ratio_to_ref"] = _paired(t["ref"], t["ours"])
    res["read"]["ours"]["paired_ratio_to_dd_big_bs"] = _paired(r["dd_big_bs"], r["ours"])
    # Flat keys of earlier versions of this script (best of reps).
    res.update({
        "write_s": w["ours"], "read_s": r["ours"], "dd_write_s": w["dd"], "dd_read_s": r["dd"],
        "dd_read_zero_file_s": r["dd_zero_file"], "dd_read_zero_file_gb_s": gb / min(r["dd_zero_file"]),
        "write_gb_s": gb / min(w["ours"]), "read_gb_s": gb / min(r["ours"]),
        "dd_write_gb_s": gb / min(w["dd"]), "dd_read_gb_s": gb / min(r["dd"]),
        "staged_write_gb_s": staged["ours"]["write_gb_s"], "staged_read_gb_s": staged["ours"]["read_gb_s"],
        "write_ratio": res["write"]["ours"]["best_ratio_to_dd"], "read_ratio": res["read"]["ours"]["best_ratio_to_dd"],
        "paired_write_ratio_median": res["write"]["ours"]["paired_ratio_to_dd"],
        "paired_read_ratio_median": res["read"]["ours"]["paired_ratio_to_dd"],
    })
    return res


def print_io(io: dict) -> None:
    print(f"swap I/O: {io['mode']}, {io['bytes'] / 2**30:.2f} GiB per transfer, block_size "
          f"{io['block_size'] >> 10} KiB, {io['io_threads']} threads, {io['reps']} rounds "
          f"(order rotated); dd bs={io['block_size'] >> 10} KiB on the same file")
    print(f"  {'':<34} {'median GB/s':>11} {'best GB/s':>10} {'paired ratio to dd':>19} {'best/best':>10}")
    labels = {"ours": "store (this tree)", "ref": f"store at {io['reference_rev']}", "dd": "dd",
              "dd_big_bs": f"dd bs={io['dd_big_bs'] >> 20} MiB", "dd_zero_file": "dd, its own zero-filled file"}
    for op in ("write", "read"):
        for k, v in io[op].items():
            ratio = f"{v['paired_ratio_to_dd']:>19.2f} {v['best_ratio_to_dd']:>10.2f}" if "paired_ratio_to_dd" in v else ""
            print(f"  {op + ': ' + labels[k]:<34} {v['median_gb_s']:>11.2f} {v['best_gb_s']:>10.2f} {ratio}")
    if "paired_ratio_to_ref" in io["read"]["ours"]:
        print(f"  this tree vs {io['reference_rev']} (median of paired ratios): write "
              f"{io['write']['ours']['paired_ratio_to_ref']:.2f}, read {io['read']['ours']['paired_ratio_to_ref']:.2f}")
    print(f"  read vs dd bs={io['dd_big_bs'] >> 20} MiB (paired): {io['read']['ours']['paired_ratio_to_dd_big_bs']:.2f}")
    st = " | ".join(f"{labels[k]} {v['write_gb_s']:.2f} / {v['read_gb_s']:.2f}" for k, v in io["staged"].items())
    print(f"  staged (tensor not 4 KiB-aligned) write / read GB/s: {st}")
    print(f"  drop_caches: {io['drop_caches']}; round trip equal: {io['round_trip_equal']}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--path", default="runs/nvme_bench", help="swap directory (on the disk to measure)")
    ap.add_argument("--gib", type=float, default=1.0, help="GiB moved per transfer")
    ap.add_argument("--block-size", type=int, default=1 << 20, help="the store's block_size and dd's bs (bytes)")
    ap.add_argument("--io-threads", type=int, default=4)
    ap.add_argument("--io-reps", type=int, default=7, help="rounds; each times every contestant once")
    ap.add_argument("--compare-with", default=None, metavar="REV",
                    help="also time NvmeSwapStore as committed at this git revision, in the same rounds")
    ap.add_argument("--dd-big-block", type=int, default=64 << 20, help="bs of the extra dd read")
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
            result["io"] = bench_io(args.path, args.gib, args.block_size, args.io_threads, args.io_reps,
                                    args.compare_with, args.dd_big_block)
    finally:
        if created:
            shutil.rmtree(args.path, ignore_errors=True)

    m = result["machine"]
    print(f"machine: {m.get('model_name')} | {m['usable_cores']} usable cores | {m.get('mem_total_gib')} GiB | "
          f"torch {m['torch']} | disk {m.get('disk')}")
    if "optimizer" in result:
        print(f"{'measure':<44} {'ours':>10} {'reference':>10} {'ratio':>7}")
        o = result["optimizer"]
        label = "AdamW step Gparam/s (%dM params, %d thr)" % (o["params"] / 1e6, o["threads"])
        print(f"{label:<44} {o['ours_gparam_s']:>10.3f} {o['torch_gparam_s']:>10.3f} {o['ratio']:>7.2f}")
    if "io" in result:
        print_io(result["io"])
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
