"""Cost of the swap-file checksums (docs/reliability.md): write then read back a region of
``--mib`` MiB through NvmeSwapStore, with and without ``checksums``, best of ``--repeat``.

    OMP_NUM_THREADS=1 .venv/bin/python tests/fault_swap_bench.py --dir /tmp --mib 64 --threads 1 4
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from hf_zero.offload import NvmeSwapStore, aligned_empty


def bench(directory: str, mib: int, threads: int, checksums: bool, repeat: int) -> tuple:
    n = mib << 18  # fp32 elements
    src = aligned_empty(n, pin=False).copy_(torch.randn(n))
    out = aligned_empty(n, pin=False)
    with tempfile.TemporaryDirectory(dir=directory) as d, \
            NvmeSwapStore(d, 0, {"k": n}, threads=threads, checksums=checksums) as store:
        best_w = best_r = float("inf")
        for _ in range(repeat):
            t0 = time.perf_counter()
            store.write_from("k", src, 0)
            t1 = time.perf_counter()
            store.read_into("k", out, 0)
            t2 = time.perf_counter()
            best_w, best_r = min(best_w, t1 - t0), min(best_r, t2 - t1)
        assert torch.equal(out, src)
        return mib / best_w, mib / best_r, store.mode_reason


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", default=tempfile.gettempdir())
    ap.add_argument("--mib", type=int, default=64)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--repeat", type=int, default=5)
    a = ap.parse_args()
    for threads in a.threads:
        for checksums in (False, True):
            w, r, mode = bench(a.dir, a.mib, threads, checksums, a.repeat)
            print(f"threads={threads} checksums={str(checksums):5}  write {w:7.0f} MiB/s  read {r:7.0f} MiB/s  ({mode})")
