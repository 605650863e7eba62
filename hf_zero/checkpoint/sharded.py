"""Save and resume an engine's sharded state, at any world size and stage.

Note:
    * Save is atomic: all ranks write into ``<save_dir>/.partial-<tag>``, rank 0 writes the
      index last, renames the directory to ``<tag>`` and only then moves the ``latest`` pointer.
      A crash at any point leaves the previous checkpoint and pointer untouched.
    * What is saved: the fp32 master shards, the element-wise optimizer states laid out like the
      master (padding zero), frozen parameters (their only copy at stage 3), the optimizer's
      scalar states and group options, the LR scheduler, the loss scaler, the step counters, RNG
      states per rank and the caller's ``client_state`` (JSON).
    * Resume reads, on each rank, only the slices its new shards need (``safe_open`` +
      ``get_slice``), so no rank ever holds more than its own shard plus one slice, and no
      conversion step exists between world sizes or stages. All files are validated (sizes and
      sha256, split across ranks) before any state is changed.
    * RNG states are restored only at the same world size (elsewhere there is no meaningful
      mapping); resuming at another size says so in the returned info.
"""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
from safetensors import safe_open

from .fastio import LoadedFile, Parts, map_file, read_file, write_file
from .staging import SnapshotStaging
from .format import (
    EXPORT,
    FORMAT,
    INDEX,
    LATEST,
    CheckpointError,
    Index,
    fsync_path,
    in_export_range,
    rank_file,
    resolve_tag,
    sha256_of,
    write_json_atomic,
)

_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
_NAME_DTYPES = {v: k for k, v in _DTYPE_NAMES.items()}


def dtype_name(dtype: torch.dtype) -> str:
    return _DTYPE_NAMES.get(dtype, str(dtype).replace("torch.", ""))


def name_dtype(name: str) -> torch.dtype:
    return _NAME_DTYPES.get(name) or getattr(torch, name)


def _flat_key(unit_index: int, flat_index: int) -> str:
    return f"u{unit_index}.f{flat_index}"


def _json_safe(obj):
    """Plain JSON values from a state dict (tensors become lists); refuses anything else."""
    if isinstance(obj, torch.Tensor):
        return {"__tensor__": obj.tolist(), "dtype": dtype_name(obj.dtype)}
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if callable(obj):
        return None  # e.g. LambdaLR's lambdas: rebuilt by the code, not stored
    raise CheckpointError(f"cannot store a {type(obj).__name__} in a checkpoint without pickle: {obj!r}")


