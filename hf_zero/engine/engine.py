"""ZeroEngine: forward, backward and the sharded optimizer step of one data-parallel rank.

Note:
    * The engine owns the model's parameters after construction: each parameter's ``.data`` is a
      view into a unit's flat buffer (see :mod:`hf_zero.engine.flat`), the user's optimizer
      steps fp32 master shards (see :mod:`hf_zero.engine.optim`), and hooks drive gathering and
      reduction (see :mod:`hf_zero.engine.stages`).
    * Training loop contract, DeepSpeed's: every micro-batch ``loss = engine(**batch).loss;
      engine.backward(loss); engine.step()``. ``backward`` divides the loss by the accumulation
      steps and multiplies it by the loss scale; ``step`` applies the update only at the
      accumulation boundary and zeroes the gradients after it.
    * All ranks take the same decisions at the same time: the overflow flag and the grad norm
      are all-reduced before anyone looks at them, so a skipped step is skipped everywhere. A
      step with inf/NaN gradients is skipped in every precision (``hf_zero.skip_non_finite_steps``,
      see :class:`hf_zero.engine.precision.SkipPolicy`).
    * Memory accounting (:meth:`memory_report`) counts persistent per-rank tensors only: the
      parameter storage a rank keeps between steps, its gradient accumulators, its fp32 master
      copy (zero when the master aliases fp32 parameters) and its optimizer states.
    * Without an optimizer (neither ``optimizer=`` nor an ``optimizer`` section) the engine is
      inference-only: every parameter is frozen (``requires_grad`` False), no fp32 masters or
      gradient buffers exist, forward and :meth:`generate` work at every stage (parameters
      sharded at stage 3), and ``backward`` / ``step`` raise. This is how a frozen reference
      model (TRL's DPO/KTO/GRPO) is sharded next to the trained one.
    * Every parameter knows its place (``_hf_zero_access``, see :mod:`hf_zero.engine.access`);
      at stage 3 its class is ``ShardedParameter``, so using it while sharded raises a clear
      error instead of reading freed memory.
    * torch.compile: a model compiled before :func:`hf_zero.initialize` (``torch.compile(model)``)
      is unwrapped: ``engine.module`` is the model itself (its own parameter names and hooks) and
      the engine's forward calls the compiled wrapper. :meth:`ZeroEngine.compile` compiles in place.
"""

from __future__ import annotations

import logging
import math
import os
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
import torch.nn as nn

from contextlib import nullcontext as _nullcontext

from ..config import ZeroConfig
from .collectives import Collectives, CommTotals
from .deepspeed_api import DeepSpeedEngineMethods
from .hierarchy import Hierarchy, ScaleSettings, check_settings
from .topology import Topology
from .flat import FlatParam, FlatState
from .optim import (
    Piece,
    build_optimizer,
    check_elementwise,
    clip_coefficient,
    global_grad_norm_sq,
    make_pieces,
    param_group_index,
    repoint_optimizer,
)
from .precision import LossScaler, SkipPolicy, local_overflow
from .stages import StageRuntime, Unit
from .teardown import install_exit_teardown
from .units import build_units, find_layer_modules, with_embedding_units

_LOG = logging.getLogger("hf_zero")
_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def split_compiled(model: nn.Module):
    """``(module, compiled)``: for a ``torch.compile(model)`` wrapper (``OptimizedModule``) the
    model inside it and the wrapper, else ``(model, None)``."""
    inner = getattr(model, "_orig_mod", None)
    if isinstance(inner, nn.Module) and isinstance(model, torch._dynamo.eval_frame.OptimizedModule):
        return inner, model
    return model, None



def _refuse_compiled_autograd() -> None:
    """Compiled autograd (``torch._dynamo.compiled_autograd._enable``) traces the whole backward,
    hooks included; hf_zero's gradient hooks reduce-scatter and all-gather from inside it, and
    torch 2.13 fails tracing them (``AttributeError: 'NoneType' object has no attribute 'op'`` in
    ``reorder_tensor_pre_hook_nodes``). Refuse it with the way out instead of that trace."""
    ca = getattr(torch._dynamo, "compiled_autograd", None)
    if ca is not None and getattr(ca, "compiled_autograd_enabled", False):
        raise RuntimeError(
            "hf_zero: engine.backward() under compiled autograd (torch._dynamo.compiled_autograd is enabled) is "
            "not supported: the engine's gradient hooks run collectives that compiled autograd cannot trace in "
            f"torch {torch.__version__}. Run the backward outside the compiled_autograd context; "
            "torch.compile of the model's forward (and its backward graphs) works at every stage"
        )


