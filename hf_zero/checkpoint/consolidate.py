"""Export standard Hugging Face safetensors: offline from a sharded checkpoint, or live from an
engine at save time.

Note:
    * Output: ``model.safetensors``, or ``model-0000k-of-0000n.safetensors`` plus
      ``model.safetensors.index.json`` when it exceeds ``max_shard_size``; with ``config.json``
      (and, offline, any tokenizer / generation files found beside the checkpoint).
    * Offline, the rank files are mapped (``fastio.map_file``) and a parameter is written
      straight from the mapping: one view per rank file it spans (a ``Parts`` when several),
      nothing copied into new memory unless the export changes its dtype. A shard is written
      once it is full (``max_shard_size``; a larger tensor gets a shard of its own), so the
      anonymous memory is the write pipeline's staging buffers plus, when converting, one
      shard of converted tensors. Live (``save_pretrained``), one gathered unit plus one
      output shard.
    * Tied weights of a ``PreTrainedModel`` are written once, under the name ``save_pretrained``
      keeps, so ``from_pretrained`` re-ties them; any other module gets every name its own
      ``state_dict()`` holds (``load_state_dict(strict=True)`` works).
    * ``consolidate`` checks the rank files' sizes first, then in a thread while the export is
      written the sha256 of each file's export range (``Index.check_export_ranges``: the header
      and the masters, frozen parameters and buffers it reads, which come first in the file),
      not of the optimizer states after them; so it reads about the bytes it exports, once
      (through the page cache, shared with the export's own reads), overlapped with the writes.
      A file whose index entry has no export range, or whose header puts an entry the export
      reads beyond it, is hashed whole. A mismatch raises a CheckpointError naming the file
      before any output file is renamed into place, and the temporary shards are removed.
    * Shards are written by ``fastio.write_file``: straight from the tensors' memory, fsynced.
    * Weight files of an earlier export in the same directory that this one does not overwrite
      (``model.safetensors``, ``model-*-of-*.safetensors``, the index) are removed; no other file
      is touched. A failed write (disk full) names the file, directory and bytes, and removes
      the temporary ``.part-*`` files.
    * Files are written under temporary names and renamed at the end; an interrupted export
      never leaves a half-written ``model.safetensors`` behind.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import threading
from pathlib import Path
from typing import Dict, Iterable, Iterator, List, Optional, Tuple

import torch

from .fastio import Parts, write_file
from .format import INDEX, CheckpointError, Index, resolve_tag

_DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
           "fp32": torch.float32, "float32": torch.float32}
_SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
               "vocab.json", "merges.txt", "added_tokens.json", "generation_config.json", "chat_template.jinja")


def parse_size(size) -> int:
    """'5GB' / '500MB' / '10KiB' / 123 -> bytes."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*([\d.]+)\s*([KMGT]?I?B?)\s*", str(size).upper())
    if not m:
        raise ValueError(f"cannot read size {size!r}; write e.g. 5GB, 500MB or a number of bytes")
    number, unit = float(m.group(1)), m.group(2).rstrip("B")
    scale = {"": 1, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "KI": 1024, "MI": 1024**2, "GI": 1024**3, "TI": 1024**4}[unit]
    return int(number * scale)


def parse_dtype(dtype) -> Optional[torch.dtype]:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {sorted(_DTYPES)}")
    return _DTYPES[dtype]