def _from_json(obj):
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return torch.tensor(obj["__tensor__"], dtype=name_dtype(obj["dtype"]))
        return {k: _from_json(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_from_json(v) for v in obj]
    return obj


def _is_hf_model(module: torch.nn.Module) -> bool:
    """Whether ``module`` is a transformers ``PreTrainedModel`` (which re-ties weights on load),
    checked without importing transformers."""
    return any(c.__name__ == "PreTrainedModel" for c in type(module).__mro__)


def export_names_of(module: torch.nn.Module, name: str, aliases) -> List[str]:
    """The names a parameter is exported under: HF models write a tied weight once (under the
    name ``save_pretrained`` keeps); any other module writes every name its ``state_dict()``
    holds, so ``load_state_dict(strict=True)`` accepts the export."""
    return [name] if _is_hf_model(module) else list(aliases)


def _export_names(module: torch.nn.Module) -> Dict[int, Tuple[str, List[str]]]:
    """id(param) -> (name to export under, all names). Tied weights export under the name that
    ``save_pretrained`` keeps (the tie's source), so ``from_pretrained`` re-ties them."""
    names: Dict[int, List[str]] = {}
    for n, p in module.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(n)
    tied = getattr(module, "_tied_weights_keys", None) or {}
    targets = set(tied.keys()) if isinstance(tied, dict) else set()
    out = {}
    for key, all_names in names.items():
        keep = [n for n in all_names if n not in targets] or all_names
        out[key] = (keep[0], all_names)
    return out


# ---------------------------------------------------------------------------------------- save
def _to_host(t: torch.Tensor, staging: Optional[SnapshotStaging], key: str,
             dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """``t`` on the CPU, contiguous; with ``staging`` a copy in its memory kept under ``key``
    (never sharing memory with ``t``: later training cannot change what a background write
    sends to disk)."""
    if staging is not None:
        return staging.copy(key, t, dtype)
    src = t.detach()
    return src.to(device="cpu", dtype=dtype or src.dtype).contiguous()


def _shard_entry(spans: list, numel: int, staging: Optional[SnapshotStaging], key: str):
    """One optimizer state of a flat's shard, ``numel`` elements, from its pieces' tensors
    ``(start, end, value)``: the pieces in place (a :class:`Parts`, nothing joined or copied
    unless staged or on a device), with zeros where no piece is (the shard's padding)."""
    dtype = spans[0][2].dtype
    parts, pos = [], 0
    for start, end, value in sorted(spans, key=lambda s: s[0]):
        if start > pos:
            parts.append(torch.zeros(start - pos, dtype=dtype))
        parts.append(_to_host(value.reshape(-1), staging, f"{key}@{start}", dtype))
        pos = end
    if pos < numel:
        parts.append(torch.zeros(numel - pos, dtype=dtype))
    return parts[0] if len(parts) == 1 else Parts(parts)


def _rank_tensors(engine, staging: Optional[SnapshotStaging] = None
                  ) -> Tuple[Dict[str, torch.Tensor], List[Dict[str, float]]]:
    """This rank's tensors (master, element-wise optimizer states, frozen params, RNG), and per
    param group the optimizer's 0-d states (e.g. Adam's ``step``) seen on this rank.
    ``staging``: every tensor is a copy in its memory (the asynchronous save writes it later)."""
    out: Dict[str, torch.Tensor] = {}
    scalars: List[Dict[str, float]] = [{} for _ in engine.optimizer.param_groups]
    pieces_by_flat: Dict[int, list] = {}
    for piece in engine.pieces:
        pieces_by_flat.setdefault(piece.flat_index, []).append(piece)
    trainable_index = {id(f): i for i, f in enumerate(engine._trainable_flats)}
    for u in engine.units:
        for fi, f in enumerate(u.flats):
            key = _flat_key(u.index, fi)
            if engine.rank >= f.shard_world:
                continue  # stage 0: rank 0's copy is the checkpoint; MiCS: shard group 0's
            if not f.trainable:
                out[f"{key}.param"] = _to_host(engine.read_shard(f), staging, f"{key}.param")
                continue
            with engine.resident(f):
                out[f"{key}.master"] = _to_host(f.master, staging, f"{key}.master", torch.float32)
                spans: Dict[str, list] = {}  # state key -> (start, end, value) per piece
                for piece in pieces_by_flat.get(trainable_index[id(f)], []):
                    for skey, value in engine.optimizer.state.get(piece.param, {}).items():
                        if not torch.is_tensor(value) or value.dim() == 0:
                            scalars[piece.group].setdefault(skey, float(value))
                            continue
                        if value.numel() != piece.end - piece.start:
                            raise CheckpointError(
                                f"optimizer state {skey!r} has {value.numel()} elements for a piece of "
                                f"{piece.end - piece.start}: the optimizer is not element-wise"
                            )
                        spans.setdefault(f"{key}.state.{skey}", []).append((piece.start, piece.end, value))
                for name, parts in spans.items():
                    out[name] = _shard_entry(parts, f.shard_numel, staging, name)
    out["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available() and engine.device.type == "cuda":
        out["rng.cuda"] = torch.cuda.get_rng_state(engine.device)
    return out, scalars


def _layout(engine) -> Tuple[dict, dict]:
    export = _export_names(engine.module)
    flats, params = {}, {}
    for u in engine.units:
        for fi, f in enumerate(u.flats):
            key = _flat_key(u.index, fi)
            flats[key] = {
                "padded_numel": f.padded_numel,
                "shard_numel": f.shard_numel,
                "shard_world": f.shard_world,
                "dtype": dtype_name(f.dtype),
                "trainable": f.trainable,
            }
            for i, (name, p) in enumerate(zip(f.names, f.params)):
                export_name, aliases = export.get(id(p), (name, [name]))
                params[name] = {
                    "flat": key,
                    "offset": f.offsets[i],
                    "numel": f.numels[i],
                    "shape": list(f.shapes[i]),
                    "dtype": dtype_name(f.dtype),
                    "trainable": f.trainable,
                    "aliases": aliases,
                    "export_name": export_name,
                }
    return flats, params


def _persistent_buffers(module: torch.nn.Module) -> Dict[str, torch.Tensor]:
    keys = set(module.state_dict(keep_vars=True).keys())
    return {n: b.detach().cpu().contiguous() for n, b in module.named_buffers() if n in keys}


def _python_rng() -> dict:
    version, state, gauss = random.getstate()
    rng = {"python": [version, list(state), gauss]}
    try:
        import numpy as np

        name, keys, pos, has_gauss, cached = np.random.get_state()
        rng["numpy"] = [name, keys.tolist(), int(pos), int(has_gauss), float(cached)]
    except ImportError:  # pragma: no cover - numpy is a torch dependency in practice
        pass
    return rng


def _gather_objects(engine, obj) -> List[Any]:
    if engine.world_size == 1:
        return [obj]
    import torch.distributed as dist

    out = [None] * engine.world_size
    dist.all_gather_object(out, obj)  # in-memory transport only; nothing pickled reaches disk
    return out


def _agree(engine, error: str, what: str) -> None:
    """Collective: every rank learns every rank's error of step ``what``; raise on all ranks if
    any rank failed (so no rank returns while another waits in a collective)."""
    errors = _gather_objects(engine, error)
    bad = [(r, e) for r, e in enumerate(errors) if e]
    if bad:
        detail = "; ".join(f"rank {r}: {e}" for r, e in bad)
        raise CheckpointError(f"{what} failed on rank(s) {[r for r, _ in bad]}: {detail}")


def _agree_tag(engine, tag: str) -> None:
    tags = _gather_objects(engine, tag)
    if len(set(tags)) > 1:
        by_rank = ", ".join(f"rank {r}: {t!r}" for r, t in enumerate(tags))
        raise CheckpointError(
            f"save_checkpoint was called with different tags on different ranks ({by_rank}); every "
            "rank must pass the same tag (derive it from the step count, or pass tag=None)"
        )


def _disk_error(exc: OSError, path: Path, nbytes: int) -> str:
    """An OSError of a write, with the file, its directory and (disk full) the bytes needed."""
    msg = f"{path}: {exc.strerror or exc}"
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        try:
            free = shutil.disk_usage(path.parent).free
            msg += f" (writing {nbytes} bytes into {path.parent}, {free} bytes free there)"
        except OSError:
            msg += f" (writing {nbytes} bytes into {path.parent})"
        msg += "; free space or save elsewhere"
    return msg


def save_checkpoint(engine, save_dir, tag: Optional[str] = None, client_state: Optional[dict] = None,
                    save_latest: bool = True, async_save: bool = False) -> Path:
    """Collective: write this engine's state as ``<save_dir>/<tag>`` and point ``latest`` at it.

    Ranks agree on the tag first and on the outcome of every write before anything is published:
    a write that fails on any rank (disk full, permissions) raises a :class:`CheckpointError`
    naming that rank and file on every rank, removes the partial directory and leaves the
    previous checkpoint and ``latest`` as they were.

    ``async_save``: return once this rank's shards are copied to host memory; the files are
    written, and the checkpoint published, by a background thread (see ``async_save.py``).
    A save waits for the previous asynchronous one first (and raises its failure, if any).
    """
    from .async_save import AsyncSave, finish_pending

    finish_pending(engine)  # collective: the previous background save is complete (or raised)
    save_dir = Path(save_dir)
    tag = tag or f"global_step{engine.global_steps}"
    _agree_tag(engine, tag)
    if "/" in tag or tag.startswith(".") or tag == LATEST:
        raise CheckpointError(f"checkpoint tag {tag!r} must be a plain directory name (not {LATEST!r})")
    client_json = _json_safe(client_state or {})  # fail before writing anything
    final = save_dir / tag
    partial = save_dir / f".partial-{tag}"
    error = ""
    if engine.rank == 0:
        try:
            save_dir.mkdir(parents=True, exist_ok=True)
            if partial.exists():
                shutil.rmtree(partial)  # left by an earlier crash
            partial.mkdir()
        except OSError as exc:
            error = _disk_error(exc, partial, 0)
    _agree(engine, error, f"creating {partial}")

    try:
        # 1. every rank takes its tensors (a snapshot when asynchronous) and, synchronously,
        #    writes its own file; whatever fails locally becomes an agreed error
        meta, error, fname = None, "", rank_file(engine.rank, engine.world_size)
        nbytes, tensors = 0, None
        try:
            engine.flush_pending_update()
            staging = _staging_of(engine) if async_save else None
            if staging is not None:
                staging.begin()
            tensors, scalars = _rank_tensors(engine, staging)
            if engine.rank == 0:
                for name, b in _persistent_buffers(engine.module).items():
                    tensors[f"buffer.{name}"] = _to_host(b, staging, f"buffer.{name}")
            if staging is not None:
                staging.end()
            nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
            meta = {"file": fname, "rng": _python_rng(), "scalar_states": scalars}
            if not async_save:
                meta["written"] = _write_rank_file(partial / fname, tensors)
                tensors = None
        except OSError as exc:
            error = _disk_error(exc, partial / fname, nbytes)
        except CheckpointError as exc:
            error = str(exc)
        except Exception as exc:  # noqa: BLE001 - any I/O error of the write
            error = _disk_error(_as_os_error(exc), partial / fname, nbytes)
        _agree(engine, error, f"saving checkpoint {final}")
        metas = _gather_objects(engine, meta)

        # 2. rank 0 writes the index, then publishes the directory (asynchronous: the index is
        #    built now, from the state at this step, and written once every rank file is complete)
        error, index = "", None
        if engine.rank == 0:
            try:
                index = _index_data(engine, metas, client_json)
                _write_model_config(engine, partial)
                if not async_save:
                    _publish(save_dir, tag, partial, final, index, save_latest)
            except OSError as exc:
                error = _disk_error(exc, Path(exc.filename) if exc.filename else partial / INDEX, 0)
        _agree(engine, error, f"publishing checkpoint {final}")
    except CheckpointError:  # agreed by every rank: clean up together
        if engine.rank == 0 and partial.exists():
            shutil.rmtree(partial, ignore_errors=True)  # nothing half-written stays behind
        engine.comm.barrier()
        raise
    if async_save:
        engine._pending_save = AsyncSave.start(
            rank=engine.rank, world_size=engine.world_size, save_dir=save_dir, tag=tag, partial=partial,
            final=final, file_name=fname, tensors=tensors, index=index, save_latest=save_latest, nbytes=nbytes)
    return final


def _staging_of(engine) -> SnapshotStaging:
    """The host memory an asynchronous save copies into: the engine's, kept between saves, or a
    new one when ``hf_zero.async_save_keep_staging`` is off (null: kept unless training on the
    CPU; see staging.py)."""
    staging = getattr(engine, "_checkpoint_staging", None)
    if staging is None:
        staging = SnapshotStaging(pin=engine.device.type == "cuda")
        keep = engine.config.hf_zero.async_save_keep_staging
        if keep or (keep is None and engine.device.type != "cpu"):
            engine._checkpoint_staging = staging
    return staging


def _as_os_error(exc: Exception) -> OSError:
    """safetensors reports I/O failures as its own exception type; recover the errno."""
    text = str(exc)
    for code in (errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EROFS, errno.EIO):
        if os.strerror(code) in text:
            return OSError(code, os.strerror(code))
    return OSError(None, f"{type(exc).__name__}: {text}")


def _index_data(engine, metas: list, client_json) -> dict:
    """The index of a checkpoint of ``engine``'s current state; ``metas`` hold every rank's file
    name, RNG and scalar states, and (once written) its entry of ``files`` (``"written"``)."""
    flats, params = _layout(engine)
    sched = engine.lr_scheduler
    return {
        "format": FORMAT,
        "stage": engine.stage,
        "world_size": engine.world_size,
        "global_steps": engine.global_steps,
        "micro_steps": engine.micro_steps,
        "skipped_steps": engine.skipped_steps,
        "compute_dtype": dtype_name(engine.compute_dtype),
        "export_all_aliases": not _is_hf_model(engine.module),
        "flats": flats,
        "params": params,
        "buffers": sorted(_persistent_buffers(engine.module)),
        "files": {m["file"]: m["written"] for m in metas if "written" in m},
        "rng": [m["rng"] for m in metas],
        "optimizer": {
            "class": type(engine.optimizer).__name__,
            "param_groups": [_json_safe({k: v for k, v in g.items() if k != "params"})
                             for g in engine.optimizer.param_groups],
            # a rank may hold no piece of some group: merge what every rank saw
            "scalar_states": [
                {k: v for m in metas for k, v in m["scalar_states"][g].items()}
                for g in range(len(engine.optimizer.param_groups))
            ],
        },
        "lr_scheduler": _json_safe(sched.state_dict()) if sched is not None and hasattr(sched, "state_dict") else None,
        "loss_scaler": engine.loss_scaler.state_dict(),
        # the data position: one micro-batch per micro-step (see ResumableDataLoader)
        "dataloader": ({"micro_steps": engine.micro_steps, **engine.training_dataloader.state_dict()}
                       if engine.training_dataloader is not None else None),
        "client_state": client_json,
        "zero_config": engine.config.to_dict(),
    }


def _write_model_config(engine, partial: Path) -> None:
    config = getattr(engine.module, "config", None)
    if config is not None and hasattr(config, "to_json_file"):
        config.to_json_file(str(partial / "config.json"))


def _publish(save_dir: Path, tag: str, partial: Path, final: Path, index: dict, save_latest: bool) -> None:
    """Rank 0: write the index into ``partial``, rename it to ``final``, move ``latest``."""
    write_json_atomic(partial / INDEX, index)
    fsync_path(partial)
    old = save_dir / f".old-{tag}"
    if final.exists():
        if old.exists():
            shutil.rmtree(old)
        os.rename(final, old)
    os.rename(partial, final)
    if old.exists():
        shutil.rmtree(old)
    fsync_path(save_dir)
    if save_latest:
        tmp = save_dir / f".{LATEST}.tmp"
        try:
            tmp.write_text(tag)
            os.replace(tmp, save_dir / LATEST)
        except OSError:
            tmp.unlink(missing_ok=True)
            raise
        fsync_path(save_dir)


def _write_rank_file(path: Path, tensors: Dict[str, torch.Tensor]) -> dict:
    """Write one rank file (fsynced), what an export reads first (``in_export_range``); returns
    its entry of the index's ``files``: size and sha256, and those of its export range, hashed
    as it was written."""
    w = write_file(path, tensors, metadata={"format": FORMAT}, lead=in_export_range)
    return {"size": w.size, "sha256": w.sha256, EXPORT: {"bytes": w.lead_bytes, "sha256": w.lead_sha256}}


# ---------------------------------------------------------------------------------------- load
class _SliceReader:
    """Reads element ranges of named 1-D tensors from the rank files, opening each file once."""

    def __init__(self, index: Index, loaded: Optional[Dict[int, LoadedFile]] = None, mapped: bool = False):
        """``loaded``: files read (and verified) in one pass; ``mapped``: open the others as
        :func:`~hf_zero.checkpoint.fastio.map_file` mappings (``pieces`` then gives views)."""
        self.index = index
        self.mapped = mapped
        self._files: Dict[int, Any] = dict(loaded or {})

    def _file(self, rank: int):
        if rank not in self._files:
            name = rank_file(rank, self.index.world_size)
            path = self.index.directory / name
            try:
                self._files[rank] = map_file(path) if self.mapped else safe_open(str(path), framework="pt")
            except Exception as exc:  # noqa: BLE001 - safetensors raises several types
                raise CheckpointError(f"{path}: cannot be read as safetensors ({exc})") from None
        return self._files[rank]

    def state_keys(self, flat_key: str) -> List[str]:
        """The optimizer states saved for ``flat_key`` (rank 0 owns the first elements of every
        flat, so its file has every key)."""
        prefix = f"{flat_key}.state."
        return sorted(k[len(prefix):] for k in self._file(0).keys() if k.startswith(prefix))

    def buffer(self, name: str) -> torch.Tensor:
        return self._file(0).get_tensor(f"buffer.{name}")

    def has(self, rank: int, key: str) -> bool:
        return key in self._file(rank).keys()

    def read(self, flat_key: str, kind: str, start: int, length: int, out: torch.Tensor) -> None:
        """Copy elements ``[start, start + length)`` of ``<flat>.<kind>`` into ``out``."""
        done = 0
        for piece in self.pieces(flat_key, kind, start, length):
            out[done : done + piece.numel()].copy_(piece)
            done += piece.numel()

    def pieces(self, flat_key: str, kind: str, start: int, length: int) -> List[torch.Tensor]:
        """Elements ``[start, start + length)`` of ``<flat>.<kind>``, one 1-D slice per rank
        file they span, in order (views of the file when it is loaded or mapped)."""
        flat = self.index.flats[flat_key]
        key, done, out = f"{flat_key}.{kind}", 0, []
        while done < length:
            rank, local = self.index.owner(flat, start + done)
            n = min(length - done, flat.shard_numel - local)
            f = self._file(rank)
            if key not in f.keys():
                raise CheckpointError(f"{self.index.directory / rank_file(rank, self.index.world_size)}: no tensor {key!r}")
            out.append(f.get_slice(key)[local : local + n])
            done += n
        return out


def _needed_files(engine, index: Index) -> set:
    """The rank files (by their rank) holding any element this engine's shards restore, plus
    this rank's own file at the same world size (its RNG states)."""
    need = set()
    for u in engine.units:
        for f in u.flats:
            for s in f.segments_in_shard():
                e = index.params[f.names[s.param_index]]
                flat = index.flats[e.flat]
                if s.length <= 0:
                    continue
                first = index.owner(flat, e.offset + s.param_start)[0]
                last = index.owner(flat, e.offset + s.param_start + s.length - 1)[0]
                need.update(range(first, last + 1))
    if index.world_size == engine.world_size and rank_file(engine.rank, index.world_size) in index.files:
        need.add(engine.rank)
    return {r for r in need if rank_file(r, index.world_size) in index.files}


def _read_verified(index: Index, rank: int, verify: bool) -> LoadedFile:
    """Read rank file ``rank`` whole, its sha256 computed while it is read; CheckpointError
    naming the file if its size or hash differs from the index."""
    name = rank_file(rank, index.world_size)
    path = index.directory / name
    meta = index.files[name]
    try:
        data, sha = read_file(path, hash_bytes=verify)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    if data.numel() != meta["size"]:
        raise CheckpointError(f"{path}: {data.numel()} bytes on disk, the index says {meta['size']} (truncated?)")
    if verify and sha != meta["sha256"]:
        raise CheckpointError(f"{path}: sha256 differs from the index (the file was altered or corrupted)")
    try:
        return LoadedFile(path, data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: cannot be read as safetensors ({exc})") from None


def _check_model_matches(engine, index: Index) -> None:
    ours = {}
    for u in engine.units:
        for f in u.flats:
            for i, name in enumerate(f.names):
                ours[name] = (f.shapes[i], f.trainable)
    where = getattr(index, "where", index.directory / INDEX)
    missing = sorted(set(ours) - set(index.params))
    extra = sorted(set(index.params) - set(ours))
    if missing or extra:
        raise CheckpointError(
            f"{where}: the checkpoint is of another model: {len(missing)} parameter(s) of this model are "
            f"not in it (e.g. {missing[:3]}), {len(extra)} of its are not in this model (e.g. {extra[:3]})"
        )
    for name, (shape, trainable) in ours.items():
        entry = index.params[name]
        if tuple(entry.shape) != tuple(shape):
            raise CheckpointError(f"{where}: {name} has shape {list(entry.shape)} there, {list(shape)} here")


def load_checkpoint(engine, load_dir, tag: Optional[str] = None, load_optimizer_states: bool = True,
                    load_lr_scheduler_states: bool = True, verify: bool = True,
                    load_module_only: bool = False) -> Tuple[Path, dict]:
    """Collective: restore ``engine`` from a checkpoint written at any world size and stage.

    ``load_module_only`` restores the weights alone (e.g. the best model at the end of
    training): optimizer states, schedulers, loss scale, step counters and RNG stay as they are.
    Returns ``(checkpoint_dir, client_state)``.
    """
    if load_module_only:
        load_optimizer_states = load_lr_scheduler_states = False
    from .async_save import finish_pending
    from .deepspeed_format import DeepSpeedIndex, DeepSpeedReader, open_deepspeed

    finish_pending(engine)  # a checkpoint still being written in the background is published first
    engine._checkpoint_staging = None  # its snapshot memory goes back: the load needs room for a rank file

    deepspeed = open_deepspeed(Path(load_dir), tag)  # a DeepSpeed checkpoint is read in place
    if deepspeed is not None:
        index, reader = DeepSpeedIndex(deepspeed, engine), DeepSpeedReader(deepspeed)
        directory = index.directory
        _check_model_matches(engine, index)
    else:
        directory = resolve_tag(Path(load_dir), tag)
        index = Index.read(directory)
        _check_model_matches(engine, index)

        # Read and validate before touching any state: every rank reads the files its shards
        # need in one pass each, hashing the bytes as they arrive; a file no rank needs is
        # hashed by one rank. Every rank learns every rank's verdict.
        error, loaded = "", {}
        try:
            index.check_files(verify_hash=False)  # presence and sizes: cheap, everywhere
            need = _needed_files(engine, index)
            needs = _gather_objects(engine, sorted(need))
            wanted = {r for n in needs for r in n}
            for r in sorted(need):
                loaded[r] = _read_verified(index, r, verify)
            for r in range(index.world_size):
                name = rank_file(r, index.world_size)
                if (verify and r not in wanted and name in index.files
                        and r % engine.world_size == engine.rank):
                    index.check_files([name], verify_hash=True)
        except CheckpointError as exc:
            error = str(exc)
        errors = [e for e in _gather_objects(engine, error) if e]
        if errors:
            raise CheckpointError(errors[0])
        reader = _SliceReader(index, loaded)
    return restore(engine, directory, index, reader, load_optimizer_states=load_optimizer_states,
                   load_lr_scheduler_states=load_lr_scheduler_states, load_module_only=load_module_only)


def restore(engine, directory: Path, index, reader, *, load_optimizer_states: bool = True,
            load_lr_scheduler_states: bool = True, load_module_only: bool = False) -> Tuple[Path, dict]:
    """Collective: apply an opened checkpoint (an hf_zero ``Index`` and its ``_SliceReader``, or
    a view of a DeepSpeed / stock Trainer checkpoint with the same interface) to ``engine``."""
    if load_module_only:
        load_optimizer_states = load_lr_scheduler_states = False
    micro_steps = None if load_module_only else resumed_micro_steps(
        index.data, engine.gradient_accumulation_steps, directory)  # may refuse: before any state changes
    engine.flush_pending_update()
    scalar = index.data["optimizer"]["scalar_states"]
    trainable_index = {id(f): i for i, f in enumerate(engine._trainable_flats)}
    pieces_by_flat: Dict[int, list] = {}
    for piece in engine.pieces:
        pieces_by_flat.setdefault(piece.flat_index, []).append(piece)
    # the optimizer's state tensors of the same shapes are filled in place (a load into a
    # running engine then touches no new memory); with offload they live elsewhere: not reused
    previous = dict(engine.optimizer.state) if load_optimizer_states and engine.host is None else {}
    if load_optimizer_states:
        engine.optimizer.state.clear()
        if engine.host is not None:
            engine.host.scalar_state.clear()
    with torch.no_grad():
        for u in engine.units:
            for f in u.flats:
                segs = f.segments_in_shard()
                if not f.trainable:
                    buf = torch.zeros(f.shard_numel, dtype=torch.float32)
                    for s in segs:
                        e = index.params[f.names[s.param_index]]
                        kind = "param" if not e.trainable else "master"
                        reader.read(e.flat, kind, e.offset + s.param_start, s.length,
                                    buf[s.shard_start : s.shard_start + s.length])
                    engine.write_shard(f, buf, donate=True)
                    _refresh_full(engine, f)
                    continue
                with engine.resident(f, write_back=True):
                    _restore_master(reader, index, f, segs)
                    if not f.master_is_shard:
                        engine.write_shard(f, f.master)
                    if load_optimizer_states:
                        for piece in pieces_by_flat.get(trainable_index[id(f)], []):
                            st = _restore_piece_states(reader, index, f, segs, piece,
                                                       previous.pop(piece.param, {}))
                            if st or scalar[piece.group]:
                                for k, v in scalar[piece.group].items():
                                    st[k] = torch.tensor(v, dtype=torch.float32)
                                engine.optimizer.state[piece.param] = st
                _refresh_full(engine, f)
        if load_optimizer_states:
            for group, saved in zip(engine.optimizer.param_groups, index.data["optimizer"]["param_groups"]):
                for k, v in _from_json(saved).items():
                    group[k] = tuple(v) if isinstance(group.get(k), tuple) else v
        for name in index.data.get("buffers", []):
            buf = dict(engine.module.named_buffers()).get(name)
            if buf is not None:
                buf.copy_(reader.buffer(name).to(buf.device, buf.dtype))

    if load_module_only:
        engine.comm.barrier()
        return directory, _from_json(index.data.get("client_state") or {})
    sched_state = index.data.get("lr_scheduler")
    if load_lr_scheduler_states and sched_state is not None and engine.lr_scheduler is not None:
        sched_state = _from_json(sched_state)
        if set(sched_state) == {"__deepspeed__"}:  # written by `hf-zero convert` (checkpoint/convert.py)
            from .deepspeed_format import translate_scheduler

            sched_state = translate_scheduler(sched_state["__deepspeed__"], engine.lr_scheduler,
                                              [g["lr"] for g in engine.optimizer.param_groups], directory / INDEX)
        engine.lr_scheduler.load_state_dict(sched_state)
    engine.loss_scaler.load_state_dict(index.data["loss_scaler"])
    engine.global_steps = index.data["global_steps"]
    engine.micro_steps = micro_steps
    engine.skipped_steps = index.data["skipped_steps"]
    engine.zero_grad()
    if engine.training_dataloader is not None:
        engine.training_dataloader.seek(engine.micro_steps)
    if index.world_size == engine.world_size and index.data.get("rng"):
        _restore_rng(reader, index, engine)
    engine.comm.barrier()
    return directory, _from_json(index.data.get("client_state") or {})


def _restore_master(reader, index, f, segs) -> None:
    """Read the fp32 master of flat ``f``'s shard from the checkpoint, straight into
    ``f.master`` (through a CPU buffer when it lives on a device); padding reads as zero."""
    out = f.master if f.master.device.type == "cpu" else torch.empty(f.shard_numel, dtype=torch.float32)
    covered = sum(s.length for s in segs)
    if covered < f.shard_numel:
        out.zero_()
    for s in segs:
        e = index.params[f.names[s.param_index]]
        reader.read(e.flat, "master" if e.trainable else "param", e.offset + s.param_start, s.length,
                    out[s.shard_start : s.shard_start + s.length])
    if out is not f.master:
        f.master.copy_(out)


def _restore_piece_states(reader, index, f, segs, piece, previous: dict) -> Dict[str, torch.Tensor]:
    """The element-wise optimizer states of one piece (``master[piece.start:piece.end]``) read
    from the checkpoint, into ``previous``'s tensors where their shape, dtype and device fit
    (filled in place), else into new ones. Elements whose parameter has no saved state (frozen
    when the checkpoint was written) are zero."""
    n = piece.end - piece.start
    inside = []  # (segment, its checkpoint entry, the state keys saved for it)
    for s in segs:
        if piece.start <= s.shard_start < piece.end and s.length > 0:
            e = index.params[f.names[s.param_index]]
            inside.append((s, e, _state_keys(reader, index, e.flat) if e.trainable else []))
    keys = sorted({k for _, _, ks in inside for k in ks})
    out: Dict[str, torch.Tensor] = {}
    for k in keys:
        old = previous.get(k)
        if (torch.is_tensor(old) and old.shape == (n,) and old.dtype == torch.float32
                and old.device == f.master.device):
            t = old
        else:
            t = torch.empty(n, dtype=torch.float32, device=f.master.device)
        if n > sum(s.length for s, _, ks in inside if k in ks):
            t.zero_()
        for s, e, ks in inside:
            if k in ks:
                a = s.shard_start - piece.start
                reader.read(e.flat, f"state.{k}", e.offset + s.param_start, s.length, t[a : a + s.length])
        out[k] = t
    return out


def saved_accumulation(data: dict) -> Optional[int]:
    """The gradient accumulation steps of the run that wrote a checkpoint's index data (our own
    index keeps the whole config; DeepSpeed's and the Trainer's views name it directly)."""
    value = data.get("gradient_accumulation_steps", (data.get("zero_config") or {}).get("gradient_accumulation_steps"))
    return int(value) if value is not None else None


def resumed_micro_steps(data: dict, accumulation: int, directory: Path) -> int:
    """The micro-step counter to resume with under ``accumulation`` micro-batches per step.

    The counter decides where the next accumulation boundary falls and how many micro-batches the
    data loader skips. Resumed at another world size with the same global batch, the accumulation
    changes (e.g. 1 at world 2 becomes 2 at world 1): a checkpoint saved at an optimizer step
    resumes at step ``global_steps × accumulation`` boundaries, so its first step accumulates all
    of its micro-batches (keeping the saved count would put the boundary one micro-batch early
    and step on half a batch). One saved in the middle of an accumulation only resumes with the
    same accumulation."""
    saved, saved_accumulation_steps = int(data["micro_steps"]), saved_accumulation(data)
    if saved_accumulation_steps is None or saved_accumulation_steps == accumulation:
        return saved
    steps, within = divmod(saved, saved_accumulation_steps)
    if within:
        raise CheckpointError(
            f"{directory}: saved after micro-batch {within} of an accumulation of {saved_accumulation_steps} "
            f"(micro-step {saved}), and this run accumulates {accumulation} micro-batches per step; resume it with "
            f"gradient_accumulation_steps={saved_accumulation_steps}, or from a checkpoint saved at an optimizer step"
        )
    return steps * accumulation


def _state_keys(reader, index: Index, flat_key: str) -> List[str]:
    return reader.state_keys(flat_key)


def _refresh_full(engine, f) -> None:
    """After a shard changed: stages 1-2 re-gather the full parameters (stage 0 holds them all,
    stage 3 gathers on demand)."""
    if engine.stage in (1, 2):
        engine.shard_comm.all_gather(f.full, f.shard)


def _restore_rng(reader: _SliceReader, index: Index, engine) -> None:
    f = reader._file(engine.rank)
    torch.set_rng_state(f.get_tensor("rng.torch"))
    if "rng.cuda" in f.keys() and torch.cuda.is_available() and engine.device.type == "cuda":
        torch.cuda.set_rng_state(f.get_tensor("rng.cuda"), engine.device)
    rng = index.data["rng"][engine.rank]
    version, state, gauss = rng["python"]
    random.setstate((version, tuple(state), gauss))
    if "numpy" in rng:
        import numpy as np

        name, keys, pos, has_gauss, cached = rng["numpy"]
        np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
