"""Stock ``transformers.Trainer`` checkpoints, both ways.

* Reading one (a plain single-process or DDP run's ``checkpoint-N/``: ``model.safetensors``,
  ``optimizer.pt``, ``scheduler.pt``, ``trainer_state.json``) into an engine, so a run switches to
  hf_zero mid-way with its optimizer and scheduler state (:func:`load_trainer_checkpoint`).
* Marking hf_zero's own Trainer checkpoints so that a stock Trainer refuses them
  (:func:`write_stock_trainer_markers`) instead of silently starting a fresh optimizer.

Note:
    * ``optimizer.pt`` is a torch optimizer ``state_dict``: its states are numbered in the order
      of the parameters in its groups. The stock Trainer builds its groups as
      ``[decay parameters, the others]``, each in ``named_parameters()`` order; the caller passes
      those names (``param_names``, one list per group), checked against the file's group sizes.
    * Files are read with ``torch.load(weights_only=True, mmap=True)`` (tensors, numbers,
      containers only: no allowlist is needed) and ``model.safetensors`` with ``safe_open``.
    * The weights become the fp32 masters; each state tensor (``exp_avg``, ...) is read for the
      elements each rank's shard owns, at any world size and stage.
    * The marker is an ``optimizer.pt`` / ``scheduler.pt`` pair whose pickle names a global that
      does not exist (``hf_zero.THIS_IS_AN_HF_ZERO_CHECKPOINT__...``): ``torch.load`` with
      ``weights_only=True`` (the stock Trainer's) refuses it naming that global, and a plain
      unpickle fails on the missing attribute. Nothing in hf_zero ever defines that name.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

from .format import CheckpointError, FlatEntry, ParamEntry

MARKER_GLOBAL = "THIS_IS_AN_HF_ZERO_CHECKPOINT__resume_it_with_hf_zero_ZeroTrainer__see_docs_checkpoints_md"
_MARKER = b"\x80\x02chf_zero\n" + MARKER_GLOBAL.encode() + b"\nq\x00."
_GROUP_OPTIONS = ("lr", "initial_lr", "betas", "eps", "weight_decay", "momentum", "amsgrad")


def write_stock_trainer_markers(checkpoint_dir) -> None:
    """Write the ``optimizer.pt`` / ``scheduler.pt`` a stock Trainer trips on (see the note)."""
    for name in ("optimizer.pt", "scheduler.pt"):
        (Path(checkpoint_dir) / name).write_bytes(_MARKER)


def is_marker(path: Path) -> bool:
    try:
        return path.stat().st_size == len(_MARKER) and path.read_bytes() == _MARKER
    except OSError:
        return False


def _load(path: Path):
    if is_marker(path):
        raise CheckpointError(f"{path}: hf_zero's marker, not a stock Trainer file (this is an hf_zero checkpoint)")
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # noqa: BLE001 - UnpicklingError, RuntimeError, ...
        first = str(exc).strip().splitlines()
        raise CheckpointError(f"{path}: cannot be read with torch.load(weights_only=True): "
                              f"{type(exc).__name__}: {first[-1][:300] if first else ''}") from None


class TrainerIndex:
    """The view :func:`hf_zero.checkpoint.sharded.restore` reads, of a stock Trainer checkpoint."""

    def __init__(self, directory: Path, param_names: Sequence[Sequence[str]], shapes: Dict[str, tuple],
                 compute_dtype: str, gradient_accumulation_steps: int = 1):
        from safetensors import safe_open

        self.directory = Path(directory)
        self.where = self.directory / "optimizer.pt"
        weights = self.directory / "model.safetensors"
        if not weights.is_file():
            raise CheckpointError(f"{self.directory}: no model.safetensors (sharded or .bin weights are not read yet; "
                                  "save with save_safetensors=True and max shard size above the model)")
        self.world_size = -1  # no RNG of ours to restore
        self.files: Dict[str, dict] = {}
        opt = _load(self.where)
        if not isinstance(opt, dict) or "state" not in opt or "param_groups" not in opt:
            raise CheckpointError(f"{self.where}: not a torch optimizer state_dict (no 'state' / 'param_groups')")
        groups = [g for g in opt["param_groups"]]
        names = [list(n) for n in param_names if len(n)]
        sizes = [len(g["params"]) for g in groups]
        if sizes != [len(n) for n in names]:
            raise CheckpointError(
                f"{self.where}: its optimizer groups hold {sizes} parameters, this model's Trainer groups "
                f"(decay / no decay) {[len(n) for n in names]}; the checkpoint is of another model or grouping")
        self._state: Dict[str, dict] = {}
        for g, group in enumerate(groups):
            for idx, name in zip(group["params"], names[g]):
                self._state[name] = opt["state"].get(idx, {})
        self._weights = safe_open(str(weights), framework="pt")
        missing = sorted(set(shapes) - set(self._weights.keys()))
        if missing:
            raise CheckpointError(f"{weights}: no tensor for {missing[:3]} (tied weights under another name?)")
        self.params: Dict[str, ParamEntry] = {}
        self.flats: Dict[str, FlatEntry] = {}
        for name, shape in shapes.items():
            n = int(math.prod(shape))
            saved = tuple(self._weights.get_slice(name).get_shape())
            if saved != tuple(shape):
                raise CheckpointError(f"{weights}: {name} has shape {list(saved)} there, {list(shape)} here")
            self.params[name] = ParamEntry(name=name, flat=name, offset=0, numel=n, shape=tuple(shape),
                                           dtype=compute_dtype, trainable=True, aliases=(name,), export_name=name)
            self.flats[name] = FlatEntry(key=name, padded_numel=n, shard_numel=n, shard_world=1,
                                         dtype="float32", trainable=True)
        steps = []
        for g, group in enumerate(groups):
            st = self._state.get(names[g][0], {})
            steps.append({"step": float(st["step"])} if "step" in st else {})
        state_file = self.directory / "trainer_state.json"
        global_step = 0
        if state_file.is_file():
            global_step = int(json.loads(state_file.read_text()).get("global_step", 0))
        self.data = {
            "global_steps": global_step, "micro_steps": global_step * int(gradient_accumulation_steps),
            "gradient_accumulation_steps": int(gradient_accumulation_steps),
            "skipped_steps": 0, "buffers": [], "rng": None, "client_state": {},
            "optimizer": {"param_groups": [{k: g[k] for k in _GROUP_OPTIONS if k in g} for g in groups],
                          "scalar_states": steps},
            "lr_scheduler": None,  # the Trainer's own scheduler reads scheduler.pt (load_scheduler_state)
            "loss_scaler": {"scale": 1.0, "hysteresis_left": 2, "iteration": 0, "last_overflow_iteration": -1},
        }

    def scheduler_state(self) -> Optional[dict]:
        path = self.directory / "scheduler.pt"
        return _load(path) if path.is_file() else None


class TrainerReader:
    """Element ranges of the weights (``model.safetensors``) and optimizer states."""

    def __init__(self, index: TrainerIndex):
        self.index = index
        self._cached = (None, None)

    def read(self, flat_key: str, kind: str, start: int, length: int, out: torch.Tensor) -> None:
        if kind in ("master", "param"):
            if self._cached[0] != flat_key:
                self._cached = (flat_key, self.index._weights.get_tensor(flat_key).reshape(-1))
            src = self._cached[1]
        else:
            key = kind[len("state."):]
            st = self.index._state.get(flat_key, {})
            if key not in st:
                raise CheckpointError(f"{self.index.where}: no optimizer state {key!r} for {flat_key}")
            src = st[key].reshape(-1)
        out.copy_(src[start:start + length])

    def state_keys(self, flat_key: str) -> List[str]:
        st = self.index._state.get(flat_key, {})
        return sorted(k for k, v in st.items() if torch.is_tensor(v) and v.dim() > 0)

    def buffer(self, name: str) -> torch.Tensor:  # pragma: no cover - buffers: none listed
        raise KeyError(name)


def load_trainer_checkpoint(engine, checkpoint_dir, param_names: Sequence[Sequence[str]], lr_scheduler=None):
    """Collective: restore ``engine`` (weights as fp32 masters, optimizer states, step counts,
    group options) from a stock Trainer ``checkpoint-N/``, and ``lr_scheduler`` from its
    ``scheduler.pt``. ``param_names``: the parameter names of each optimizer group in the order
    the stock Trainer built them. Returns the checkpoint directory."""
    from .sharded import _check_model_matches, restore

    shapes = {}
    for u in engine.units:
        for f in u.flats:
            for i, name in enumerate(f.names):
                shapes[name] = tuple(f.shapes[i])
    from .sharded import dtype_name

    index = TrainerIndex(Path(checkpoint_dir), param_names, shapes, dtype_name(engine.compute_dtype),
                         engine.gradient_accumulation_steps)
    _check_model_matches(engine, index)
    sched = index.scheduler_state()
    restore(engine, index.directory, index, TrainerReader(index))
    if lr_scheduler is not None and sched is not None:
        lr_scheduler.load_state_dict(sched)
    return index.directory
