"""Export standard Hugging Face safetensors: offline from a sharded checkpoint, or live from an
engine at save time.

Note:
    * Output: ``model.safetensors``, or ``model-0000k-of-0000n.safetensors`` plus
      ``model.safetensors.index.json`` when it exceeds ``max_shard_size``; with ``config.json``
      (and, offline, any tokenizer / generation files found beside the checkpoint).
    * Peak memory is one output shard plus one tensor: tensors are assembled one at a time from
      the ranks' slices and flushed as soon as the shard is full; a tensor larger than
      ``max_shard_size`` gets a shard of its own.
    * Tied weights are written once, under the name ``save_pretrained`` keeps, so
      ``from_pretrained`` re-ties them.
    * Files are written under temporary names and renamed at the end; an interrupted export
      never leaves a half-written ``model.safetensors`` behind.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Dict, Iterable, Iterator, List, Optional, Tuple

import torch
from safetensors.torch import save_file

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

    def add(self, name: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self.current and self.current_bytes + nbytes > self.max_bytes:
            self._flush()
        self.current[name] = tensor.detach().cpu().contiguous()
        self.current_bytes += nbytes
        self.total_bytes += nbytes
        if self.progress is not None:
            self.progress.update(nbytes)

    def _flush(self) -> None:
        if not self.current:
            return
        tmp = f".part-{len(self.shards):05d}.safetensors"
        save_file(self.current, str(self.out_dir / tmp), metadata={"format": "pt"})
        self.shards.append((tmp, list(self.current)))
        self.current, self.current_bytes = {}, 0

    def close(self) -> List[str]:
        self._flush()
        n = len(self.shards)
        final_names = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
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


def _progress(total: int, desc: str, enabled: bool):
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        return None
    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024)


def _read_param(index: Index, reader, name: str) -> torch.Tensor:
    entry = index.params[name]
    out = torch.empty(entry.numel, dtype=torch.float32)
    reader.read(entry.flat, "master" if entry.trainable else "param", entry.offset, entry.numel, out)
    return out.view(entry.shape)


def consolidate(checkpoint_dir, out_dir, *, tag: Optional[str] = None, dtype=None, max_shard_size="5GB",
                progress: bool = True) -> List[str]:
    """Write the HF safetensors of a sharded checkpoint into ``out_dir``; returns the file names.

    ``dtype``: "bf16" | "fp16" | "fp32" (default: the dtype the model trained in).
    """
    from .sharded import _SliceReader, name_dtype

    directory = resolve_tag(Path(checkpoint_dir), tag)
    index = Index.read(directory)
    index.check_files(verify_hash=False)
    out_dtype = parse_dtype(dtype) or name_dtype(index.data["compute_dtype"])
    out_dir = Path(out_dir)
    if out_dir.resolve() == directory.resolve():
        raise CheckpointError(f"{out_dir}: write the export next to the checkpoint, not into it")
    reader = _SliceReader(index)
    total = sum(e.numel for e in index.params.values()) * torch.tensor([], dtype=out_dtype).element_size()
    bar = _progress(total, "consolidate", progress)
    writer = HFShardWriter(out_dir, max_shard_size, bar)
    try:
        for name in index.params:
            entry = index.params[name]
            writer.add(entry.export_name, _read_param(index, reader, name).to(out_dtype))
        for name in index.data.get("buffers", []):
            writer.add(name, reader._file(0).get_tensor(f"buffer.{name}"))
        files = writer.close()
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
    flat buffer at a time (peak memory: one unit in fp32 plus one output shard)."""
    from .sharded import _export_names, _persistent_buffers

    out_dtype = parse_dtype(dtype) or engine.compute_dtype
    export = _export_names(engine.module)
    writer = HFShardWriter(out_dir, max_shard_size) if engine.rank == 0 else None
    engine.flush_pending_update()
    for u in engine.units:
        for f in u.flats:
            full = engine.gather_fp32(f)
            if writer is not None:
                for i, p in enumerate(f.params):
                    name = export.get(id(p), (f.names[i],))[0]
                    writer.add(name, f.param_view(full, i).to(out_dtype))
    files: List[str] = []
    if writer is not None:
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
    engine.comm.take_totals()
    engine.comm.barrier()
    return files
