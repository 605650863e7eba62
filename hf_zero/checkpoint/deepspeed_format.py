"""Read DeepSpeed ZeRO checkpoints (stages 1-3) as if they were hf_zero checkpoints.

A DeepSpeed checkpoint is ``<dir>/latest`` (the tag) and ``<dir>/<tag>/``, holding
``mp_rank_00_model_states.pt`` (stages 1-2) or ``zero_pp_rank_<r>_mp_rank_00_model_states.pt``
(stage 3, one per rank) and one ``[bf16_|fp16_]zero_pp_rank_<r>_mp_rank_00_optim_states.pt`` per
rank. This module maps them onto the view :func:`hf_zero.checkpoint.sharded.load_checkpoint` and
:func:`hf_zero.checkpoint.consolidate.consolidate` read: an index (parameters, optimizer groups
and scalar states, LR scheduler, loss scaler, step counters) and a reader of element ranges.

Note:
    * ``.pt`` files are opened with ``torch.load(weights_only=True, mmap=True)`` and an allowlist
      of four DeepSpeed names, each mapped to a stand-in defined here that only holds data (see
      ``ALLOWLIST`` and docs/checkpoints.md). Any other type is refused with the file named;
      nothing is ever plainly unpickled. ``mmap`` keeps host memory to what is actually read.
    * Stages 1-2 (DeepSpeed's layout): per optimizer group, the parameters of ``param_shapes[g]``
      are laid end to end in one flat fp32 vector, cut into equal partitions of ``P_g`` elements,
      rank r holding ``[r*P_g, (r+1)*P_g)`` as ``single_partition_of_fp32_groups[g]`` (padding
      removed) and the group's Adam moments as ``base_optimizer_state`` (padding kept).
    * Stage 3: every parameter of ``n`` elements is split on its own into ``ceil(n/W)`` elements
      per rank; rank r's ``fp32_flat_groups`` (concatenated) hold its piece of each parameter in
      ``param_shapes`` order, and the base optimizer's state ``k`` belongs to flat group ``k``.
    * Step counts, group options (lr, betas, eps, weight_decay), the LR scheduler (DeepSpeed's
      ``WarmupLR``-family ``last_batch_iteration`` n-1 is hf_zero's ``last_epoch`` n; a torch
      scheduler's state passes through) and the loss scaler are translated; a state this module
      cannot translate is an error naming the file and the key, never silently dropped.
"""

from __future__ import annotations

import math
import pickle
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch

from .detect import Detected, deepspeed_layout, detect
from .format import CheckpointError, FlatEntry, ParamEntry

# ------------------------------------------------------------------------------ the allowlist
class DSLossScaler:
    """Stand-in for ``deepspeed.runtime.fp16.loss_scaler.LossScaler`` (static scale): its
    attributes (``cur_scale``, ``dynamic``) are set from the file, no DeepSpeed code runs."""


class DSDynamicLossScaler:
    """Stand-in for ``deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler`` (fp16): attributes
    ``cur_scale``, ``cur_iter``, ``last_overflow_iter``, ``scale_window``, ``cur_hysteresis``, ..."""


class DSFragmentAddress:
    """Stand-in for ``deepspeed.utils.tensor_fragment.fragment_address`` (``numel``, ``start``;
    in ``param_slice_mappings``, which this reader does not need)."""


def _zero_stage(value) -> int:
    """Stand-in for ``deepspeed.runtime.zero.config.ZeroStageEnum(value)``: the plain int."""
    return int(value)


ALLOWLIST = [
    (DSLossScaler, "deepspeed.runtime.fp16.loss_scaler.LossScaler"),
    (DSDynamicLossScaler, "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler"),
    (DSFragmentAddress, "deepspeed.utils.tensor_fragment.fragment_address"),
    (_zero_stage, "deepspeed.runtime.zero.config.ZeroStageEnum"),
]