class ZeroEngine(DeepSpeedEngineMethods):
    """A model wrapped for ZeRO data parallelism. Build it with :func:`hf_zero.initialize`."""

    def __init__(
        self,
        model: nn.Module,
        config: ZeroConfig,
        *,
        comm: Collectives,
        device: torch.device,
        optimizer: Optional[Any] = None,
        model_parameters: Optional[Any] = None,
        lr_scheduler: Optional[Any] = None,
        alignment: int = 16,
    ):
        if config.unresolved_keys():
            raise ValueError(f"config has unresolved 'auto' values: {config.unresolved_keys()}")
        zo = config.zero_optimization
        self.inference_only = optimizer is None and config.optimizer is None
        if zo.offload_param.enabled and not zo.offload_optimizer.enabled and not self.inference_only:
            raise ValueError(
                f"zero_optimization.offload_param.device={zo.offload_param.device!r} needs "
                "zero_optimization.offload_optimizer too (\"cpu\" or \"nvme\"): with the parameters off "
                "the device, the fp32 masters and optimizer states must be as well"
            )
        self.offload_param = zo.offload_param.enabled
        self.offload = zo.offload_optimizer
        self.config = config
        self.comm = comm
        self.device = device
        self.alignment = alignment
        self.stage = config.zero_optimization.stage
        self.rank, self.world_size = comm.rank, comm.world_size
        # nodes, and MiCS / ZeRO++ groups (hierarchy.py): sharded collectives go to shard_comm
        self.topology = Topology.from_launcher(self.world_size, self.rank, config.hf_zero.ranks_per_node)
        comm.set_topology(self.topology)
        scale = ScaleSettings.from_config(zo)
        check_settings(scale, stage=self.stage, world_size=self.world_size, topology=self.topology,
                       offload_param=zo.offload_param.enabled)
        self.hierarchy = Hierarchy(comm, scale, self.topology)
        self.shard_comm = self.hierarchy.shard
        if self.world_size > 1:
            install_exit_teardown()  # no SIGABRT at exit from gloo's worker threads (teardown.py)
        self.gradient_accumulation_steps = int(config.gradient_accumulation_steps)  # (deepspeed_api.py: also callable)
        self.micro_batch_size = int(config.train_micro_batch_size_per_gpu)
        self.gradient_clipping = float(config.gradient_clipping or 0.0)
        self.compute_dtype = config.compute_dtype
        self.micro_steps = 0
        self.global_steps = 0
        self.training_dataloader = None  # set by initialize(training_data=...); checkpoints seek it
        self.skipped_steps = 0
        self._step_applied = False  # the last step() updated the weights (was_step_applied)
        self._boundary_override: Optional[bool] = None  # set_gradient_accumulation_boundary
        self._last_grad_norm: Optional[torch.Tensor] = None
        self._pending_save = None  # an asynchronous checkpoint save in flight (checkpoint/async_save.py)
        self._checkpoint_staging = None  # its snapshot's host memory, kept between saves (checkpoint/staging.py)
        self._last_comm = CommTotals()

        self._diverged_at_start: List[str] = []  # names of params whose values differed from rank 0's
        # torch.compile(model) before initialize: the engine works on the model itself (its own
        # parameter names, hooks on its modules) and calls go through the compiled wrapper
        model, self._compiled = split_compiled(model)
        self.module = self._place(model, device)
        self._sync_buffers()
        if self.inference_only:
            if model_parameters is not None or lr_scheduler is not None or config.scheduler is not None:
                raise ValueError(
                    "model_parameters / a scheduler were given without an optimizer: an engine without "
                    "optimizer is inference-only; pass optimizer= or add an 'optimizer' section to train"
                )
            for p in self.module.parameters():
                p.requires_grad_(False)
            self.optimizer = None
        else:
            self.optimizer = self._make_optimizer(optimizer, model_parameters)
            check_elementwise(self.optimizer, allow_untested=config.zero_allow_untested_optimizer)
        self.units = self._build_units()
        self._guard_parameters()
        self.pieces: List[Piece] = self._build_pieces()
        optimized = param_group_index(self.optimizer) if self.optimizer is not None else None
        self._every_trainable_optimized = optimized is None or all(
            id(p) in optimized for f in self._trainable_flats for p in f.params)
        if self.optimizer is not None:
            repoint_optimizer(self.optimizer, self.pieces)
        self.lr_scheduler = self._make_scheduler(lr_scheduler)
        self.last_generate_path: Optional[str] = None  # "full" or "per_unit" (stage 3 generate)

        fp16 = config.fp16
        self.loss_scaler = LossScaler(
            fp16.initial_scale if fp16.enabled else 1.0,
            dynamic=fp16.enabled and fp16.dynamic,
            window=fp16.loss_scale_window,
            hysteresis=fp16.hysteresis,
            consecutive_hysteresis=fp16.consecutive_hysteresis,
            min_scale=fp16.min_loss_scale,
        )
        hz = config.hf_zero
        self.skip_policy = SkipPolicy(hz.max_consecutive_skipped_steps, self.rank, _LOG) if hz.skip_non_finite_steps else None
        self._fp16_policy = self.skip_policy or SkipPolicy(hz.max_consecutive_skipped_steps, self.rank, _LOG)
        accum = _DTYPES.get(config.grad_accum_dtype) if config.grad_accum_dtype else None
        comm_dtype = _DTYPES.get(config.communication_data_type) if config.communication_data_type else None
        predivide = float(config.gradient_predivide_factor) if config.prescale_gradients else 1.0
        self.runtime = StageRuntime(
            self.units, comm, stage=self.stage, comm_dtype=comm_dtype, accum_dtype=accum, predivide=predivide,
            shard_source=self.param_swap, check_unit_order=hz.check_unit_order, hierarchy=self.hierarchy,
        )
        self.runtime.on_backward_end = self.runtime.finish_backward
        # stages 1-2: the post-step all-gathers run in the background (hf_zero.engine.pending)
        from .pending import PostStepGathers

        self.post_gathers = PostStepGathers(self.shard_comm) if self.stage in (1, 2) else None
        self.runtime.post_gathers = self.post_gathers
        self.runtime.install()
        self.host = None
        self._eager_active = False
        self._eager_submitted: set = set()
        # the eager CPU step runs only in the one backward() of a boundary micro-step: trusted
        # once the previous update's boundary micro-step had exactly one backward()
        self._eager_trusted = False
        self._backwards_in_micro = 0  # backward() calls in the micro-step ``_counted_micro``
        self._counted_micro = -1
        self._staged: Dict[int, torch.Tensor] = {}
        if self._host_flats:  # ratio 0: no flat on the host, the same engine as no offload
            self.host = self._make_host_step()
        self._report_start_divergence()
        self.comm.take_totals()  # the start-up broadcast is not part of any step
        self._preempt = None  # hf_zero.save_on_signal: SIGTERM -> save at the next boundary, exit 0
        if hz.save_on_signal is not None and not self.inference_only:
            from .preempt import PreemptionGuard

            self._preempt = PreemptionGuard(hz.save_on_signal, hz.save_on_signal_tag, self.rank)

    # ------------------------------------------------------------------------------ set-up
    @torch.no_grad()
    def _place(self, model: nn.Module, device: torch.device) -> nn.Module:
        """Move the model to ``device``. Parameters on the meta device (ranks other than 0 that
        never loaded the weights, see hf_zero.loading) become zero-stride placeholders of the
        right shape, keeping their identity; their values arrive from rank 0 in
        :meth:`_initial_values`."""
        meta = [p for p in model.parameters() if p.is_meta]
        if meta and self.rank == 0:
            raise ValueError("rank 0 must hold the real weights; only the other ranks may build the model on 'meta'")
        for p in meta:
            placeholder = nn.Parameter(torch.zeros((), dtype=p.dtype, device=device).expand(p.shape),
                                       requires_grad=p.requires_grad)
            torch.utils.swap_tensors(p, placeholder)
        for module in model.modules():
            for name, b in list(module._buffers.items()):
                if b is not None and b.is_meta:
                    module._buffers[name] = torch.zeros(b.shape, dtype=b.dtype, device=device)
        return model.to(device)

    @torch.no_grad()
    def _sync_buffers(self) -> None:
        """Every rank starts from rank 0's buffers (parameters follow unit by unit)."""
        if self.world_size == 1:
            return
        for b in self.module.buffers():
            self.comm.broadcast(b.data)

    @torch.no_grad()
    def _initial_values(self, params: Sequence[nn.Parameter]) -> Optional[torch.Tensor]:
        """Rank 0's values of ``params``, flattened in fp32 and broadcast (None in a world of
        one: the parameters are read directly). One unit at a time, so a rank that built the
        model on the meta device never holds more than one unit's weights."""
        if self.world_size == 1:
            return None
        numel = sum(p.numel() for p in params)
        buf = torch.empty(numel, dtype=torch.float32, device=self.device)
        if self.rank == 0:
            torch.cat([p.detach().reshape(-1).float() for p in params], out=buf)
        self.comm.broadcast(buf)
        if self.rank != 0 and params and not any(p.is_meta or p.dim() and p.stride() == (0,) * p.dim() for p in params):
            local = torch.cat([p.detach().reshape(-1).float() for p in params])
            if not torch.equal(local, buf):
                self._diverged_at_start.append(self._param_label(params[0]))
        return buf

    def _param_label(self, param: nn.Parameter) -> str:
        for name, p in self.module.named_parameters():
            if p is param:
                return name
        return "?"

    def _report_start_divergence(self) -> None:
        """Ranks that built different weights (say, another seed) start from rank 0's: the
        broadcast above makes that so. Say it on rank 0, once, so it is never silent."""
        if self.world_size == 1:
            return
        flag = torch.tensor([float(len(self._diverged_at_start))], device=self.device)
        self.comm.all_reduce(flag, op="max", control=True)
        if self.rank != 0 and self._diverged_at_start:
            _LOG.warning("hf_zero: rank %d built weights that differ from rank 0's (first: %s); every rank "
                         "starts from rank 0's weights", self.rank, ", ".join(self._diverged_at_start[:3]))
        if self.rank == 0 and flag.item() > 0:
            _LOG.warning("hf_zero: some ranks built weights that differ from rank 0's (different seeds?); every "
                         "rank starts from rank 0's weights (docs/reliability.md)")

    def _make_optimizer(self, optimizer, model_parameters) -> torch.optim.Optimizer:
        if isinstance(optimizer, torch.optim.Optimizer):
            if self.config.optimizer is not None:
                raise ValueError(
                    "both a client optimizer and an 'optimizer' section in the config were given; "
                    "remove one of them"
                )
            return optimizer
        params = model_parameters if model_parameters is not None else [
            p for p in self.module.parameters() if p.requires_grad
        ]
        params = list(params)
        if callable(optimizer):
            return optimizer(params)
        if self.config.optimizer is None:
            raise ValueError(
                "no optimizer: pass optimizer= to initialize() or add an 'optimizer' section to the config"
            )
        return build_optimizer(self.config.optimizer.type, dict(self.config.optimizer.params), params)

    def _flat_plan(self) -> List[tuple]:
        """Per unit spec, its flats to build: ``(spec, [(dtype, [(name, param), ...]), ...])``,
        one flat per (trainability, dtype), trainable parameters laid out by optimizer group."""
        specs = build_units(self.module, with_embedding_units(self.module, find_layer_modules(self.module)))
        group_of = param_group_index(self.optimizer) if self.optimizer is not None else {}
        plan = []
        for spec in specs:
            buckets: Dict[tuple, tuple] = {}
            for name, p in spec.params:
                dtype = self.compute_dtype if p.is_floating_point() else p.dtype
                buckets.setdefault((not p.requires_grad, str(dtype)), (dtype, []))[1].append((name, p))
            flats = []
            for key in sorted(buckets):
                dtype, named = buckets[key]
                if named[0][1].requires_grad:
                    named = sorted(named, key=lambda np_: group_of.get(id(np_[1]), len(group_of)))
                flats.append((dtype, named))
            plan.append((spec, flats))
        return plan

    def _build_units(self) -> List[Unit]:
        plan = self._flat_plan()
        sharded = self.stage == 3
        shard_world = 1 if self.stage == 0 else self.shard_comm.world_size
        shard_rank = 0 if self.stage == 0 else self.shard_comm.rank
        self.param_swap = self._make_param_swap(plan, shard_world) if sharded else None
        self._host_flats = self._plan_host_flats(plan, shard_world)
        # stage 3 on the CPU: gathered buffers reuse resident pages (hf_zero.engine.pool)
        from .pool import GatherPool

        self.gather_pool = GatherPool.for_cpu(keep=2) if sharded and self.device.type == "cpu" else None
        units: List[Unit] = []
        trainable_seen = 0
        for spec, planned in plan:
            flats = []
            for dtype, named in planned:
                on_host = named[0][1].requires_grad and trainable_seen in self._host_flats
                trainable_seen += int(named[0][1].requires_grad)
                flat = FlatParam(
                    [p for _, p in named],
                    [n for n, _ in named],
                    dtype=dtype,
                    device=self.device,
                    shard_rank=shard_rank,
                    shard_world=shard_world,
                    sharded=sharded,
                    alignment=self.alignment,
                    master_dtype=None if self.inference_only else torch.float32,
                    master_device=torch.device("cpu") if on_host else None,
                    source=self._initial_values([p for _, p in named]),
                    pool=self.gather_pool,
                )
                if self.param_swap is not None:
                    self.param_swap.adopt(flat)  # written to its swap region now: one unit in RAM
                elif sharded:
                    flat.detach_shard(torch.device("cpu") if self.offload_param else None)
                if on_host and self.offload.delayed_update and flat.master_is_shard:
                    # fp32 with the master where the shard is (a CPU-only run): the delayed
                    # step's worker would write the live weights during the next forward
                    flat.master = flat.master.clone()
                    flat.master_is_shard = False
                flats.append(flat)
            if flats:
                units.append(Unit(len(units), spec.name, spec.module, spec.is_root, flats))
            elif spec.is_root:
                units.append(Unit(len(units), spec.name, spec.module, True, []))
        return units

    def _plan_host_flats(self, plan, shard_world: int):
        """Indices (into the trainable flats, in build order) whose fp32 master and optimizer
        state live on the host: all of them with ``offload_optimizer`` at ratio 1, the trailing
        ones reaching ``ratio`` of the elements below it (:mod:`hf_zero.offload.partial`)."""
        if not self.offload.enabled or self.inference_only:
            return frozenset()
        from ..offload.partial import host_flat_indices
        from .flat import padded_size

        numels = [padded_size(sum(p.numel() for _, p in named), self.alignment, shard_world) // shard_world
                  for _, planned in plan for _, named in planned if named[0][1].requires_grad]
        return host_flat_indices(numels, self.offload.ratio)

    def _make_param_swap(self, plan, shard_world: int):
        """Stage 3 with ``offload_param.device == "nvme"``: the swap file for every flat's shard,
        sized from the plan before any flat exists (see :mod:`hf_zero.offload.param_swap`)."""
        op = self.config.zero_optimization.offload_param
        if op.device != "nvme":
            return None
        from ..offload.param_swap import ParamSwap
        from .flat import padded_size

        sizes, unit_of = [], []
        for ui, (_, planned) in enumerate(plan):
            for dtype, named in planned:
                numel = sum(p.numel() for _, p in named)
                sizes.append((padded_size(numel, self.alignment, shard_world) // shard_world, dtype))
                unit_of.append(ui)
        aio = self.config.aio
        return ParamSwap(sizes, unit_of, nvme_path=op.nvme_path, rank=self.rank,
                         buffer_count=max(2, op.buffer_count), block_size=aio.block_size,
                         threads=max(1, aio.thread_count), pin=self.device.type == "cuda",
                         checksums=self.config.hf_zero.swap_checksums)

    # -- where a flat's shard lives: its tensor, or (parameter offload to NVMe) a swap region
    def read_shard(self, f: FlatParam) -> torch.Tensor:
        """Flat ``f``'s current shard (its compute dtype; a copy when it lives on NVMe)."""
        if self.param_swap is not None and f in self.param_swap:
            return self.param_swap.read(f)
        return f.shard

    def write_shard(self, f: FlatParam, values: torch.Tensor, donate: bool = False) -> None:
        """Set flat ``f``'s shard to ``values`` (cast to its dtype)."""
        if self.param_swap is not None and f in self.param_swap:
            self.param_swap.write(f, values, donate=donate)
        else:
            f.shard.copy_(values)

    def _guard_parameters(self) -> None:
        """Tell every parameter where it lives; at stage 3, make it a ``ShardedParameter``."""
        from .access import guard

        for u in self.units:
            for f in u.flats:
                for i in range(len(f.params)):
                    guard(self, u, f, i)

    def _build_pieces(self) -> List[Piece]:
        group_of = param_group_index(self.optimizer) if self.optimizer is not None else {}
        pieces: List[Piece] = []
        self._trainable_flats: List[FlatParam] = [f for u in self.units for f in u.trainable]
        for fi, f in enumerate(self._trainable_flats):
            segs = [
                (s.shard_start, s.length, group_of.get(id(f.params[s.param_index])))
                for s in f.segments_in_shard()
            ]
            pieces += make_pieces(fi, f.master, segs)
        return pieces

    def _make_scheduler(self, lr_scheduler):
        if lr_scheduler is not None and self.config.scheduler is not None:
            raise ValueError("both a client lr_scheduler and a 'scheduler' section in the config were given")
        if callable(lr_scheduler) and not hasattr(lr_scheduler, "step"):
            return lr_scheduler(self.optimizer)
        if lr_scheduler is not None:
            return lr_scheduler
        if self.config.scheduler is not None:
            from .schedulers import build_scheduler

            return build_scheduler(self.config.scheduler, self.optimizer)
        return None

    def __getattr__(self, name: str):
        # Called only for names the engine itself lacks: forward them to the
        # wrapped model (engine.generate, engine.gradient_checkpointing_enable,
        # ...) as DeepSpeed's engine does.  The engine's own attributes win
        # (engine.config is the ZeroConfig; the model's is engine.module.config).
        # Read "module" from __dict__ so that a lookup before __init__ has set it
        # (or on an instance being unpickled/copied) fails instead of recursing;
        # dunders are never forwarded, so copy/pickle probes see the engine only.
        module = self.__dict__.get("module")
        if module is None or (name.startswith("__") and name.endswith("__")):
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        try:
            return getattr(module, name)
        except AttributeError:
            raise AttributeError(
                f"{type(self).__name__!r} object has no attribute {name!r}, and neither has the wrapped "
                f"{type(module).__name__}"
            ) from None

    # ------------------------------------------------------------------------------ loop
    def __call__(self, *args, **kwargs):
        return (self.module if self._compiled is None else self._compiled)(*args, **kwargs)

    forward = __call__

    def compile(self, backend: Any = "inductor", compile_kwargs: Optional[Dict[str, Any]] = None, **kwargs) -> None:
        """``torch.compile`` the model in place (``nn.Module.compile``), as DeepSpeed's
        ``engine.compile(backend=..., compile_kwargs=...)``: every later forward, through the
        engine or the model, runs compiled. The engine's hooks run eagerly between the graphs
        (one graph break on each side of a unit; see docs/engine.md, "torch.compile")."""
        self.module.compile(backend=backend, **{**(compile_kwargs or {}), **kwargs})

    @property
    def is_compiled(self) -> bool:
        """Whether forwards run through ``torch.compile`` (``compile()``, or a model compiled
        before :func:`hf_zero.initialize`)."""
        return self._compiled is not None or getattr(self.module, "_compiled_call_impl", None) is not None

    def generate(self, *args, gather: str = "auto", **kwargs):
        """``self.module.generate(...)``. At stage 3, ``gather`` picks how parameters arrive:
        ``"full"`` gathers the whole model once for the call and releases it after (no
        collective per token); ``"per_unit"`` gathers unit by unit at every forward (least
        memory; several ranks then pass ``synced_gpus=True``); ``"auto"`` (default) takes
        ``"full"`` when every rank measures room for it (see
        :func:`hf_zero.engine.gather.full_model_fits`). Collective at stage 3: every rank calls it."""
        from .gather import full_model_fits, whole_model_gathered

        if gather not in ("auto", "full", "per_unit"):
            raise ValueError(f"generate(gather={gather!r}): expected 'auto', 'full' or 'per_unit'")
        if self.stage != 3:
            return self.module.generate(*args, **kwargs)
        full = gather == "full" or (gather == "auto" and full_model_fits(self))
        self.last_generate_path = "full" if full else "per_unit"
        if full:
            with whole_model_gathered(self), torch.no_grad():
                return self.module.generate(*args, **kwargs)
        if self.world_size > 1:
            kwargs.setdefault("synced_gpus", True)
        return self.module.generate(*args, **kwargs)

    def train(self, mode: bool = True) -> "ZeroEngine":
        self.module.train(mode)
        return self

    def eval(self) -> "ZeroEngine":
        return self.train(False)

    def is_gradient_accumulation_boundary(self) -> bool:
        if self._boundary_override is not None:
            return self._boundary_override
        return (self.micro_steps + 1) % self.gradient_accumulation_steps == 0

    @property
    def loss_scale(self) -> float:
        return self.loss_scaler.scale

    def backward(self, loss: torch.Tensor, retain_graph: bool = False, scale_wrt_gas: bool = True) -> torch.Tensor:
        """Backward of ``loss`` (divided by the accumulation steps unless ``scale_wrt_gas`` is
        False), multiplied by the loss scale. Gradients accumulate until the update."""
        self._require_optimizer("backward")
        _refuse_compiled_autograd()
        self.wait_for_parameters()  # (the forward did, unless it bypassed the engine's hooks)
        factor = self.loss_scaler.scale / (self.gradient_accumulation_steps if scale_wrt_gas else 1)
        if self._counted_micro != self.micro_steps:
            self._counted_micro, self._backwards_in_micro = self.micro_steps, 0
        if self._eager_submitted:
            raise RuntimeError(
                "hf_zero: a second backward() before step() at the accumulation boundary, but the first one "
                "already ran the CPU optimizer step of some units (offload_optimizer's eager per-unit step, "
                "trusted because the previous update's boundary had a single backward()), so this backward's "
                "gradients cannot reach them. Call backward() once per micro-batch (sum the losses), or the "
                "same number of times at every micro-step from the first update on"
            )
        self._eager_active = (self._eager_allowed() and self.is_gradient_accumulation_boundary()
                              and self._eager_trusted and self._backwards_in_micro == 0)
        self._backwards_in_micro += 1
        # the eager CPU step needs each reduction completed as it happens; otherwise they stay
        # in flight behind backward (as without offload)
        self.runtime.on_unit_reduced = self._on_unit_reduced if self._eager_active else None
        self.runtime.retain_uses = retain_graph
        # stage 1: at the boundary micro-step each unit is reduce-scattered during backward, as
        # soon as its gradient is complete (another backward() before step() reduces again)
        self.runtime.reduce_in_backward = self.stage == 1 and self.is_gradient_accumulation_boundary()
        try:
            (loss.float() * factor).backward(retain_graph=retain_graph)
            self.runtime.finish_backward()
        finally:
            self._eager_active = False
            self.runtime.on_unit_reduced = None
            self.runtime.retain_uses = False
            self.runtime.reduce_in_backward = False
        stepped = [u.name for u in self.runtime.last_late if self._eager_submitted & set(self._flat_indices(u))]
        if stepped:
            raise RuntimeError(
                f"hf_zero: gradients for unit(s) {', '.join(stepped)} arrived after their eager CPU optimizer "
                "step had started (offload_optimizer): the model uses those parameters outside their unit's "
                "forward. Set \"hf_zero\": {\"skip_non_finite_steps\": true} (the default), which steps after "
                "backward, and please report this model"
            )
        return loss

    def step(self) -> None:
        """Count a micro-step; at the accumulation boundary, update the weights."""
        self._require_optimizer("step")
        if self._pending_save is not None:  # a background checkpoint write that failed raises here
            from ..checkpoint.async_save import raise_if_failed

            raise_if_failed(self)
        boundary = self.is_gradient_accumulation_boundary()
        self.micro_steps += 1
        self._step_applied = False
        if boundary:
            self._optimizer_step()
            self._stop_if_preempted()

    def apply_update(self) -> None:
        """Update the weights now from the gradients accumulated so far, whatever the micro-step
        counter says (for integrations that track accumulation themselves, as Accelerate does)."""
        self._require_optimizer("apply_update")
        if self._pending_save is not None:
            from ..checkpoint.async_save import raise_if_failed

            raise_if_failed(self)
        self._step_applied = False
        self._optimizer_step()
        self._stop_if_preempted()

    def _stop_if_preempted(self) -> None:
        """hf_zero.save_on_signal (hf_zero/engine/preempt.py): the ranks agree, at this step
        boundary, whether any of them got SIGTERM; if so every rank saves and exits 0."""
        if self._preempt is None:
            return
        reduce = None
        if self.world_size > 1:
            def reduce(flag):
                self.comm.all_reduce(flag, op="max", control=True)
        if self._preempt.agreed(reduce, self.device):
            self._preempt.stop(self)

    def _require_optimizer(self, what: str) -> None:
        if self.optimizer is None:
            raise RuntimeError(
                f"engine.{what}(): this engine has no optimizer, so it is inference-only (forward and "
                "generate; its parameters are frozen). To train the model, pass optimizer= to "
                "hf_zero.initialize() or add an 'optimizer' section to the config."
            )

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero the gradient accumulators (the engine also does this after every update)."""
        self.runtime.zero_grads()
        for p in self.module.parameters():
            p.grad = None

    # ------------------------------------------------------------------------------ step
    def _grad_shards(self) -> List[torch.Tensor]:
        """This rank's reduced gradient of each trainable flat, on the device, in the dtype it
        was accumulated in (stage 0: the whole all-reduced buffer)."""
        out = []
        for u in self.units:
            for fi, f in enumerate(u.flats):
                if not f.trainable:
                    continue
                g = u.grad_full.get(fi) if self.stage == 0 else self.runtime.grad_shard(u, fi)
                if g is None:
                    g = torch.zeros(f.shard_numel, dtype=torch.float32, device=f.device)
                out.append(g)
        return out

    def _optimized_grads(self, grads: List[torch.Tensor]) -> List[torch.Tensor]:
        """The entries of ``grads`` that belong to parameters the optimizer steps: the gradient
        norm (clipping, the non-finite check) is taken over these only, as DeepSpeed's is over its
        optimizer's groups. A trainable parameter left out of ``model_parameters`` / the client
        optimizer neither counts nor moves. ``grads`` is ``_grad_shards()``, indexed like
        ``_trainable_flats`` (the pieces' ``flat_index``)."""
        if self._every_trainable_optimized:
            return grads
        return [grads[p.flat_index][p.start:p.end] for p in self.pieces]

    @torch.no_grad()
    def _optimizer_step(self) -> None:
        self.wait_for_parameters()  # (normally done by the forward) the step writes the shards
        if self.stage <= 1:
            self.runtime.reduce_boundary()
        self.runtime.release_all()  # stage 3: no unit may stay gathered across new weights
        grads = self._grad_shards()
        inv_scale = 1.0 / self.loss_scaler.scale
        if self.config.fp16.enabled:
            overflow = local_overflow(grads).to(self.device)
            self.comm.all_reduce(overflow, op="max", control=True)
            if bool(overflow.item()):
                self._skip_step("gradient overflow (inf/NaN) in fp16")
                return
        norm_sq = global_grad_norm_sq(self._optimized_grads(grads)).to(self.device)
        if self.stage >= 1:  # over the shard group: MiCS replicas hold the same shards
            self.shard_comm.all_reduce(norm_sq, op="sum", control=True)
        if self.skip_policy is not None and not bool(torch.isfinite(norm_sq).item()):
            self._skip_step(f"non-finite gradients (global norm {float(norm_sq.sqrt() * inv_scale)})")
            return
        self._fp16_policy.on_finite()
        total_norm = norm_sq.sqrt() * inv_scale
        self._last_grad_norm = total_norm
        coef = torch.tensor(inv_scale, device=self.device)
        if self.gradient_clipping > 0:
            coef = coef * clip_coefficient(total_norm, self.gradient_clipping)
        if self.host is None:
            self._device_update(grads, coef)
        elif self.offload.delayed_update:
            self._delayed_host_update(grads, coef)
        else:
            self._host_update(grads, coef)
        if self.lr_scheduler is not None:
            self.lr_scheduler.step()
        self.loss_scaler.update(False)
        self._step_applied = True
        self._finish_step()

    def _skip_step(self, what: str) -> None:
        """Every rank: drop this step's gradients, change no weight (see SkipPolicy)."""
        policy = self.skip_policy or self._fp16_policy
        self.skipped_steps += 1
        self._last_grad_norm = torch.tensor(float("inf"))
        try:
            policy.on_skip(self.loss_scaler, self.global_steps + 1, what)
        finally:
            self.loss_scaler.update(True)
            self._finish_step()

    def _device_update(self, grads: List[torch.Tensor], coef: torch.Tensor,
                       indices: Optional[Sequence[int]] = None) -> None:
        """Step the fp32 master shards where they are: every flat (no offload; then gather), or
        partial offload's device part, flats ``indices`` only (the caller gathers), through an
        optimizer view so the host step may run on its thread meanwhile."""
        every = indices is None
        indices = range(len(self._trainable_flats)) if every else list(indices)
        master_grads = {i: grads[i] if grads[i].dtype == torch.float32 else grads[i].float() for i in indices}
        if self.gradient_clipping > 0 or self.loss_scaler.scale != 1.0:
            for g in master_grads.values():
                g.mul_(coef)
        pieces = self.pieces if every else [p for p in self.pieces if p.flat_index in master_grads]
        for piece in pieces:
            piece.param.grad = master_grads[piece.flat_index][piece.start : piece.end]
        if every:
            self.optimizer.step()
        else:
            from ..offload.partial import subset_view

            subset_view(self.optimizer, pieces).step()
        for piece in pieces:
            piece.param.grad = None
        for i in indices:
            f = self._trainable_flats[i]
            if not f.master_is_shard:
                self.write_shard(f, f.master)
        if every:
            self._gather_updated()

    def _device_flat_indices(self) -> List[int]:
        """Partial offload: the trainable flats stepped on the device (none at ratio 1)."""
        return [i for i in range(len(self._trainable_flats)) if i not in self._host_flats]

    # -- offload ---------------------------------------------------------------------------
    def _make_host_step(self):
        from ..offload.host_step import HostStep

        from ..offload.cpu_optim import cpu_threads_per_rank

        if self.device.type == "cuda" or self.offload.threads:
            # the CPU is the optimizer's: give this rank its share of the cores (ranks x threads
            # <= cores); on a CPU-only run, only when asked, since compute uses the same cores
            local = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
            torch.set_num_threads(cpu_threads_per_rank(local, self.offload.threads))
        aio = self.config.aio
        pin = self.device.type == "cuda" and self.offload.pin_memory
        return HostStep(self, self.offload.device, nvme_path=self.offload.nvme_path,
                        buffer_count=self.offload.buffer_count, aio_block_size=aio.block_size,
                        aio_threads=max(1, aio.thread_count), pin=pin, host_indices=self._host_flats)

    def _eager_allowed(self) -> bool:
        """Whether a unit's CPU step may start as soon as its gradient is reduced: only when no
        global decision (clipping, fp16 overflow) has to wait for all gradients, and stages 2-3
        (which reduce during backward)."""
        return (self.host is not None and not self.offload.delayed_update and self.stage >= 2
                and self.gradient_clipping == 0 and not self.config.fp16.enabled and self.skip_policy is None)

    def _flat_indices(self, unit) -> List[int]:
        index = {id(f): i for i, f in enumerate(self._trainable_flats)}
        return [index[id(f)] for f in unit.trainable]

    def _on_unit_reduced(self, unit) -> None:
        if not self._eager_active or not unit.trainable or not unit.complete:
            return  # a unit reduced before all its gradients were seen is stepped after backward
        idx = [i for i in self._flat_indices(unit) if i in self._host_flats]
        if not idx:
            return  # partial offload: this unit is stepped on the device, after backward
        grads = self._grad_shards()
        self.host.grads_down(idx, grads, torch.tensor(1.0 / self.loss_scaler.scale))
        self.host.submit(idx, self._stage_publish)
        self._eager_submitted.update(idx)

    def _stage_publish(self, i: int) -> None:
        """Worker side: flat i's new weights in the compute dtype. Exact update: copied up to
        the device shard at once, off the compute stream (nothing reads the shard before the
        main thread's fence and gather). Delayed update, or a shard in a parameter swap file:
        kept until the main thread publishes them (the next forward must not see them change)."""
        f = self._trainable_flats[i]
        if f.master_is_shard:
            return  # fp32 with master and shard in one place: the step updated the shard itself
        swapped = self.param_swap is not None and f in self.param_swap
        staged = self.host.stage(i, f.master, f.dtype, reuse=not swapped)
        if self.offload.delayed_update or swapped:
            self._staged[i] = staged
        else:
            self.host.publish(i, f.shard, staged)

    def _host_update(self, grads: List[torch.Tensor], coef: torch.Tensor) -> None:
        """Exact offloaded step: units already submitted during backward (eager) finish on the
        worker; the rest of the host's flats are submitted now; with partial offload the
        device's flats are stepped here meanwhile. Then every updated shard is gathered."""
        done = set(self._eager_submitted)
        rest = [i for i in sorted(self._host_flats) if i not in done]
        if rest:
            self.host.grads_down(rest, grads, coef)
            self.host.submit(rest, self._stage_publish)
        on_device = self._device_flat_indices()
        if on_device:
            self._device_update(grads, coef, on_device)
        self.host.wait()
        self._apply_staged(gather=False)
        self.host.fence_published()
        self._gather_updated()

    def _delayed_host_update(self, grads: List[torch.Tensor], coef: torch.Tensor) -> None:
        """One-step delayed update of the host's flats: publish the previous step's result, then
        start this one on the worker; the next forward runs on their weights one update old.
        With partial offload the device's flats are updated at once (exact), meanwhile."""
        self.host.wait()
        self._apply_staged(gather=False)
        host = sorted(self._host_flats)
        self.host.grads_down(host, grads, coef)
        self.host.submit(host, self._stage_publish)
        on_device = self._device_flat_indices()
        if on_device:
            self._device_update(grads, coef, on_device)
        self._gather_updated()

    def _apply_staged(self, gather: bool = True) -> None:
        """Main thread: publish the weights the worker staged (delayed update, swapped shards)."""
        if not self._staged:
            return
        for i, w in sorted(self._staged.items()):
            f = self._trainable_flats[i]
            if self.param_swap is not None and f in self.param_swap:
                self.write_shard(f, w, donate=True)
            else:
                self.host.publish(i, f.shard, w)
        self._staged.clear()
        self.host.fence_published()
        if gather:
            self._gather_updated()

    def flush_pending_update(self) -> None:
        """With the delayed update: finish and publish the update still running, so the
        weights, masters and optimizer states agree (checkpoints and exports call this)."""
        self.wait_for_parameters()
        if self.host is not None:
            self.host.wait()
            self._apply_staged()
            self.wait_for_parameters()

    def resident(self, flat, write_back: bool = False):
        """Context: ``flat.master`` and its optimizer states in RAM (a no-op unless NVMe)."""
        if self.host is None:
            from contextlib import nullcontext

            return nullcontext()
        return self.host.resident(flat, write_back=write_back)

    def _gather_updated(self) -> None:
        """Stages 1-2: every rank's updated shards into the full parameters, issued together
        (the root first, then the layers in module order) and waited for lazily, unit by unit,
        when first needed (:mod:`hf_zero.engine.pending`); a compiled model waits at once."""
        if self.post_gathers is not None:
            order = [self.runtime.root] + [u for u in self.units if not u.is_root]
            self.post_gathers.start(order, lazy=not self.is_compiled)

    def wait_for_parameters(self) -> None:
        """Stages 1-2: complete the post-step all-gathers still in flight (every read through a
        parameter waits by itself; this is for code that reads the flat buffers directly)."""
        if self.post_gathers is not None:
            self.post_gathers.wait_all()

    def _finish_step(self) -> None:
        if self.host is not None:
            self.host.fence_grads()  # the gradient copies to the host read the buffers zeroed now
        self.zero_grad()
        self._eager_submitted.clear()
        self._eager_trusted = self._backwards_in_micro == 1
        self.runtime.new_step()
        self.global_steps += 1
        self._last_comm = self.comm.take_totals()
        self.runtime.read_ahead_for_forward()  # parameter offload to NVMe: the next forward's first shards

    # ------------------------------------------------------------------------------ reports
    def get_global_grad_norm(self) -> Optional[float]:
        """The gradient norm of the last optimizer step, before clipping (inf if skipped)."""
        return None if self._last_grad_norm is None else float(self._last_grad_norm)

    def memory_report(self) -> Dict[str, Any]:
        """This rank's persistent bytes of model states, and bytes sent in the last step."""
        param_bytes = sum(f.persistent_param_bytes for u in self.units for f in u.flats)
        grad_bytes = sum(
            t.numel() * t.element_size()
            for u in self.units
            for t in list(u.grad_full.values()) + list(u.grad_shard.values())
            if t is not None
        )
        self.flush_pending_update()
        master_bytes = sum(f.shard_numel * 4 for f in self._trainable_flats if not f.master_is_shard)
        state_bytes = 0
        for state in (self.optimizer.state.values() if self.optimizer is not None else ()):
            for v in state.values():
                if torch.is_tensor(v):
                    state_bytes += v.numel() * v.element_size()
        # what stays on the device: the masters and states of flats not offloaded (all of them
        # without offload, none at ratio 1, the leading flats with partial offload)
        on_device = set(self._device_flat_indices())
        device_master = sum(f.shard_numel * 4 for i, f in enumerate(self._trainable_flats)
                            if i in on_device and not f.master_is_shard)
        device_state = sum(v.numel() * v.element_size() for p in self.pieces if p.flat_index in on_device
                           for v in (self.optimizer.state.get(p.param, {}).values() if self.optimizer is not None else ())
                           if torch.is_tensor(v))
        opt_numel = sum(f.shard_numel for f in self._trainable_flats)
        host = self.host.host_bytes() if self.host is not None else {}
        if self.param_swap is not None:  # parameter shards live in their swap file between uses
            host = {**host, "param_nvme_bytes": self.param_swap.nvme_bytes,
                    "param_host_buffer_bytes": self.param_swap.host_bytes()}
        if "nvme_bytes" in host:  # states live in the swap files between steps
            state_bytes = host["nvme_bytes"] - master_bytes
        return {
            "rank": self.rank,
            "world_size": self.world_size,
            "stage": self.stage,
            "num_parameters": sum(f.numel for u in self.units for f in u.flats),
            "param_bytes": param_bytes,
            "grad_bytes": grad_bytes,
            "master_bytes": master_bytes,
            "optimizer_state_bytes": state_bytes,
            "optimizer_bytes": master_bytes + state_bytes,  # fp32 master + states: ZeRO's "K" bytes
            "model_state_bytes": param_bytes + grad_bytes + master_bytes + state_bytes,
            "offload_optimizer": self.offload.device,
            "offload_param": self.config.zero_optimization.offload_param.device,
            "device_model_state_bytes": (0 if self.offload_param else param_bytes) + grad_bytes
            + device_master + device_state,
            "optimizer_host_fraction": (sum(self._trainable_flats[i].shard_numel for i in self._host_flats)
                                        / opt_numel) if opt_numel else 0.0,
            **host,
            "comm_bytes_last_step": self._last_comm.as_dict(),
            # stage 3: parameters all-gathered again in backward per micro-step, by the last
            # forward's order (StageRuntime.regathered_in_backward); None at stages 0-2
            "backward_gathered_numel": (sum(f.numel for u in self.runtime.regathered_in_backward() for f in u.flats)
                                        if self.stage == 3 else None),
        }

    @torch.no_grad()
    def gather_fp32(self, f: FlatParam) -> torch.Tensor:
        """Collective: the whole padded buffer of flat ``f`` in fp32 on every rank, from the fp32
        masters where ``f`` is trained (wherever they are offloaded), else from the parameters."""
        self.wait_for_parameters()
        with self.resident(f) if f.trainable else _nullcontext():
            shard = (f.master if f.trainable else self.read_shard(f)).to(f.device, torch.float32)
            if f.shard_world == 1:
                return shard
            full = torch.empty(f.padded_numel, dtype=torch.float32, device=f.device)
            self.shard_comm.all_gather(full, shard)
            return full

    @torch.no_grad()
    def full_state_dict(self) -> Dict[str, torch.Tensor]:
        """Collective: the full fp32 weights (and buffers) keyed as ``module.state_dict()``, on
        every rank, as CPU tensors. Every rank must call it."""
        self.flush_pending_update()
        by_param: Dict[int, torch.Tensor] = {}
        for u in self.units:
            for f in u.flats:
                full = self.gather_fp32(f)
                for i, p in enumerate(f.params):
                    by_param[id(p)] = f.param_view(full, i).detach().cpu().clone()
        out: Dict[str, torch.Tensor] = {}
        for key, t in self.module.state_dict(keep_vars=True).items():
            out[key] = by_param[id(t)] if id(t) in by_param else t.detach().cpu().clone()
        self.comm.take_totals()
        return out

    # ------------------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, save_dir, tag=None, client_state=None, save_latest: bool = True,
                        async_save: Optional[bool] = None):
        """Collective: atomic sharded checkpoint ``<save_dir>/<tag>`` (see hf_zero.checkpoint).
        ``async_save`` (default: the config's ``hf_zero.async_save``): return once the shards are
        in host memory; a background thread writes and publishes them."""
        from ..checkpoint.sharded import save_checkpoint

        if async_save is None:
            async_save = self.config.hf_zero.async_save
        return save_checkpoint(self, save_dir, tag=tag, client_state=client_state, save_latest=save_latest,
                               async_save=bool(async_save))

    def wait_for_checkpoint(self) -> None:
        """Collective: wait until a pending asynchronous save is published (raises its failure)."""
        from ..checkpoint.async_save import finish_pending

        finish_pending(self)

    def load_checkpoint(self, load_dir, tag=None, load_optimizer_states: bool = True,
                        load_lr_scheduler_states: bool = True, load_module_only: bool = False):
        """Collective: resume from a checkpoint of any world size and stage; returns
        ``(checkpoint_dir, client_state)``. ``load_module_only``: the weights alone."""
        from ..checkpoint.sharded import load_checkpoint

        self.runtime.release_all()  # stage 3: nothing stays gathered across the loaded weights
        self.wait_for_parameters()  # stages 1-2: no post-step gather writes over the loaded ones
        return load_checkpoint(self, load_dir, tag=tag, load_optimizer_states=load_optimizer_states,
                               load_lr_scheduler_states=load_lr_scheduler_states,
                               load_module_only=load_module_only)

    def save_pretrained(self, out_dir, dtype=None, max_shard_size="5GB"):
        """Collective: Hugging Face safetensors of the current weights, written by rank 0."""
        from ..checkpoint.consolidate import save_pretrained

        return save_pretrained(self, out_dir, dtype=dtype, max_shard_size=max_shard_size)

    def destroy(self) -> None:
        """Remove the engine's hooks and release offload resources (swap files); the parameters
        stay views of the flat buffers. A pending asynchronous save is waited for (and its failure raised) last."""
        if self._preempt is not None:
            self._preempt.close()
            self._preempt = None
        self.wait_for_parameters()  # the parameters are plain nn.Parameter afterwards
        self.runtime.remove()
        if self.host is not None:
            self.flush_pending_update()
            self.host.close()
        if self.param_swap is not None:
            self.param_swap.close()
        self._checkpoint_staging = None  # a pending write holds its own references to the snapshot
        if self._pending_save is not None:  # the snapshot does not need the engine: wait last
            from ..checkpoint.async_save import wait_pending

            wait_pending(self)
