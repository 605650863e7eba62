#!/usr/bin/env python
"""Side-by-side benchmark: torch DDP, torch FSDP2, DeepSpeed ZeRO and hf_zero on one model.

The file is its own launcher and worker, like ``scripts/bench_engine.py`` (whose model and
batches it imports; the launcher, machine description and table helpers are scripts/_bench.py's):

    python scripts/bench_peers.py                      # full run
    python scripts/bench_peers.py --quick              # smoke run
    python scripts/bench_peers.py --only ddp,hfz2,ds2  # a subset
    python scripts/bench_peers.py --ttfs-only          # time to first step only

DeepSpeed is optional. Run the script with an interpreter that has it (a separate venv, see
docs/benchmarks.md); without it the DeepSpeed rows say why they are empty. On CPU the worker
sets ``DS_ACCELERATOR=cpu`` and calls ``deepspeed.init_distributed(dist_backend="gloo")``.

Variants (``--only`` takes these keys):
  ddp              torch DistributedDataParallel + torch.optim.AdamW
  fsdp2            torch.distributed.fsdp.fully_shard per decoder layer + root, reshard_after_forward=True
  fsdp2-noreshard  the same with reshard_after_forward=False
  ds1, ds2, ds3    DeepSpeed ZeRO stages 1-3, optimizer from its config: AdamW with torch_adam=true
                   (torch.optim.AdamW, no fused C++ op)
  ds2-offload      DeepSpeed ZeRO-2, offload_optimizer.device=cpu, its DeepSpeedCPUAdam (cpu_adam op)
  hfz1, hfz2, hfz3 hf_zero stages 1-3, the same torch.optim.AdamW handed to hf_zero.initialize
  hfz2-offload     hf_zero stage 2, offload_optimizer.device=cpu

Method
------
* Timing launch: ``--world-size`` processes (one per GPU with ``--device cuda``) build every
  variant from the same seed and train them on the same batches (global batch = world size x
  micro batch). After ``--warmup`` untimed steps each, ``--rounds`` rounds follow; in each
  round every variant runs ``--steps-per-round`` timed steps, the order rotating per round. A
  step's time is the slowest rank's forward + backward + optimizer step (the ranks are aligned
  by an untimed barrier; on CUDA the device is synchronised before the clock stops).
* Loss agreement: afterwards every variant evaluates one held-out batch (mean over ranks); a
  variant whose loss differs from DDP's by more than ``--loss-tol`` is flagged in the table.
* Communication per step per rank: every ``torch.distributed`` collective the worker can see is
  wrapped and counted with ring-algorithm volumes (all-gather / reduce-scatter / reduce send
  (N-1)/N of the full buffer, all-reduce twice that, broadcast the tensor from the source).
  DDP reduces in C++, out of sight, so its figure is the formula 2(N-1)/N x gradient bytes;
  hf_zero reports its own count (``memory_report``), and the wrapper's count is kept in the JSON
  as a cross-check. Tensors of 16 bytes or less are counted apart as control.
* Model-state bytes per rank: hf_zero: ``memory_report()``. DDP: parameter + gradient + AdamW
  state tensor sizes. FSDP2: the local shards of the parameter, gradient and optimizer-state
  DTensors, measured right before the optimizer step. DeepSpeed: right before ``engine.step()``,
  every distinct tensor storage reachable from its ZeRO optimizer object (flat parameter
  groups, fp32 partitions, gradient buffers and partitions, optimizer states) and the module's
  parameters (stage 3: their ``ds_tensor`` partitions).
* Peak RSS per rank: one extra launch per variant, sequentially, each building only that
  variant and running ``--rss-steps`` steps; ``ru_maxrss`` at the end (on CUDA also
  ``torch.cuda.max_memory_allocated``).
* Time to first step: one launch per ``--ttfs`` variant, from process start (Popen) to the end
  of the first optimizer step on rank 0, split into imports, process group, engine
  construction and first step. It reports whether ``TORCH_EXTENSIONS_DIR`` was empty
  beforehand; ``--clean-extensions`` points it at a fresh empty directory for that launch.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench import (  # noqa: E402  (stdlib-only at import time)
    MB,
    loadavg,
    machine_info,
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
from bench_engine import add_run_args, build_model, make_batches  # noqa: E402  (the same model and data)

REPO = Path(__file__).resolve().parent.parent
VARIANTS = ("ddp", "fsdp2", "fsdp2-noreshard", "ds1", "ds2", "ds3", "ds2-offload",
            "hfz1", "hfz2", "hfz3", "hfz2-offload")
NAMES = {
    "ddp": "torch DDP",
    "fsdp2": "FSDP2 reshard=True",
    "fsdp2-noreshard": "FSDP2 reshard=False",
    "ds1": "DeepSpeed ZeRO-1",
    "ds2": "DeepSpeed ZeRO-2",
    "ds3": "DeepSpeed ZeRO-3",
    "ds2-offload": "DeepSpeed ZeRO-2 + CPU offload",
    "hfz1": "hf_zero stage 1",
    "hfz2": "hf_zero stage 2",
    "hfz3": "hf_zero stage 3",
    "hfz2-offload": "hf_zero stage 2 + CPU offload",
}
# DeepSpeed ZeRO optimizer attributes (0.19) holding fp32 master partitions, gradient partitions,
# and (stage 3) the parameters it keeps whole; every other tensor attribute counts as a buffer.
DS_MASTER_ATTRS = {"single_partition_of_fp32_groups", "fp32_partitioned_groups_flat"}
DS_GRAD_ATTRS = {"averaged_gradients", "_DeepSpeedZeroOptimizer_Stage3__param_id_to_grad_partition",
                 "grad_partitions_flat_buffer", "offload_gradient_dict"}
DS_PARAM_ATTRS = {"fp16_groups", "bit16_groups_flat", "fp16_partitioned_groups_flat"}
DEFAULT_EXT_DIR = os.path.expanduser("~/.cache/torch_extensions_peers")


# ------------------------------------------------------------------------- counted collectives
class CommCounter:
    """Wraps the public ``torch.distributed`` collectives and adds up ring-algorithm volumes.

    Installed before DeepSpeed or hf_zero is imported, so the function references they keep
    are the wrapped ones. Only the outermost call counts (torch's deprecated names forward to
    the new ones)."""

    # name -> (kind, index of the tensor argument whose size is counted, factor(n))
    SPEC = {
        "all_reduce": ("all_reduce", 0, lambda n: 2 * (n - 1) / n),
        "all_reduce_coalesced": ("all_reduce", 0, lambda n: 2 * (n - 1) / n),
        "all_gather_into_tensor": ("all_gather", 1, lambda n: n - 1),
        "all_gather_single": ("all_gather", 1, lambda n: n - 1),
        "_all_gather_base": ("all_gather", 1, lambda n: n - 1),
        "all_gather": ("all_gather", 1, lambda n: n - 1),
        "reduce_scatter_tensor": ("reduce_scatter", 0, lambda n: n - 1),
        "reduce_scatter_single": ("reduce_scatter", 0, lambda n: n - 1),
        "_reduce_scatter_base": ("reduce_scatter", 0, lambda n: n - 1),
        "reduce_scatter": ("reduce_scatter", 0, lambda n: n - 1),
        "reduce": ("reduce", 0, lambda n: (n - 1) / n),
        "broadcast": ("broadcast", 0, None),
    }

    def __init__(self):
        import torch.distributed as dist

        self.dist = dist
        self.totals = {}
        self.depth = threading.local()
        for name, spec in self.SPEC.items():
            orig = getattr(dist, name, None)
            if orig is not None:
                setattr(dist, name, self._wrap(name, orig, spec))

    @staticmethod
    def _nbytes(x) -> int:
        if isinstance(x, (list, tuple)):
            return sum(CommCounter._nbytes(t) for t in x)
        return x.numel() * x.element_size() if hasattr(x, "numel") else 0

    def _wrap(self, name, orig, spec):
        import inspect

        sig = inspect.signature(orig)
        kind, index, factor = spec

        def wrapped(*a, **kw):
            d = getattr(self.depth, "d", 0)
            if d == 0:
                try:
                    args = list(sig.bind(*a, **kw).arguments.values())
                    n = self.dist.get_world_size(kw.get("group"))
                    if n > 1:
                        nbytes = self._nbytes(args[index])
                        if kind == "broadcast":
                            src = args[1]
                            vol = nbytes if self.dist.get_rank() == src else 0
                        else:
                            vol = factor(n) * nbytes
                        key = "control" if nbytes <= 16 else kind
                        self.totals[key] = self.totals.get(key, 0) + vol
                except Exception:  # counting must never break a collective
                    self.totals["uncounted_calls"] = self.totals.get("uncounted_calls", 0) + 1
            self.depth.d = d + 1
            try:
                return orig(*a, **kw)
            finally:
                self.depth.d = d

        wrapped.__wrapped__ = orig
        return wrapped

    def take(self) -> dict:
        out = {k: int(round(v)) for k, v in self.totals.items()}
        out["data"] = sum(v for k, v in out.items() if k not in ("control", "uncounted_calls"))
        self.totals = {}
        return out


# ------------------------------------------------------------------------- tensor accounting
def storage_bytes(tensors, seen=None) -> int:
    """Bytes of the distinct storages behind ``tensors`` (views count once; storages already in
    ``seen`` are skipped, and the new ones added to it)."""
    seen = set() if seen is None else seen
    total = 0
    for t in tensors:
        t = getattr(t, "_local_tensor", t)  # DTensor -> its local shard
        try:
            st = t.untyped_storage()
        except Exception:
            continue
        key = (st.data_ptr(), st.nbytes())
        if key in seen or st.nbytes() == 0:
            continue
        seen.add(key)
        total += st.nbytes()
    return total


def tensors_in(obj, depth: int = 3, _seen=None):
    """Tensors reachable from ``obj`` through attributes, lists, tuples and dicts."""
    import torch

    if _seen is None:
        _seen = set()
    if id(obj) in _seen or depth < 0:
        return
    _seen.add(id(obj))
    if torch.is_tensor(obj):
        yield obj
        g = obj.grad if isinstance(obj, torch.nn.Parameter) or obj.requires_grad else None
        if g is not None:
            yield g
        return
    if isinstance(obj, dict):
        items = list(obj.values())
    elif isinstance(obj, (list, tuple, set)):
        items = list(obj)
    elif hasattr(obj, "__dict__") and not isinstance(obj, (type, torch.nn.Module)):
        items = list(vars(obj).values())
    else:
        return
    for x in items:
        yield from tensors_in(x, depth - 1, _seen)


# ------------------------------------------------------------------------- variants
def ds_config(key: str, args) -> dict:
    stage = int(key[2])
    cfg = {
        "train_micro_batch_size_per_gpu": args.micro_batch,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 0.0,
        "steps_per_print": 10 ** 9,
        "wall_clock_breakdown": False,
        "optimizer": {"type": "AdamW", "params": {
            "lr": args.lr, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": args.weight_decay}},
        "zero_optimization": {"stage": stage},
    }
    if key.endswith("offload"):
        cfg["zero_optimization"]["offload_optimizer"] = {"device": "cpu", "pin_memory": args.device == "cuda"}
    else:
        cfg["optimizer"]["params"]["torch_adam"] = True
    return cfg


class Variant:
    """One model under one data-parallel wrapper, with a uniform step()."""

    def __init__(self, key: str, args, world: int, device, counter: CommCounter):
        import torch

        self.key, self.args, self.world, self.device, self.counter = key, args, world, device, counter
        model = build_model(args)
        self.num_params = sum(p.numel() for p in model.parameters())
        self.engine = self.ddp = self.opt = None
        self.states_at_step = None
        self.measure_next = False
        self.comm_last = {}
        betas, eps = (0.9, 0.999), 1e-8
        if key == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            model.to(device)
            self.ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
            self.opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=betas, eps=eps,
                                         weight_decay=args.weight_decay)
            self.forward = self.ddp
        elif key.startswith("fsdp2"):
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard

            mesh = init_device_mesh(device.type, (world,))
            reshard = key == "fsdp2"
            model.to(device)
            for layer in model.model.layers:
                fully_shard(layer, mesh=mesh, reshard_after_forward=reshard)
            fully_shard(model, mesh=mesh, reshard_after_forward=reshard)
            self.opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=betas, eps=eps,
                                         weight_decay=args.weight_decay)
            self.forward = model
        elif key.startswith("ds"):
            import deepspeed

            self.engine, self.opt, _, _ = deepspeed.initialize(
                model=model, model_parameters=[p for p in model.parameters()], config=ds_config(key, args))
            self.forward = self.engine
        else:
            import hf_zero

            stage = int(key[3])
            zo = {"stage": stage}
            opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=betas, eps=eps,
                                    weight_decay=args.weight_decay)
            if key.endswith("offload"):
                zo["offload_optimizer"] = {"device": "cpu"}
            config = {"train_micro_batch_size_per_gpu": args.micro_batch, "gradient_accumulation_steps": 1,
                      "zero_optimization": zo}
            self.engine, self.opt, _, _ = hf_zero.initialize(model=model, optimizer=opt, config=config)
            self.forward = self.engine
        self.model = model
        self.steps = 0
        counter.take()  # start-up broadcasts are not part of a step

    def step(self, ids) -> float:
        ids = ids.to(self.device)
        loss = self.forward(input_ids=ids, labels=ids).loss
        if self.key == "ddp" or self.key.startswith("fsdp2"):
            loss.backward()
            if self.measure_next:
                self.states_at_step = self._torch_states()
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
        else:
            self.engine.backward(loss)
            if self.measure_next and self.key.startswith("ds"):
                self.states_at_step = self._ds_states()
            self.engine.step()
        self.measure_next = False
        self.steps += 1
        self.comm_last = self.counter.take()
        return float(loss.detach())

    def settle(self) -> None:
        """Finish what the step left running in the background (hf_zero stages 1-2: the
        post-step all-gathers, otherwise waited for by the next forward)."""
        if self.key.startswith("hfz"):
            self.engine.wait_for_parameters()

    # -- accounting -----------------------------------------------------------------------
    def _torch_states(self) -> dict:
        import torch

        params = list(self.model.parameters())
        states = [v for st in self.opt.state.values() for v in st.values() if torch.is_tensor(v) and v.dim() > 0]
        p, g = storage_bytes(params), storage_bytes([q.grad for q in params if q.grad is not None])
        s = storage_bytes(states)
        return {"param_bytes": p, "grad_bytes": g, "master_bytes": 0, "optimizer_state_bytes": s,
                "model_state_bytes": p + g + s}

    def _ds_states(self) -> dict:
        import torch

        zopt = self.engine.optimizer
        inner = getattr(zopt, "optimizer", zopt)
        params = [getattr(q, "ds_tensor", q) for q in self.model.parameters()]
        states = [v for st in inner.state.values() for v in st.values() if torch.is_tensor(v) and v.dim() > 0]
        seen = set()
        p = storage_bytes(params, seen)
        s = storage_bytes(states, seen)
        by_attr = {}
        for name, value in sorted(vars(zopt).items()):
            if name != "optimizer":
                b = storage_bytes(list(tensors_in(value, depth=2)), seen)
                if b:
                    by_attr[name] = b
        master = sum(b for a, b in by_attr.items() if a in DS_MASTER_ATTRS)
        grads = sum(b for a, b in by_attr.items() if a in DS_GRAD_ATTRS)
        p += sum(b for a, b in by_attr.items() if a in DS_PARAM_ATTRS)
        buffers = {a: b for a, b in by_attr.items()
                   if a not in DS_MASTER_ATTRS | DS_GRAD_ATTRS | DS_PARAM_ATTRS}
        return {"param_bytes": p, "grad_bytes": grads, "master_bytes": master, "optimizer_state_bytes": s,
                "model_state_bytes": p + grads + master + s, "other_engine_bytes": sum(buffers.values()),
                "other_by_attribute": buffers,
                "note": "distinct storages of the module parameters, the ZeRO optimizer's attributes and its "
                        "inner optimizer's states, right before engine.step(); other = buffers, not model states"}

    def report(self) -> dict:
        n = self.world
        if self.key.startswith("hfz"):
            r = self.engine.memory_report()
            rep = {x: r[x] for x in ("param_bytes", "grad_bytes", "master_bytes", "optimizer_state_bytes",
                                     "model_state_bytes")}
            rep["comm_bytes_last_step"] = r["comm_bytes_last_step"]["data"]
            rep["comm_source"] = "hf_zero memory_report"
            rep["comm_detail"] = r["comm_bytes_last_step"]
            rep["comm_wrapper_count"] = self.comm_last
            return rep
        rep = dict(self.states_at_step or {"model_state_bytes": None})
        if self.key == "ddp":
            gbytes = sum(q.numel() * q.element_size() for q in self.model.parameters() if q.requires_grad)
            rep["comm_bytes_last_step"] = int(round(2 * (n - 1) / n * gbytes)) if n > 1 else 0
            rep["comm_source"] = "formula 2(N-1)/N x gradient bytes (DDP reduces in C++)"
            rep["comm_detail"] = {"all_reduce": rep["comm_bytes_last_step"]}
        else:
            rep["comm_bytes_last_step"] = self.comm_last.get("data") or None
            rep["comm_source"] = "counted torch.distributed calls"
            rep["comm_detail"] = self.comm_last
        return rep

    def eval_loss(self, ids) -> float:
        import torch
        import torch.distributed as dist

        ids = ids.to(self.device)
        with torch.no_grad():
            if self.engine is not None:
                self.engine.eval()
                loss = self.engine(input_ids=ids, labels=ids).loss
                self.engine.train()
            else:
                loss = self.forward(input_ids=ids, labels=ids).loss
        t = loss.detach().double().reshape(1)
        dist.all_reduce(t)
        self.counter.take()
        return float(t.item()) / self.world


# ------------------------------------------------------------------------- worker
def worker(args) -> None:
    t_proc = float(os.environ.get("BENCH_T0", time.time()))
    marks = {"python_started": time.time() - t_proc}
    counter = CommCounter()
    import torch
    import torch.distributed as dist

    torch.set_num_threads(args.threads)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", rank))
    keys = args.variants.split(",")
    uses_ds = any(k.startswith("ds") for k in keys)
    device = torch.device("cuda", local) if args.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    import transformers  # noqa: F401  (counted in the import phase)

    if uses_ds:
        import deepspeed
        import logging

        deepspeed.utils.logger.setLevel(logging.WARNING)
    marks["imports_done"] = time.time() - t_proc
    backend = "nccl" if device.type == "cuda" else "gloo"
    if uses_ds:
        deepspeed.init_distributed(dist_backend=backend)
    else:
        dist.init_process_group(backend)
    marks["process_group_up"] = time.time() - t_proc
    say = (lambda *a: print(*a, file=sys.stderr, flush=True)) if rank == 0 else (lambda *a: None)
    result = {"rank": rank, "world_size": world, "role": args._role}

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    if args._role == "ttfs":
        v = Variant(keys[0], args, world, device, counter)
        marks["engine_built"] = time.time() - t_proc
        batches, _ = make_batches(args, rank, 1)
        v.step(batches[0])
        sync()
        marks["first_step_done"] = time.time() - t_proc
        result.update(variant=keys[0], marks_s=marks)
    elif args._role == "rss":
        baseline = proc_status_kb("VmHWM") * 1024
        v = Variant(keys[0], args, world, device, counter)
        batches, _ = make_batches(args, rank, args.rss_steps)
        for ids in batches:
            dist.barrier()
            v.step(ids)
        sync()
        dist.barrier()
        result.update(variant=keys[0], baseline_vmhwm_bytes=baseline,
                      ru_maxrss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                      cuda_max_allocated_bytes=torch.cuda.max_memory_allocated() if device.type == "cuda" else None)
    else:
        total = args.warmup + args.rounds * args.steps_per_round
        batches, held_out = make_batches(args, rank, total)
        variants = {}
        for k in keys:
            say(f"[peers] building {NAMES[k]}")
            variants[k] = Variant(k, args, world, device, counter)
        result["num_parameters"] = variants[keys[0]].num_params
        times = {k: [] for k in keys}

        blocks = StepBlocks()

        def run(k, timed):
            v = variants[k]
            v.measure_next = v.steps == total - 1  # model states at the last training step
            if blocks.begin(k, args.steps_per_round if timed else 1):
                dist.barrier()
            sync()
            t0 = time.perf_counter()
            v.step(batches[v.steps])
            if blocks.end():
                v.settle()
            sync()
            if timed:
                times[k].append(time.perf_counter() - t0)

        t_start = time.perf_counter()
        run_rounds(keys, run, times, args, say, "peers", t_start)
        result["wall_s"] = time.perf_counter() - t_start
        result["variants"] = {}
        for k in keys:
            v = variants[k]
            rep = v.report()
            result["variants"][k] = {"step_times_s": times[k], "steps": v.steps,
                                     "eval_loss": v.eval_loss(held_out), **rep}
    out = Path(args._out) / f"{args._role}-{'-'.join(keys)}-rank{rank}.json"
    out.write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


# ------------------------------------------------------------------------- launcher
def launch(args, role: str, variants: str, out_dir: Path, extra_env=None) -> list:
    extra = dict(TORCH_EXTENSIONS_DIR=args.extensions_dir, BENCH_T0=repr(time.time()))
    if args.device == "cpu":
        extra["DS_ACCELERATOR"] = "cpu"
    extra.update(extra_env or {})
    procs = spawn_ranks(worker_cmd(__file__, *sys.argv[1:], "--variants", variants, "--_role", role,
                                   "--_out", out_dir), args.world_size, args.threads, **extra)
    failed = wait_ranks(procs, args.timeout)
    if failed:
        raise RuntimeError(f"{role} launch failed on rank {failed[0]} (exit {failed[1]})")
    keys = "-".join(variants.split(","))
    return [json.loads((out_dir / f"{role}-{keys}-rank{r}.json").read_text()) for r in range(args.world_size)]


def unavailable(keys, device: str) -> dict:
    """Variants that cannot run here, with the reason (checked in a subprocess, no guessing)."""
    why = {}
    if any(k.startswith("ds") for k in keys):
        env = dict(os.environ, DS_ACCELERATOR="cpu") if device == "cpu" else dict(os.environ)
        r = subprocess.run([sys.executable, "-c", "import deepspeed; print(deepspeed.__version__)"],
                           capture_output=True, text=True, env=env)
        if r.returncode != 0:
            last = (r.stderr.strip().splitlines() or ["import failed"])[-1]
            for k in keys:
                if k.startswith("ds"):
                    why[k] = f"DeepSpeed not importable by {sys.executable}: {last}"
    return why


def ds_version(device: str):
    env = dict(os.environ, DS_ACCELERATOR="cpu") if device == "cpu" else dict(os.environ)
    r = subprocess.run([sys.executable, "-c", "import deepspeed; print(deepspeed.__version__)"],
                       capture_output=True, text=True, env=env)
    return r.stdout.strip().splitlines()[-1] if r.returncode == 0 and r.stdout.strip() else None


def time_to_first_step(args, tmp: Path) -> dict:
    out = {}
    for k in args.ttfs.split(","):
        if not k:
            continue
        ext = args.extensions_dir
        clean_dir = None
        if args.clean_extensions and k.startswith("ds"):
            clean_dir = tempfile.mkdtemp(prefix="torch_ext_clean_", dir=os.path.dirname(DEFAULT_EXT_DIR))
            ext = clean_dir
        was_empty = not (os.path.isdir(ext) and any(os.scandir(ext)))
        print(f"[peers] time to first step: {NAMES[k]} (extensions dir {ext}, empty: {was_empty})",
              file=sys.stderr, flush=True)
        t0 = time.time()
        try:
            ranks = launch(args, "ttfs", k, tmp, extra_env={"TORCH_EXTENSIONS_DIR": ext})
            out[k] = {"name": NAMES[k], "marks_s_rank0": ranks[0]["marks_s"],
                      "launcher_wall_s": time.time() - t0, "extensions_dir": ext,
                      "extensions_dir_was_empty": was_empty if k.startswith("ds") else None}
        except Exception as e:  # noqa: BLE001
            out[k] = {"name": NAMES[k], "error": str(e)}
        finally:
            if clean_dir:
                shutil.rmtree(clean_dir, ignore_errors=True)
    return out


# ------------------------------------------------------------------------- summary
def summarize(args, main_ranks, rss, skipped, machine) -> dict:
    world = args.world_size
    out = {"machine": machine, "settings": {k: v for k, v in vars(args).items() if not k.startswith("_")},
           "world_size": world, "device": args.device, "backend": "nccl" if args.device == "cuda" else "gloo",
           "dtype": "fp32", "variants": {}}
    if main_ranks:
        out["num_parameters"] = main_ranks[0]["num_parameters"]
        out["timing_launch_wall_s"] = max(r["wall_s"] for r in main_ranks)
    for k in args.only.split(","):
        if k in skipped:
            out["variants"][k] = {"name": NAMES[k], "skipped": skipped[k]}
            continue
        per = [r["variants"][k] for r in main_ranks]
        steps = [max(ts) for ts in zip(*(p["step_times_s"] for p in per))]
        e = {
            "name": NAMES[k], "step_times_s": steps,
            "median_s": statistics.median(steps), "p25_s": percentile(steps, 0.25), "p75_s": percentile(steps, 0.75),
            "eval_loss": per[0]["eval_loss"], "steps": per[0]["steps"],
            "model_state_bytes_per_rank": [p.get("model_state_bytes") for p in per],
            "model_state_breakdown_per_rank": [
                {x: p.get(x) for x in ("param_bytes", "grad_bytes", "master_bytes", "optimizer_state_bytes",
                                       "other_engine_bytes", "other_by_attribute", "note") if x in p} for p in per],
            "comm_bytes_last_step_per_rank": [p.get("comm_bytes_last_step") for p in per],
            "comm_source": per[0].get("comm_source"),
            "comm_detail_per_rank": [p.get("comm_detail") for p in per],
        }
        if "comm_wrapper_count" in per[0]:
            e["comm_wrapper_count_per_rank"] = [p["comm_wrapper_count"] for p in per]
        r = rss.get(k)
        if isinstance(r, list):
            e["peak_rss_bytes_per_rank"] = [x["ru_maxrss_bytes"] for x in r]
            e["baseline_vmhwm_bytes_per_rank"] = [x["baseline_vmhwm_bytes"] for x in r]
            if args.device == "cuda":
                e["cuda_max_allocated_bytes_per_rank"] = [x["cuda_max_allocated_bytes"] for x in r]
        else:
            e["peak_rss_bytes_per_rank"] = [None] * world
            if isinstance(r, str):
                e["peak_rss_error"] = r
        out["variants"][k] = e
    ran = {k: e for k, e in out["variants"].items() if "median_s" in e}
    base = ran.get("ddp")
    ref = base["eval_loss"] if base else (next(iter(ran.values()))["eval_loss"] if ran else None)
    for e in ran.values():
        e["ratio_to_ddp"] = e["median_s"] / base["median_s"] if base else None
        e["loss_diff_vs_reference"] = e["eval_loss"] - ref
        e["loss_agrees"] = abs(e["eval_loss"] - ref) <= args.loss_tol
    losses = [e["eval_loss"] for e in ran.values()]
    out["max_eval_loss_difference"] = (max(losses) - min(losses)) if losses else None
    out["loss_reference"] = "ddp" if base else "first variant"
    return out


def render(s: dict) -> str:
    m, st = s["machine"], s["settings"]
    lines = [
        f"model: Llama, {s.get('num_parameters', 0):,} parameters, fp32, {s['world_size']} {s['backend']} "
        f"processes ({s['device']}), micro batch {st['micro_batch']} x seq {st['seq_len']} per rank, "
        f"AdamW lr {st['lr']} wd {st['weight_decay']}",
        f"machine: {m['cpu_model']}, {m['usable_cpus']} usable CPUs, torch {m['torch']}, transformers "
        f"{m['transformers']}, deepspeed {m.get('deepspeed')}, {st['threads']} thread(s)/process",
        f"load average at start / end: {s.get('loadavg_start')} / {s.get('loadavg_end')}", "",
    ]
    rows = [] if not s["variants"] else [("variant", "median s/step", "p25-p75 s", "ratio to DDP", "model-state MB/rank",
             "comm MB/step/rank", "final loss", "peak RSS MB/rank")]
    for k, e in s["variants"].items():
        if "skipped" in e:
            rows.append((e["name"], "not run: " + e["skipped"][:90], "", "", "", "", "", ""))
            continue
        loss = f"{e['eval_loss']:.6f}" + ("" if e["loss_agrees"] else f" DISAGREES ({e['loss_diff_vs_reference']:+.2e})")
        rss = per_rank(e["peak_rss_bytes_per_rank"], fmt="{:.0f}")
        rows.append((
            e["name"], f"{e['median_s']:.3f}", f"{e['p25_s']:.3f}-{e['p75_s']:.3f}",
            f"{e['ratio_to_ddp']:.2f}" if e.get("ratio_to_ddp") else "n/a",
            per_rank(e["model_state_bytes_per_rank"]), per_rank(e["comm_bytes_last_step_per_rank"]), loss,
            rss if rss != "n/a" else ("n/a: " + e.get("peak_rss_error", "not measured"))[:60],
        ))
    if rows:
        lines += markdown_table(rows)
    if s.get("max_eval_loss_difference") is not None:
        lines.append(f"max final-loss difference across variants: {s['max_eval_loss_difference']:.3g} "
                     f"(tolerance vs {s['loss_reference']}: {st['loss_tol']:g})")
    for k, t in (s.get("time_to_first_step") or {}).items():
        if "error" in t:
            lines.append(f"time to first step, {t['name']}: failed ({t['error']})")
            continue
        mk = t["marks_s_rank0"]
        lines.append(
            f"time to first step, {t['name']}: {mk['first_step_done']:.1f} s (imports {mk['imports_done']:.1f}, "
            f"process group {mk['process_group_up'] - mk['imports_done']:.1f}, engine "
            f"{mk['engine_built'] - mk['process_group_up']:.1f}, first step {mk['first_step_done'] - mk['engine_built']:.1f})"
            + ("" if t["extensions_dir_was_empty"] is None else
               f"; extensions dir empty at start: {t['extensions_dir_was_empty']}"))
    return "\n".join(lines)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--only", default=",".join(VARIANTS), help="comma list of: " + ",".join(VARIANTS))
    ap.add_argument("--quick", action="store_true", help="smoke run: 1 warm-up, 2 rounds of 1 step, 2-step RSS launches")
    ap.add_argument("--json", default="runs/bench_peers.json")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                    help="cuda: NCCL, one process per GPU (world size defaults to the GPU count)")
    ap.add_argument("--world-size", type=int, default=None, help="default: 2 on CPU, the GPU count on CUDA")
    add_run_args(ap, rounds=6)
    ap.add_argument("--loss-tol", type=float, default=1e-4, help="largest accepted |loss - DDP loss|")
    ap.add_argument("--ttfs", default="ds2-offload,hfz2-offload",
                    help="variants whose time to first step is measured (empty: none)")
    ap.add_argument("--ttfs-only", action="store_true", help="only the time-to-first-step launches")
    ap.add_argument("--clean-extensions", action="store_true",
                    help="time-to-first-step launches of DeepSpeed use a fresh empty TORCH_EXTENSIONS_DIR")
    ap.add_argument("--extensions-dir", default=os.environ.get("TORCH_EXTENSIONS_DIR", DEFAULT_EXT_DIR))
    ap.add_argument("--timeout", type=float, default=2400.0, help="seconds per launch")
    ap.add_argument("--variants", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--_role", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--_out", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.quick:
        args.warmup, args.rounds, args.steps_per_round, args.rss_steps = 1, 2, 1, 2
    if args.world_size is None:
        if args.device == "cuda":
            import torch

            args.world_size = torch.cuda.device_count()
        else:
            args.world_size = 2
    for k in args.only.split(",") + [x for x in args.ttfs.split(",") if x]:
        if k not in VARIANTS:
            ap.error(f"unknown variant {k!r}; choose from {','.join(VARIANTS)}")
    if args.extensions_dir and Path(args.extensions_dir).resolve().is_relative_to(REPO):
        ap.error("keep --extensions-dir outside the repository")
    return args


def main() -> None:
    args = parse_args()
    if args._role is not None:
        worker(args)
        return
    os.makedirs(args.extensions_dir, exist_ok=True)
    keys = args.only.split(",")
    skipped = unavailable(keys, args.device)
    machine = machine_info()
    machine["deepspeed"] = ds_version(args.device)
    machine["python_executable"] = sys.executable
    summary_extra = {"loadavg_start": loadavg()}
    t0 = time.time()
    main_ranks, rss = [], {}
    with tempfile.TemporaryDirectory(prefix="bench_peers_") as tmp:
        tmp = Path(tmp)
        ttfs = time_to_first_step(args, tmp) if args.ttfs else {}
        if args.ttfs_only:
            keys = []
        run_keys = [k for k in keys if k not in skipped]
        if run_keys:
            print(f"[peers] timing launch: {args.world_size} processes, {','.join(run_keys)}", file=sys.stderr, flush=True)
            main_ranks = launch(args, "main", ",".join(run_keys), tmp)
            if not args.no_rss:
                for k in run_keys:
                    print(f"[peers] peak-RSS launch: {NAMES[k]}", file=sys.stderr, flush=True)
                    try:
                        rss[k] = launch(args, "rss", k, tmp)
                    except RuntimeError as e:
                        rss[k] = str(e)
    if args.ttfs_only:
        args.only = ""
    summary = summarize(args, main_ranks, rss, skipped, machine) if main_ranks or skipped else {
        "machine": machine, "settings": {k: v for k, v in vars(args).items() if not k.startswith("_")},
        "world_size": args.world_size, "device": args.device, "backend": "gloo", "variants": {}}
    summary.update(summary_extra, loadavg_end=loadavg(), time_to_first_step=ttfs, total_wall_s=time.time() - t0)
    summary["command"] = "python scripts/bench_peers.py" + ("" if len(sys.argv) == 1 else " " + " ".join(sys.argv[1:]))
    table = render(summary)
    summary["table"] = table
    print(table)
    path = Path(args.json)
    if args.ttfs_only and path.exists():  # keep an earlier table, add the new start-up figures
        old = json.loads(path.read_text())
        old["time_to_first_step"] = ttfs
        old.setdefault("time_to_first_step_runs", []).append({"machine": machine, "figures": ttfs})
        summary = old
    write_json(path, summary)
    print(f"\nwrote {path} (total {summary.get('total_wall_s', 0):.0f}s)")


if __name__ == "__main__":
    main()