class _PageRelease:
    """Gives back the pages of a memory-mapped file once they are read, so a pass over the
    whole checkpoint keeps host memory (RSS) at what is being copied, not at what was touched.

    Only ranges inside a mapping of one of the loaded files (checked in ``/proc/self/maps``) are
    released, with ``madvise(MADV_DONTNEED)``: for a file mapping this drops clean pages, which
    a later access reads from the file again (the tensors are never written). Anonymous memory
    is never touched; on a system without ``/proc`` or ``madvise`` nothing is released."""

    MADV_DONTNEED = 4

    def __init__(self):
        self.ranges: List[Tuple[int, int]] = []
        self._madvise = None
        try:
            import ctypes
            import ctypes.util
            import mmap as _mmap

            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
            self._madvise = libc.madvise
            self._madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
            self.page = _mmap.PAGESIZE
        except (OSError, AttributeError, ImportError):  # pragma: no cover - not Linux
            self._madvise = None

    def add_file(self, path: Path) -> None:
        if self._madvise is None:
            return
        target = str(Path(path).resolve())
        try:
            with open("/proc/self/maps") as f:
                for line in f:
                    parts = line.split(None, 5)
                    if len(parts) == 6 and parts[5].strip() == target:
                        lo, hi = (int(x, 16) for x in parts[0].split("-"))
                        self.ranges.append((lo, hi))
        except OSError:  # pragma: no cover
            pass

    def release(self, t: torch.Tensor) -> None:
        if self._madvise is None or not self.ranges or t.numel() == 0 or t.device.type != "cpu":
            return
        start = t.data_ptr()
        end = start + t.numel() * t.element_size()
        lo = -(-start // self.page) * self.page
        hi = end // self.page * self.page
        if hi <= lo:
            return
        if any(a <= lo and hi <= b for a, b in self.ranges):
            self._madvise(lo, hi - lo, self.MADV_DONTNEED)


def load_pt(path: Path, mmap: bool = True, pages: Optional[_PageRelease] = None):
    """``torch.load`` restricted to tensors, containers and ``ALLOWLIST``; a refusal names the
    file and the type. With ``pages``, the file's mapping is registered for page release."""
    try:
        with torch.serialization.safe_globals(ALLOWLIST):
            out = torch.load(str(path), map_location="cpu", weights_only=True, mmap=mmap)
        if pages is not None and mmap:
            pages.add_file(path)
        return out
    except pickle.UnpicklingError as exc:
        detail = str(exc)
        m = re.search(r"Unsupported global: GLOBAL ([\w.]+)", detail)
        what = f"type {m.group(1)}" if m else detail.splitlines()[0][:300]
        raise CheckpointError(
            f"{path}: refused: it needs {what}, which is not in hf_zero's allowlist for DeepSpeed files "
            "(docs/checkpoints.md, 'Coming from DeepSpeed'); hf_zero never unpickles arbitrary objects"
        ) from None
    except (RuntimeError, OSError, EOFError) as exc:
        raise CheckpointError(f"{path}: cannot be read as a torch checkpoint ({type(exc).__name__}: {exc})") from None


# ------------------------------------------------------------------------------ the checkpoint
@dataclass(frozen=True)
class _Place:
    """Where one parameter's elements live: stages 1-2, ``(group, offset in the group flat)``;
    stage 3, ``(-1, offset in every rank's flat)`` with ``part`` elements per rank."""

    group: int
    offset: int
    numel: int
    part: int


def _numel(shape) -> int:
    return int(math.prod(tuple(shape)))


class DeepSpeedCheckpoint:
    """One DeepSpeed tag directory, opened lazily (tensors are memory-mapped)."""

    def __init__(self, found: Detected):
        self.directory = found.directory
        self.world_size = int(found.world_size)
        d = self.directory
        stage3 = found.stage == 3
        model_file = d / ("zero_pp_rank_0_mp_rank_00_model_states.pt" if stage3 else "mp_rank_00_model_states.pt")
        self.pages = _PageRelease()
        self.model_states = load_pt(model_file)
        self.model_file = model_file
        self.optim_files = [self._optim_file(r) for r in range(self.world_size)]
        self._optim: Dict[int, dict] = {}
        osd0 = self.optimizer_state(0)
        if "zero_stage" not in osd0:
            raise CheckpointError(f"{self.optim_files[0]}: no 'zero_stage' in optimizer_state_dict; not a ZeRO checkpoint")
        self.stage = int(osd0["zero_stage"])
        pc = osd0.get("partition_count", self.world_size)
        pc = max(pc) if isinstance(pc, (list, tuple)) else int(pc)
        if pc != self.world_size:
            raise CheckpointError(f"{self.optim_files[0]}: saved by {pc} ranks, but {d} holds {self.world_size} "
                                  "*_optim_states.pt files (a rank's file is missing or left from another run)")
        ms = self.model_states
        for key in ("param_shapes", "buffer_names", "module"):
            if key not in ms:
                raise CheckpointError(f"{model_file}: no {key!r}; not a DeepSpeed model-states file")
        self.group_shapes: List[Dict[str, Tuple[int, ...]]] = [
            {n: tuple(int(x) for x in s) for n, s in g.items()} for g in ms["param_shapes"]]
        frozen = ms.get("frozen_param_shapes") or {}
        if frozen:
            raise CheckpointError(f"{model_file}: frozen parameters ({list(frozen)[:3]}...) are not read yet; "
                                  "export them with DeepSpeed's zero_to_fp32")
        self.places: Dict[str, _Place] = {}
        if self.stage <= 2:
            self._sizes = []
            for g, shapes in enumerate(self.group_shapes):
                off = 0
                for name, shape in shapes.items():
                    n = _numel(shape)
                    self.places[name] = _Place(g, off, n, 0)
                    off += n
                self._sizes.append(self._partition_size(g, off))
        else:
            off = 0
            for shapes in self.group_shapes:
                for name, shape in shapes.items():
                    n = _numel(shape)
                    part = -(-n // self.world_size)
                    self.places[name] = _Place(-1, off, n, part)
                    off += part
            self._stage3_flat_numel = off
        self.shapes = {n: s for g in self.group_shapes for n, s in g.items()}

    # ---------------------------------------------------------------------------------- files
    def _optim_file(self, rank: int) -> Path:
        for prefix in ("", "bf16_", "fp16_"):
            p = self.directory / f"{prefix}zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"
            if p.is_file():
                return p
        raise CheckpointError(f"{self.directory}: no zero_pp_rank_{rank}_mp_rank_00_optim_states.pt "
                              f"(the checkpoint has {self.world_size} ranks; was a rank's file lost?)")

    def optimizer_state(self, rank: int) -> dict:
        if rank not in self._optim:
            sd = load_pt(self.optim_files[rank], pages=self.pages)
            if not isinstance(sd, dict) or "optimizer_state_dict" not in sd:
                raise CheckpointError(f"{self.optim_files[rank]}: no 'optimizer_state_dict'; not a DeepSpeed optimizer file")
            self._optim[rank] = sd["optimizer_state_dict"]
        return self._optim[rank]

    def _base_state(self, rank: int) -> dict:
        """The base (torch) optimizer's ``state`` of ``rank``: index -> {exp_avg, ..., step}."""
        osd = self.optimizer_state(rank)
        if self.stage <= 2:
            base = osd["base_optimizer_state"]
            if isinstance(base, list):  # elastic checkpoint: per group, padding removed
                return dict(enumerate(base))
            return base["state"]
        return osd["optimizer_state_dict"]["state"]

    def base_param_groups(self) -> List[dict]:
        osd = self.optimizer_state(0)
        base = osd["base_optimizer_state"] if self.stage <= 2 else osd["optimizer_state_dict"]
        if isinstance(base, dict) and "param_groups" in base:
            return base["param_groups"]
        return []

    def _partition_size(self, group: int, numel: int) -> int:
        """P_g: the padded partition of a stage 1-2 group (every rank's is the same size)."""
        osd = self.optimizer_state(0)
        parts = osd["single_partition_of_fp32_groups"]
        pads = osd.get("group_paddings") or [0] * len(parts)
        size = parts[group].numel() + int(pads[group])
        if size * self.world_size < numel:
            raise CheckpointError(f"{self.optim_files[0]}: group {group} partition of {size} elements x "
                                  f"{self.world_size} ranks cannot hold its {numel} parameters' elements")
        return size

    # ---------------------------------------------------------------------------------- reading
    def _rank_tensor(self, rank: int, kind: str, group: int) -> torch.Tensor:
        """Rank ``rank``'s flat of ``kind`` ("master" or a state key) for ``group`` (stages 1-2)
        or its whole flat (stage 3, ``group`` -1: the flat groups concatenated, lazily)."""
        if self.stage <= 2:
            if kind == "master":
                return self.optimizer_state(rank)["single_partition_of_fp32_groups"][group]
            state = self._base_state(rank)[group]
            if kind not in state:
                raise CheckpointError(f"{self.optim_files[rank]}: group {group} has no optimizer state {kind!r}")
            return state[kind]
        raise AssertionError("stage 3 reads through _stage3_read")

    def _stage3_pieces(self, rank: int, kind: str) -> List[torch.Tensor]:
        if kind == "master":
            return list(self.optimizer_state(rank)["fp32_flat_groups"])
        state = self._base_state(rank)
        out = []
        for k in range(len(self.optimizer_state(rank)["fp32_flat_groups"])):
            if kind not in state.get(k, {}):
                raise CheckpointError(f"{self.optim_files[rank]}: flat group {k} has no optimizer state {kind!r}")
            out.append(state[k][kind])
        return out

    def _stage3_read(self, rank: int, kind: str, start: int, length: int, out: torch.Tensor) -> None:
        """Elements ``[start, start+length)`` of rank ``rank``'s concatenated stage-3 flat."""
        base = 0
        done = 0
        for t in self._stage3_pieces(rank, kind):
            n = t.numel()
            lo, hi = max(start + done, base), min(start + length, base + n)
            if lo < hi:
                src = t.reshape(-1)[lo - base:hi - base]
                out[done:done + hi - lo].copy_(src)
                self.pages.release(src)
                done += hi - lo
            base += n
            if done == length:
                return
        raise CheckpointError(f"{self.optim_files[rank]}: its flat groups hold {base} elements, fewer than the "
                              f"{start + length} the parameter shapes need (truncated or another model?)")

    def read(self, name: str, kind: str, start: int, length: int, out: torch.Tensor) -> None:
        """Copy elements ``[start, start+length)`` of parameter ``name``'s ``kind`` (fp32 master,
        or an optimizer state such as ``exp_avg``) into ``out``."""
        p = self.places[name]
        done = 0
        while done < length:
            e = start + done
            if self.stage <= 2:
                size = self._sizes[p.group]
                flat_e = p.offset + e
                rank, local = divmod(flat_e, size)
                n = min(length - done, size - local)
                src = self._rank_tensor(rank, kind, p.group)
                if local + n > src.numel():
                    raise CheckpointError(f"{self.optim_files[rank]}: group {p.group} {kind} has {src.numel()} "
                                          f"elements, {local + n} needed")
                out[done:done + n].copy_(src[local:local + n])
                self.pages.release(src[local:local + n])
            else:
                rank, local = divmod(e, p.part)
                n = min(length - done, p.part - local)
                self._stage3_read(rank, kind, p.offset + local, n, out[done:done + n])
            done += n

    def state_keys(self) -> List[str]:
        """The element-wise optimizer states (e.g. ``exp_avg``, ``exp_avg_sq``)."""
        state = self._base_state(0)
        first = state[min(state)] if state else {}
        return sorted(k for k, v in first.items() if torch.is_tensor(v) and v.dim() > 0)

    def steps(self) -> List[Optional[float]]:
        """Adam's step count per original param group (from rank 0's base optimizer)."""
        state = self._base_state(0)
        groups = self.base_param_groups()
        out: List[Optional[float]] = []
        for g in range(len(self.group_shapes) if self.stage <= 2 else max(1, len(groups))):
            if self.stage <= 2:
                key = groups[g]["params"][0] if groups else g
            else:
                key = groups[g]["params"][0] if groups else 0
            st = state.get(key, {})
            step = st.get("step")
            if step is None and self.stage <= 2:
                step = self.optimizer_state(0).get("base_optimizer_state_step")
            out.append(float(step) if step is not None else None)
        return out

    def buffers(self) -> Dict[str, torch.Tensor]:
        names = set(self.model_states["buffer_names"])
        return {k: v for k, v in self.model_states["module"].items() if k in names}

    def loss_scaler(self) -> dict:
        """hf_zero's loss-scaler state from DeepSpeed's."""
        ls = self.optimizer_state(0).get("loss_scaler")
        if ls is None:
            return {"scale": 1.0, "hysteresis_left": 2, "iteration": 0, "last_overflow_iteration": -1}
        a = vars(ls)
        return {"scale": float(a.get("cur_scale", 1.0)),
                "hysteresis_left": int(a.get("cur_hysteresis", a.get("delayed_shift", 1)) or 1),
                "iteration": int(a.get("cur_iter", 0)),
                "last_overflow_iteration": int(a.get("last_overflow_iter", -1) if a.get("last_overflow_iter") is not None else -1)}

    def config(self) -> dict:
        return dict(self.model_states.get("ds_config") or {})

    def compute_dtype(self) -> str:
        cfg = self.config()
        if (cfg.get("bf16") or {}).get("enabled"):
            return "bfloat16"
        if (cfg.get("fp16") or {}).get("enabled"):
            return "float16"
        return "float32"

    def describe(self) -> str:
        return f"a DeepSpeed stage-{self.stage} checkpoint of world size {self.world_size}"

    # ------------------------------------------------------------------------ hf_zero's view
    def params(self) -> Dict[str, ParamEntry]:
        out = {}
        dtype = self.compute_dtype()
        shared = {}
        for alias, source in (self.model_states.get("shared_params") or {}).items():
            shared.setdefault(source, []).append(alias)
        for name, shape in self.shapes.items():
            out[name] = ParamEntry(name=name, flat=name, offset=0, numel=_numel(shape), shape=tuple(shape),
                                   dtype=dtype, trainable=True, aliases=(name, *shared.get(name, [])),
                                   export_name=name)
        return out

    def flats(self) -> Dict[str, FlatEntry]:
        return {n: FlatEntry(key=n, padded_numel=_numel(s), shard_numel=_numel(s), shard_world=1,
                             dtype="float32", trainable=True) for n, s in self.shapes.items()}


def open_deepspeed(load_dir, tag: Optional[str] = None) -> Optional[DeepSpeedCheckpoint]:
    """The DeepSpeed checkpoint at ``load_dir`` (its ``latest`` tag, or ``tag``), or None when
    ``load_dir`` is not one."""
    load_dir = Path(load_dir)
    if tag is not None:
        found = deepspeed_layout(load_dir / tag)
        if found is None:
            return None
        return DeepSpeedCheckpoint(Detected("deepspeed", load_dir / tag, world_size=found[0], stage=found[1]))
    found = detect(load_dir)
    if found.kind != "deepspeed":
        return None
    return DeepSpeedCheckpoint(found)


# ------------------------------------------------------------------------------ hf_zero's loader
_DS_KEYS = {"module", "buffer_names", "optimizer", "param_shapes", "frozen_param_shapes", "shared_params",
            "frozen_param_fragments", "lr_scheduler", "data_sampler", "random_ltd", "sparse_tensor_module_names",
            "skipped_steps", "global_steps", "global_samples", "dp_world_size", "mp_world_size", "ds_config",
            "ds_version", "checkpoint_parallel_dimensions", "universal_checkpoint_info", "moe_state_dict"}
_GROUP_OPTIONS = ("lr", "initial_lr", "betas", "eps", "weight_decay", "momentum", "amsgrad")


class DeepSpeedIndex:
    """What :func:`hf_zero.checkpoint.sharded.load_checkpoint` reads from an hf_zero ``Index``,
    built from a DeepSpeed checkpoint for one engine (the scheduler state is shaped for the
    engine's scheduler). Every parameter is its own one-shard flat."""

    def __init__(self, ck: DeepSpeedCheckpoint, engine=None):
        self.checkpoint = ck
        self.directory = ck.directory
        self.where = ck.model_file
        self.world_size = ck.world_size
        self.stage = ck.stage
        self.files: Dict[str, dict] = {}
        self.params = ck.params()
        self.flats = ck.flats()
        ms = ck.model_states
        gas = int(ck.config().get("gradient_accumulation_steps", 1) or 1)
        groups = ck.base_param_groups()
        steps = ck.steps()
        self.data = {
            "stage": ck.stage,
            "world_size": ck.world_size,
            "global_steps": int(ms.get("global_steps", 0)),
            "micro_steps": int(ms.get("global_steps", 0)) * gas,
            "gradient_accumulation_steps": gas,
            "skipped_steps": int(ms.get("skipped_steps", 0)),
            "compute_dtype": ck.compute_dtype(),
            "export_all_aliases": False,
            "buffers": sorted(ck.buffers()),
            "optimizer": {
                "param_groups": [{k: g[k] for k in _GROUP_OPTIONS if k in g} for g in groups],
                "scalar_states": [({"step": s} if s is not None else {}) for s in steps],
            },
            "lr_scheduler": None,
            "loss_scaler": ck.loss_scaler(),
            "rng": None,
            "client_state": {k: v for k, v in ms.items() if k not in _DS_KEYS},
        }
        if engine is not None:
            self._fit(engine, groups)

    def _fit(self, engine, groups: List[dict]) -> None:
        """Check the engine's optimizer groups against DeepSpeed's and shape the scheduler state."""
        opt = engine.optimizer
        if opt is not None and groups and len(groups) != len(opt.param_groups):
            raise CheckpointError(
                f"{self.checkpoint.optim_files[0]}: the DeepSpeed run's optimizer had {len(groups)} parameter "
                f"group(s), this engine's has {len(opt.param_groups)}; build the optimizer with the same groups "
                "(e.g. the same weight-decay split) to resume its states")
        if opt is not None:
            steps = self.data["optimizer"]["scalar_states"]
            self.data["optimizer"]["scalar_states"] = (steps + [{}] * len(opt.param_groups))[:len(opt.param_groups)]
        sched = engine.lr_scheduler
        ds_sched = self.checkpoint.model_states.get("lr_scheduler")
        if ds_sched is None or sched is None or not hasattr(sched, "state_dict"):
            return
        self.data["lr_scheduler"] = translate_scheduler(ds_sched, sched, [float(g["lr"]) for g in groups], self.where)


def translate_scheduler(ds_sched: dict, sched, lrs: List[float], where) -> dict:
    """hf_zero's scheduler state (for ``sched``) from the DeepSpeed run's: DeepSpeed's
    ``WarmupLR`` family stores ``last_batch_iteration`` n-1 after n steps, hf_zero's LambdaLR
    of the same schedule ``last_epoch`` n; a torch scheduler's state passes through."""
    mine = sched.state_dict()
    if set(ds_sched) == {"last_batch_iteration"}:
        if "last_epoch" not in mine:
            raise CheckpointError(f"{where}: DeepSpeed's scheduler state {ds_sched} cannot be mapped onto a "
                                  f"{type(sched).__name__} (no last_epoch)")
        n = int(ds_sched["last_batch_iteration"]) + 1
        mine = dict(mine, last_epoch=n, _step_count=n + 1)
        if lrs:
            mine["_last_lr"] = list(lrs)
        return mine
    if set(ds_sched) <= set(mine) | {"lr_lambdas"}:
        return dict(ds_sched)  # the same torch scheduler class on both sides
    raise CheckpointError(
        f"{where}: the DeepSpeed run's LR scheduler state has keys {sorted(ds_sched)}, this engine's "
        f"{type(sched).__name__} has {sorted(mine)}; use the same scheduler, or pass "
        "load_lr_scheduler_states=False and set it yourself")


class DeepSpeedReader:
    """The element-range reader :func:`~hf_zero.checkpoint.sharded.load_checkpoint` uses."""

    def __init__(self, ck: DeepSpeedCheckpoint):
        self.ck = ck

    def read(self, flat_key: str, kind: str, start: int, length: int, out: torch.Tensor) -> None:
        if kind in ("master", "param"):
            self.ck.read(flat_key, "master", start, length, out)
        elif kind.startswith("state."):
            self.ck.read(flat_key, kind[len("state."):], start, length, out)
        else:
            raise KeyError(kind)

    def state_keys(self, flat_key: str) -> List[str]:
        return self.ck.state_keys()

    def buffer(self, name: str) -> torch.Tensor:
        return self.ck.buffers()[name]


def trainer_scheduler_state(checkpoint_dir, sched) -> Optional[dict]:
    """The LR scheduler state of a Trainer run under DeepSpeed, for the Trainer's ``sched``:
    its ``scheduler.pt`` when the Trainer wrote one, else the state DeepSpeed kept in its model
    states (translated, see :func:`translate_scheduler`); None when neither exists."""
    from .trainer_format import _load, is_marker

    path = Path(checkpoint_dir) / "scheduler.pt"
    if path.is_file() and not is_marker(path):
        return _load(path)
    ck = open_deepspeed(checkpoint_dir)
    ds = ck.model_states.get("lr_scheduler") if ck is not None else None
    if ds is None or sched is None:
        return None
    return translate_scheduler(ds, sched, [float(g["lr"]) for g in ck.base_param_groups()], ck.model_file)
