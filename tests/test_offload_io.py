"""The offload storage layer: swap files (direct and buffered I/O), the swap pipeline, the
directory checks, cleanup on close / exit / signals, and the CPU AdamW step."""

from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest
import torch

from hf_zero.offload import nvme
from hf_zero.offload import (ALIGN, NvmeSwapStore, OffloadError, Region, SwapPipeline,
                             adamw_reference, aligned_empty, cpu_threads_per_rank, fused_adamw_step,
                             region_layout)

REPO = Path(__file__).resolve().parents[1]
ALIGN_ELEMS = nvme.ALIGN_ELEMS
round_up = nvme.round_up
ODD = [1, 777, 1023, 1025, 4099, 70001]      # elements; none a multiple of 4 KiB in bytes


def _bits(n: int, seed: int) -> torch.Tensor:
    """Random fp32 bit patterns (NaNs and infinities included), compared as int32."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-2**31, 2**31 - 1, (n,), dtype=torch.int32, generator=g).view(torch.float32)


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.view(torch.int32), b.view(torch.int32))


def _swap_files(d) -> list:
    return sorted(p.name for p in Path(d).glob("hf_zero-*.swap"))


@pytest.fixture(scope="module")
def disk_dir():
    """A directory on a file system that accepts O_DIRECT (a real disk), or skip."""
    made = []
    for base in (REPO / "runs", Path("/var/tmp"), Path(tempfile.gettempdir())):
        try:
            base.mkdir(parents=True, exist_ok=True)
            d = tempfile.mkdtemp(prefix="offload_io_", dir=base)
        except OSError:
            continue
        made.append(d)
        try:
            with NvmeSwapStore(d, 0, {"probe": 1}) as s:
                ok = s.direct
        except OffloadError:
            ok = False
        if ok:
            yield d
            break
    else:
        pytest.skip("no directory here accepts O_DIRECT (tried runs/, /var/tmp, the temp dir)")
    for d in made:
        shutil.rmtree(d, ignore_errors=True)


def _round_trip(d: str, *, use_direct: bool, block_size: int = 8 * ALIGN, threads: int = 3) -> NvmeSwapStore:
    offsets, total = region_layout(ODD)
    store = NvmeSwapStore(d, 7, {"master": total, "exp_avg": total}, block_size=block_size,
                          threads=threads, use_direct=use_direct)
    try:
        assert _swap_files(d) == ["hf_zero-rank00007-exp_avg.swap", "hf_zero-rank00007-master.swap"]
        for name in ("master", "exp_avg"):
            for f in [os.path.join(d, f"hf_zero-rank00007-{name}.swap")]:
                assert os.path.getsize(f) == total * 4 and os.stat(f).st_blocks * 512 >= total * 4
        data = {}
        futures = []
        for k, (off, n) in enumerate(zip(offsets, ODD)):
            for j, name in enumerate(("master", "exp_avg")):
                t = _bits(n, seed=10 * k + j)
                if k % 2:   # misaligned source memory: goes through the staging buffer
                    t = torch.cat([torch.zeros(1), t])[1:]
                    assert t.data_ptr() % ALIGN
                else:       # aligned source: written without a copy
                    a = aligned_empty(n)
                    a.copy_(t)
                    t = a
                data[name, k] = t.clone()
                futures.append(store.write(name, t, off))
        for f in futures:
            f.result()
        store.flush()
        for k, (off, n) in enumerate(zip(offsets, ODD)):
            for name in ("master", "exp_avg"):
                out = aligned_empty(n) if k % 3 else torch.full((n + 1,), 5.0)[1:]
                store.read_into(name, out, off)
                assert _same_bits(out, data[name, k]), (name, k, n)
        # Synchronous helper and a rewrite of one region leave its neighbours intact.
        new = _bits(ODD[2], seed=99)
        store.write_from("master", new, offsets[2])
        assert _same_bits(store.read_into("master", torch.empty(ODD[2]), offsets[2]), new)
        for k in (1, 3):
            assert _same_bits(store.read_into("master", torch.empty(ODD[k]), offsets[k]), data["master", k])
    except BaseException:
        store.close()
        raise
    return store


def test_round_trip_direct_io_bit_for_bit(disk_dir):
    store = _round_trip(disk_dir, use_direct=True)
    assert store.direct and store.mode_reason == "O_DIRECT"
    store.close()
    assert _swap_files(disk_dir) == []


def test_round_trip_buffered_io_bit_for_bit(tmp_path):
    store = _round_trip(str(tmp_path), use_direct=False, block_size=ALIGN, threads=2)
    assert not store.direct
    store.close()
    assert _swap_files(tmp_path) == []


def test_o_direct_refused_falls_back_to_buffered(tmp_path, monkeypatch):
    real_open = os.open

    def refusing_open(path, flags, *args):
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")   # what tmpfs said before Linux 6.6
        return real_open(path, flags, *args)

    monkeypatch.setattr(nvme.os, "open", refusing_open)
    store = _round_trip(str(tmp_path), use_direct=True)
    assert not store.direct and "refused" in store.mode_reason
    store.close()
    assert _swap_files(tmp_path) == []


def test_tmpfs_works_in_whichever_mode_it_allows():
    if not os.path.isdir("/dev/shm") or not os.access("/dev/shm", os.W_OK):
        pytest.skip("no writable /dev/shm (tmpfs) here")
    d = tempfile.mkdtemp(prefix="offload_io_", dir="/dev/shm")
    try:
        store = _round_trip(d, use_direct=True)
        # tmpfs refuses O_DIRECT (EINVAL) before Linux 6.6 and accepts it after; either is fine.
        assert store.direct or "refused" in store.mode_reason
        store.close()
    finally:
        shutil.rmtree(d, ignore_errors=True)


def test_transfers_are_checked(tmp_path):
    with NvmeSwapStore(str(tmp_path), 0, {"a": 3000}, use_direct=False) as s:
        with pytest.raises(ValueError, match="multiple of 1024"):
            s.write("a", torch.zeros(10), offset=10)
        with pytest.raises(OffloadError, match="past the end"):
            s.write("a", torch.zeros(3001))
        with pytest.raises(ValueError, match="fp32"):
            s.write("a", torch.zeros(10, dtype=torch.bfloat16))
        with pytest.raises(KeyError, match="unknown"):
            s.read("b", torch.zeros(10))



@pytest.mark.parametrize("nbytes,block,threads", [
    (0, ALIGN, 4), (1, ALIGN, 4), (ALIGN, ALIGN, 4), (5 * ALIGN + 7, ALIGN, 2), (5 * ALIGN + 7, 8 * ALIGN, 4),
    (64 * ALIGN, 4 * ALIGN, 4), (64 * ALIGN + 4, 4 * ALIGN, 3), (8 * ALIGN + 1, 8 * ALIGN, 4),
    (15 * ALIGN, 8 * ALIGN, 4), (1 << 30, 1 << 20, 4), (1 << 30, 1 << 20, 1),
])
def test_a_transfer_is_cut_into_one_contiguous_aligned_span_per_thread(tmp_path, nbytes, block, threads):
    with NvmeSwapStore(str(tmp_path), 0, {"a": 1}, block_size=block, threads=threads, use_direct=False) as s:
        spans = s._spans(nbytes)
    assert len(spans) <= threads
    if nbytes == 0:
        assert spans == []
        return
    assert spans[0][0] == 0 and spans[-1][1] == nbytes
    for (a, b), (c, _) in zip(spans, spans[1:]):
        assert b == c                                    # contiguous, no gap, no overlap
    for i, (a, b) in enumerate(spans):
        assert a % ALIGN == 0 and b > a
        if i < len(spans) - 1:
            assert b - a >= block and b % ALIGN == 0
    sizes = [round_up(b - a, ALIGN) for a, b in spans]
    assert max(sizes) - min(sizes) <= ALIGN              # shared out evenly, to the 4 KiB block
    if nbytes >= threads * block:
        assert len(spans) == threads                     # every thread gets a share


def test_aligned_transfers_take_one_call_per_span_not_one_per_block(tmp_path, monkeypatch):
    """The zero-copy path moves each thread's span in one pwrite/preadv (so O_DIRECT puts many
    device requests in flight per call), not one call per ``block_size`` block."""
    calls = {"pwrite": [], "preadv": []}
    real_pwrite, real_preadv = os.pwrite, os.preadv

    def pwrite(fd, buf, pos):
        calls["pwrite"].append(len(memoryview(buf).cast("B")))
        return real_pwrite(fd, buf, pos)

    def preadv(fd, bufs, pos):
        calls["preadv"].append(sum(len(memoryview(b).cast("B")) for b in bufs))
        return real_preadv(fd, bufs, pos)

    n = 64 * ALIGN_ELEMS + 5            # 64 whole 4 KiB blocks and 20 bytes
    with NvmeSwapStore(str(tmp_path), 0, {"a": n}, block_size=ALIGN, threads=2, use_direct=False) as s:
        monkeypatch.setattr(nvme.os, "pwrite", pwrite)
        monkeypatch.setattr(nvme.os, "preadv", preadv)
        src = aligned_empty(n)
        src.copy_(_bits(n, seed=3))
        s.write_from("a", src)
        out = aligned_empty(n)
        s.read_into("a", out)
    assert _same_bits(out, src)
    # Spans of 33 blocks and of 31 blocks + 20 bytes. A write takes the last block's padding from
    # the storage's slack; a read stages the partial last block.
    assert sorted(calls["pwrite"]) == [32 * ALIGN, 33 * ALIGN]
    assert sorted(calls["preadv"]) == [ALIGN, 31 * ALIGN, 33 * ALIGN]


def test_short_and_capped_calls_still_move_every_byte(tmp_path, monkeypatch):
    """Calls capped at MAX_REQUEST, and calls the OS cuts short, continue where they stopped."""
    monkeypatch.setattr(nvme, "MAX_REQUEST", 3 * ALIGN)
    real_pwrite, real_preadv = os.pwrite, os.preadv
    seen = []

    def pwrite(fd, buf, pos):
        m = memoryview(buf).cast("B")
        seen.append(len(m))
        return real_pwrite(fd, m[: max(1, len(m) // 2 - 3)], pos)

    def preadv(fd, bufs, pos):
        m = memoryview(bufs[0]).cast("B")
        seen.append(len(m))
        return real_preadv(fd, [m[: max(1, len(m) // 2 - 5)]], pos)

    n = 20 * ALIGN_ELEMS + 333
    with NvmeSwapStore(str(tmp_path), 0, {"a": n}, block_size=2 * ALIGN, threads=3, use_direct=False) as s:
        monkeypatch.setattr(nvme.os, "pwrite", pwrite)
        monkeypatch.setattr(nvme.os, "preadv", preadv)
        data = _bits(n, seed=5)
        for src in (aligned_empty(n), torch.empty(n + 1)[1:]):   # zero-copy and staged
            src.copy_(data)
            s.write_from("a", src)
            for out in (aligned_empty(n), torch.full((n + 1,), 7.0)[1:]):
                out.fill_(0.0)
                assert _same_bits(s.read_into("a", out), data)
    assert max(seen) <= 3 * ALIGN


def test_multidimensional_and_empty_tensors(tmp_path):
    offsets, total = region_layout([3 * 333, 0, 4096])
    with NvmeSwapStore(str(tmp_path), 0, {"a": total}, block_size=ALIGN, threads=2, use_direct=False) as s:
        m = torch.cat([torch.zeros(1), _bits(3 * 333, seed=8)])[1:].view(3, 333)   # misaligned, 2-D
        assert m.data_ptr() % ALIGN and m.is_contiguous()
        s.write_from("a", m, offsets[0])
        out = torch.full((3 * 333 + 1,), 1.0)[1:].view(3, 333)
        assert _same_bits(s.read_into("a", out, offsets[0]), m)
        assert _same_bits(s.read_into("a", aligned_empty(3 * 333).view(333, 3), offsets[0]).view(3, 333), m)
        assert s.write("a", torch.empty(0), offsets[1]).result(timeout=10) is None
        assert s.read("a", torch.empty(0), offsets[1]).result(timeout=10) is None

# -- the pipeline ---------------------------------------------------------------------------

@pytest.mark.parametrize("buffer_count", [2, 3, 4])
def test_pipeline_visits_each_region_once_in_order_with_bounded_buffers(tmp_path, buffer_count):
    sizes = [3000, 1, 5000, 1024, 2047, 4096, 333]
    offsets, total = region_layout(sizes)
    regions = [Region(o, n) for o, n in zip(offsets, sizes)]
    store = NvmeSwapStore(str(tmp_path), 1, {"p": total, "m": total}, block_size=2 * ALIGN, threads=2,
                          use_direct=False)
    try:
        for o, n in zip(offsets, sizes):
            store.write_from("p", torch.arange(n, dtype=torch.float32), o)
            store.write_from("m", torch.full((n,), -1.0), o)
        events = []
        real_read = store.read

        def logged_read(name, out, offset=0):
            events.append(("read", offsets.index(offset)))
            return real_read(name, out, offset)

        store.read = logged_read
        pipe = SwapPipeline(store, regions, buffer_count=buffer_count)
        buffer_ptrs = {b[k].data_ptr() for b in pipe.buffers for k in b}
        visited = []

        def step(i, region, tensors):
            visited.append(i)
            events.append(("step", i))
            assert region == regions[i]
            assert set(tensors) == {"p", "m"}
            for t in tensors.values():
                assert t.numel() == region.numel and t.data_ptr() in buffer_ptrs
            assert torch.equal(tensors["p"], torch.arange(region.numel, dtype=torch.float32))
            tensors["p"].add_(i + 1)
            tensors["m"].fill_(i)

        pipe.run(step)
        assert visited == list(range(len(regions)))
        assert len(pipe.buffers) == buffer_count and pipe.max_live <= buffer_count
        # Region i+1 is read before region i is stepped (the overlap).
        for i in range(len(regions) - 1):
            assert events.index(("read", i + 1)) < events.index(("step", i))
        for i, (o, n) in enumerate(zip(offsets, sizes)):
            assert torch.equal(store.read_into("p", torch.empty(n), o), torch.arange(n, dtype=torch.float32) + i + 1)
            assert torch.equal(store.read_into("m", torch.empty(n), o), torch.full((n,), float(i)))
    finally:
        store.close()


def test_pipeline_runs_other_regions_in_the_same_buffers(tmp_path):
    """``run(step, regions)``: a subset (the engine's per-unit steps) reuses the buffers; a region
    bigger than them is refused before any transfer."""
    sizes = [3000, 5000, 1024]
    offsets, total = region_layout(sizes)
    regions = [Region(o, n) for o, n in zip(offsets, sizes)]
    with NvmeSwapStore(str(tmp_path), 0, {"p": total}, use_direct=False) as store:
        for o, n in zip(offsets, sizes):
            store.write_from("p", torch.zeros(n), o)
        pipe = SwapPipeline(store, regions[:2], buffer_count=2)
        ptrs = {b["p"].data_ptr() for b in pipe.buffers}
        seen = []

        def step(i, region, tensors):
            assert tensors["p"].data_ptr() in ptrs and tensors["p"].numel() == region.numel
            seen.append(region)
            tensors["p"].add_(1.0)

        pipe.run(step, [regions[2], regions[0]])
        pipe.run(step, [regions[2]])
        assert seen == [regions[2], regions[0], regions[2]]
        assert torch.equal(store.read_into("p", torch.empty(1024), offsets[2]), torch.full((1024,), 2.0))
        assert torch.equal(store.read_into("p", torch.empty(3000), offsets[0]), torch.ones(3000))
        with pytest.raises(ValueError, match="does not fit"):
            pipe.run(step, [Region(offsets[0], 6000)])


def test_pipeline_error_in_step_waits_for_io_and_propagates(tmp_path):
    offsets, total = region_layout([5000] * 5)
    with NvmeSwapStore(str(tmp_path), 0, {"p": total}, use_direct=False) as store:
        pipe = SwapPipeline(store, [Region(o, 5000) for o in offsets])

        def step(i, region, tensors):
            if i == 2:
                raise RuntimeError("boom")

        with pytest.raises(RuntimeError, match="boom"):
            pipe.run(step)


# -- directory checks -----------------------------------------------------------------------

def _assert_names_path(err: OffloadError, path) -> None:
    msg = str(err)
    assert os.path.abspath(str(path)) in msg and "Fix:" in msg, msg


def test_missing_path_is_refused(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(OffloadError, match="does not exist") as e:
        NvmeSwapStore(str(missing), 0, {"a": 10})
    _assert_names_path(e.value, missing)
    assert not missing.exists()


def test_file_instead_of_directory_is_refused(tmp_path):
    f = tmp_path / "a_file"
    f.write_text("x")
    with pytest.raises(OffloadError, match="not a directory") as e:
        NvmeSwapStore(str(f), 0, {"a": 10})
    _assert_names_path(e.value, f)


def test_unwritable_directory_is_refused(tmp_path, monkeypatch):
    d = tmp_path / "ro"
    d.mkdir()
    d.chmod(0o555)
    how = "mode 0555"
    if os.access(d, os.W_OK):
        # Root ignores mode bits; an immutable directory blocks root too (needs chattr and a file
        # system with the attribute, e.g. ext4). Last resort: simulate what access() says.
        d.chmod(0o755)
        made_immutable = shutil.which("chattr") and subprocess.run(
            ["chattr", "+i", str(d)], capture_output=True).returncode == 0
        if made_immutable:
            how = "chattr +i"
        else:
            how = "simulated"
            monkeypatch.setattr(nvme.os, "access", lambda p, mode: False)
    try:
        with pytest.raises(OffloadError, match="not writable") as e:
            NvmeSwapStore(str(d), 0, {"a": 10})
        _assert_names_path(e.value, d)
        assert _swap_files(d) == [], how
    finally:
        if how == "chattr +i":
            subprocess.run(["chattr", "-i", str(d)], check=True)
        d.chmod(0o755)


def test_too_little_space_is_refused_with_the_numbers(tmp_path, monkeypatch):
    absurd = 1 << 50                       # 4 PiB of fp32
    with pytest.raises(OffloadError, match="too little free space") as e:
        NvmeSwapStore(str(tmp_path), 0, {"exp_avg": absurd})
    _assert_names_path(e.value, tmp_path)
    assert f"{absurd * 4:,} for the files" in str(e.value) and "bytes" in str(e.value)
    assert _swap_files(tmp_path) == []

    real = os.statvfs(str(tmp_path))

    class Tiny:                             # a statvfs result with 1 MiB free
        f_bavail, f_frsize, f_flag = 256, 4096, real.f_flag

    monkeypatch.setattr(nvme.os, "statvfs", lambda p: Tiny)
    with pytest.raises(OffloadError, match=r"1,048,576 bytes = 0.00 GiB free") as e:
        NvmeSwapStore(str(tmp_path), 0, {"exp_avg": 1000})
    _assert_names_path(e.value, tmp_path)
    assert _swap_files(tmp_path) == []


def test_a_live_store_is_not_taken_over_but_a_stale_file_is(tmp_path):
    stale = tmp_path / "hf_zero-rank00000-a.swap"
    stale.write_bytes(b"left by a killed run")
    with NvmeSwapStore(str(tmp_path), 0, {"a": 10}, use_direct=False) as first:
        assert os.path.getsize(stale) == ALIGN
        with pytest.raises(OffloadError, match="in use by another live swap store"):
            NvmeSwapStore(str(tmp_path), 0, {"a": 10}, use_direct=False)
        assert stale.exists()               # the refused store did not delete the live file
        first.write_from("a", torch.ones(10))
    assert _swap_files(tmp_path) == []


# -- cleanup --------------------------------------------------------------------------------

def test_files_are_removed_on_close_and_when_collected(tmp_path):
    s = NvmeSwapStore(str(tmp_path), 2, {"a": 5000, "b": 1}, use_direct=False)
    assert len(_swap_files(tmp_path)) == 2
    s.close()
    s.close()                               # idempotent
    assert _swap_files(tmp_path) == []
    s = NvmeSwapStore(str(tmp_path), 2, {"a": 5000}, use_direct=False)
    del s
    import gc
    gc.collect()
    assert _swap_files(tmp_path) == []


_CHILD = """
import os, signal, sys, time, torch
from hf_zero.offload import NvmeSwapStore
mode = sys.argv[2]
if mode == "chained":
    signal.signal(signal.SIGTERM, lambda s, f: (print("previous handler ran", flush=True), sys.exit(3)))
store = NvmeSwapStore(sys.argv[1], 5, {"exp_avg": 300000, "exp_avg_sq": 300000}, use_direct=False)
store.write("exp_avg", torch.randn(300000)).result()
if mode == "exception":
    print("READY", flush=True)
    raise RuntimeError("the training loop crashed")
try:
    print("READY", flush=True)      # inside the try: the parent signals as soon as it reads this
    time.sleep(60)
except KeyboardInterrupt:
    print("KeyboardInterrupt raised", flush=True)
    raise
"""


@pytest.mark.parametrize("mode,sig,expect_rc,expect_out", [
    ("plain", signal.SIGTERM, -signal.SIGTERM, ""),
    ("chained", signal.SIGTERM, 3, "previous handler ran"),
    ("plain", signal.SIGINT, -signal.SIGINT, "KeyboardInterrupt raised"),  # an uncaught KeyboardInterrupt exits by SIGINT
    ("exception", None, 1, ""),
])
def test_files_are_removed_when_the_process_dies(tmp_path, mode, sig, expect_rc, expect_out):
    p = subprocess.Popen([sys.executable, "-c", _CHILD, str(tmp_path), mode], cwd=REPO,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        line = p.stdout.readline()
        assert line.strip() == "READY", line + p.stderr.read()
        if sig is not None:
            assert len(_swap_files(tmp_path)) == 2
            p.send_signal(sig)
        out, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == expect_rc, (out, err)
    assert expect_out in out
    if mode == "exception":
        assert "the training loop crashed" in err
    assert _swap_files(tmp_path) == []


# -- CPU optimizer --------------------------------------------------------------------------

def test_cpu_threads_per_rank():
    cores = len(os.sched_getaffinity(0))
    assert cpu_threads_per_rank(1) == cores
    assert cpu_threads_per_rank(cores * 4) == 1
    assert cpu_threads_per_rank(2) == max(1, cores // 2)
    assert cpu_threads_per_rank(8, configured=3) == 3
    with pytest.raises(ValueError):
        cpu_threads_per_rank(1, configured=0)


@pytest.mark.parametrize("impl", ["auto", "fused", "foreach", "loop"])
def test_fused_adamw_step_matches_reference_and_torch_adamw(impl):
    if impl == "fused" and not hasattr(torch, "_fused_adamw_"):
        pytest.skip("this torch has no _fused_adamw_")
    torch.manual_seed(0)
    sizes = [1, 1000, 4099, 70001]
    lr, betas, eps, wd = 1e-2, (0.9, 0.98), 1e-8, 0.1
    init = [torch.randn(n) for n in sizes]
    ours = [t.clone() for t in init]
    m, v = [torch.zeros(n) for n in sizes], [torch.zeros(n) for n in sizes]
    ref = [t.clone() for t in init]
    rm, rv = [torch.zeros(n) for n in sizes], [torch.zeros(n) for n in sizes]
    tparams = [torch.nn.Parameter(t.clone()) for t in init]
    topt = torch.optim.AdamW(tparams, lr=lr, betas=betas, eps=eps, weight_decay=wd, foreach=False)
    for step in range(1, 6):
        grads = [torch.randn(n) * 10 ** (step - 3) for n in sizes]
        used = fused_adamw_step(ours, grads, m, v, step, lr, betas, eps, wd, impl=impl)
        adamw_reference(ref, grads, rm, rv, step, lr, betas, eps, wd)
        for p, g in zip(tparams, grads):
            p.grad = g.clone()
        topt.step()
    assert used == (impl if impl != "auto" else "fused" if hasattr(torch, "_fused_adamw_") else "foreach")
    for a, b, c in zip(ours, ref, tparams):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
        torch.testing.assert_close(a, c.detach(), atol=1e-6, rtol=0)
    for a, b, c in zip(m + v, rm + rv, [topt.state[p]["exp_avg"] for p in tparams] +
                       [topt.state[p]["exp_avg_sq"] for p in tparams]):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(a, c, atol=1e-6, rtol=1e-6)


def test_fused_adamw_step_single_flat_tensor_and_bf16_grads():
    torch.manual_seed(1)
    p, g = torch.randn(5000), torch.randn(5000)
    m, v = torch.zeros(5000), torch.zeros(5000)
    p2, m2, v2 = p.clone(), m.clone(), v.clone()
    fused_adamw_step(p, g.bfloat16(), m, v, 1, 1e-3)
    adamw_reference(p2, g.bfloat16().float(), m2, v2, 1, 1e-3)
    torch.testing.assert_close(p, p2, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="step counts from 1"):
        fused_adamw_step(p, g, m, v, 0, 1e-3)
    with pytest.raises(ValueError, match="shape mismatch"):
        fused_adamw_step(p, g[:10], m, v, 1, 1e-3)