class HFShardWriter:
    """Writes (name, tensor) pairs into size-bounded safetensors shards, HF-style."""

    def __init__(self, out_dir, max_shard_size="5GB", progress=None):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.max_bytes = parse_size(max_shard_size)
        self.current: Dict[str, torch.Tensor] = {}
        self.current_bytes = 0
        self.shards: List[Tuple[str, List[str]]] = []  # temp file name, tensor names
        self.total_bytes = 0
        self.progress = progress

    def add(self, name: str, tensor: "torch.Tensor | Parts") -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self.current and self.current_bytes + nbytes > self.max_bytes:
            self._flush()
        self.current[name] = tensor if isinstance(tensor, Parts) else tensor.detach().cpu().contiguous()
        self.current_bytes += nbytes
        self.total_bytes += nbytes
        if self.progress is not None:
            self.progress.update(nbytes)

    def _flush(self) -> None:
        if not self.current:
            return
        tmp = f".part-{len(self.shards):05d}.safetensors"
        try:
            write_file(self.out_dir / tmp, self.current, metadata={"format": "pt"}, hash_bytes=False)
        except Exception as exc:  # noqa: BLE001 - any I/O error of the write
            from .sharded import _as_os_error, _disk_error

            err = exc if isinstance(exc, OSError) else _as_os_error(exc)
            message = _disk_error(err, self.out_dir / tmp, self.current_bytes)  # before abort() resets it
            (self.out_dir / tmp).unlink(missing_ok=True)
            self.abort()
            raise CheckpointError(message) from None
        self.shards.append((tmp, list(self.current)))
        self.current, self.current_bytes = {}, 0

    def abort(self) -> None:
        """Remove the temporary shards written so far (an export that failed)."""
        for tmp, _ in self.shards:
            (self.out_dir / tmp).unlink(missing_ok=True)
        self.shards, self.current, self.current_bytes = [], {}, 0

    def flush(self) -> None:
        """Write the shard being assembled (``close`` then only renames)."""
        self._flush()

    def close(self) -> List[str]:
        self._flush()
        n = len(self.shards)
        final_names = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        remove_stale_weights(self.out_dir, keep=final_names)
        weight_map = {}
        for (tmp, names), final in zip(self.shards, final_names):
            os.replace(self.out_dir / tmp, self.out_dir / final)
            for name in names:
                weight_map[name] = final
        if n > 1:
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
            (self.out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        elif (self.out_dir / "model.safetensors.index.json").exists():
            (self.out_dir / "model.safetensors.index.json").unlink()
        return final_names


_OUR_WEIGHTS = re.compile(r"model(-\d{5}-of-\d{5})?\.safetensors|model\.safetensors\.index\.json")


def remove_stale_weights(out_dir: Path, keep: Iterable[str]) -> List[str]:
    """Delete the weight files of an earlier export in ``out_dir`` that this export does not
    overwrite (``model.safetensors``, ``model-*-of-*.safetensors``, their index), so
    ``from_pretrained`` cannot pick up stale weights. Only those names: other files stay."""
    keep = set(keep)
    removed = []
    for path in Path(out_dir).iterdir():
        if path.is_file() and path.name not in keep and _OUR_WEIGHTS.fullmatch(path.name):
            path.unlink()
            removed.append(path.name)
    return sorted(removed)


def _progress(total: int, desc: str, enabled: bool):
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        return None
    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024)


def _read_param(index: Index, reader, name: str, dtype: torch.dtype) -> "torch.Tensor | Parts":
    """Parameter ``name`` in ``dtype``: views of the mapped rank files when the reader gives
    them (``pieces``; a :class:`Parts` when it spans files, nothing copied unless the dtype
    changes), else one tensor read through ``reader.read``."""
    entry = index.params[name]
    if math.prod(entry.shape) != entry.numel:
        raise CheckpointError(
            f"{index.directory / INDEX}: parameter {name!r} has shape {list(entry.shape)} "
            f"({math.prod(entry.shape)} elements) but numel {entry.numel}; the index is corrupt"
        )
    kind = "master" if entry.trainable else "param"
    if entry.numel == 0:
        return torch.empty(entry.shape, dtype=dtype)
    if not hasattr(reader, "pieces"):  # e.g. DeepSpeed's files
        out = torch.empty(entry.numel, dtype=torch.float32)
        reader.read(entry.flat, kind, entry.offset, entry.numel, out)
        return out.view(entry.shape).to(dtype)
    parts = [p.to(dtype) for p in reader.pieces(entry.flat, kind, entry.offset, entry.numel)]
    return parts[0].view(entry.shape) if len(parts) == 1 else Parts(parts, shape=entry.shape)


class _BackgroundCheck:
    """The sha256 of what the export reads from every rank file (its export range, or the whole
    file), computed in a thread while the export is written (hashing and file I/O release the
    GIL); ``result()`` re-raises its CheckpointError."""

    def __init__(self, index: Optional[Index]):
        self._error: Optional[BaseException] = None
        self._thread = None
        if index is not None:
            self._thread = threading.Thread(target=self._run, args=(index,), name="hf_zero-verify", daemon=True)
            self._thread.start()

    def _run(self, index: Index) -> None:
        try:
            # through the page cache: the export reads the masters of the same files (mapped),
            # so each byte comes from the disk once for both readers
            index.check_export_ranges(direct=False)
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread
            self._error = exc

    def result(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            raise self._error


def consolidate(checkpoint_dir, out_dir, *, tag: Optional[str] = None, dtype=None, max_shard_size="5GB",
                progress: bool = True, verify: bool = True) -> List[str]:
    """Write the HF safetensors of a sharded checkpoint into ``out_dir``; returns the file names.

    ``dtype``: "bf16" | "fp16" | "fp32" (default: the dtype the model trained in). ``verify``:
    check every rank file's size and the sha256 of the bytes the export reads (its export range;
    the whole file where the index records none) against the index, before anything is renamed
    into place.
    """
    from .deepspeed_format import DeepSpeedIndex, DeepSpeedReader, open_deepspeed
    from .sharded import _SliceReader, name_dtype

    deepspeed = open_deepspeed(Path(checkpoint_dir), tag)  # DeepSpeed's files are read in place
    if deepspeed is not None:
        index, reader = DeepSpeedIndex(deepspeed), DeepSpeedReader(deepspeed)
        directory = index.directory
    else:
        directory = resolve_tag(Path(checkpoint_dir), tag)
        index = Index.read(directory)
        index.check_files(verify_hash=False)  # presence and sizes now; sha256 alongside the export
        reader = _SliceReader(index, mapped=True)  # the export passes views of the files on
    out_dtype = parse_dtype(dtype) or name_dtype(index.data["compute_dtype"])
    out_dir = Path(out_dir)
    if out_dir.resolve() == directory.resolve():
        raise CheckpointError(f"{out_dir}: write the export next to the checkpoint, not into it")
    total = sum(e.numel for e in index.params.values()) * torch.tensor([], dtype=out_dtype).element_size()
    bar = _progress(total, "consolidate", progress)
    writer = HFShardWriter(out_dir, max_shard_size, bar)
    all_aliases = bool(index.data.get("export_all_aliases", False))
    check = _BackgroundCheck(index if verify and deepspeed is None else None)
    try:
        for name in index.params:
            entry = index.params[name]
            value = _read_param(index, reader, name, out_dtype)
            for export in entry.aliases if all_aliases else (entry.export_name,):
                writer.add(export, value)  # fastio writes one tensor under several names as it is
        for name in index.data.get("buffers", []):
            writer.add(name, reader.buffer(name))
        writer.flush()
        check.result()  # a corrupt rank file raises here: nothing has been renamed into place yet
        files = writer.close()
    except BaseException:
        writer.abort()
        raise
    finally:
        if bar is not None:
            bar.close()
    for side in ("config.json",) + _SIDE_FILES:
        for src in (directory / side, directory.parent / side):
            if src.is_file():
                shutil.copyfile(src, out_dir / side)
                break
    if (out_dir / "config.json").is_file():
        _set_config_dtype(out_dir / "config.json", out_dtype)
    return files


def _set_config_dtype(path: Path, dtype: torch.dtype) -> None:
    cfg = json.loads(path.read_text())
    name = str(dtype).replace("torch.", "")
    for key in ("dtype", "torch_dtype"):
        if key in cfg:
            cfg[key] = name
    if "dtype" not in cfg and "torch_dtype" not in cfg:
        cfg["dtype"] = name
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True))


@torch.no_grad()
def save_pretrained(engine, out_dir, *, dtype=None, max_shard_size="5GB", progress: bool = False) -> List[str]:
    """Collective: write the engine's current weights as HF safetensors from rank 0, gathering one
    flat buffer at a time (peak memory: one unit in fp32 plus one output shard). A write that
    fails on rank 0 (disk full) keeps it in the gathers, then raises on every rank."""
    from .sharded import _agree, _export_names, _persistent_buffers, export_names_of

    out_dtype = parse_dtype(dtype) or engine.compute_dtype
    export = _export_names(engine.module)
    error = ""
    writer = None
    if engine.rank == 0:
        try:
            writer = HFShardWriter(out_dir, max_shard_size)
        except OSError as exc:
            error = f"{out_dir}: {exc.strerror or exc}"
    engine.flush_pending_update()
    for u in engine.units:
        for f in u.flats:
            full = engine.gather_fp32(f)  # every rank takes part, even after a failed write
            if writer is None or error:
                continue
            try:
                for i, p in enumerate(f.params):
                    name, aliases = export.get(id(p), (f.names[i], [f.names[i]]))
                    value = f.param_view(full, i).to(out_dtype)
                    for k, export_name in enumerate(export_names_of(engine.module, name, aliases)):
                        writer.add(export_name, value if k == 0 else value.clone())
            except (CheckpointError, OSError) as exc:
                error = str(exc)
    files: List[str] = []
    if writer is not None and not error:
        try:
            for name, b in _persistent_buffers(engine.module).items():
                writer.add(name, b)
            files = writer.close()
            config = getattr(engine.module, "config", None)
            if config is not None and hasattr(config, "save_pretrained"):
                config.save_pretrained(str(out_dir))
                _set_config_dtype(Path(out_dir) / "config.json", out_dtype)
            gen = getattr(engine.module, "generation_config", None)
            if gen is not None and hasattr(gen, "save_pretrained"):
                gen.save_pretrained(str(out_dir))
        except (CheckpointError, OSError) as exc:
            error = str(exc)
    if error and writer is not None:
        writer.abort()
    engine.comm.take_totals()
    _agree(engine, error, f"save_pretrained into {out_dir}")
    return files
