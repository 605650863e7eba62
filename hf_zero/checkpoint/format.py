"""The on-disk format of a sharded hf_zero checkpoint, and its validation.

Layout of one checkpoint (``<save_dir>/<tag>/``)::

    index.json                          everything but tensors (see below)
    rank00000-of-00002.safetensors      rank 0's shards: "<flat>.master", "<flat>.state.<key>",
    rank00001-of-00002.safetensors      "<flat>.param" (frozen), "rng.torch", "rng.cuda"
    config.json                         the model's Hugging Face config, when it has one

``<save_dir>/latest`` holds the tag of the newest complete checkpoint.

Note:
    * No pickle anywhere: tensors are safetensors, everything else JSON. Loading never runs code.
    * ``index.json`` maps every parameter to its flat buffer and offset; a flat buffer's
      elements ``[r*S, (r+1)*S)`` live in rank r's file (``S = shard_numel``; a flat with
      ``shard_world`` 1 lives in rank 0's file alone). So any rank of any new world size can
      find, and read with ``get_slice``, exactly the elements it needs.
    * The index lists every rank file with its size and sha256; a file that is missing,
      truncated or altered is an error that names it, raised before any state is changed.
    * A checkpoint directory is complete iff it has ``index.json``: the index is written last,
      inside a temporary directory that is then renamed into place.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

FORMAT = "hf_zero.checkpoint/1"
INDEX = "index.json"
LATEST = "latest"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used as asked; the message names the file."""


def rank_file(rank: int, world: int) -> str:
    return f"rank{rank:05d}-of-{world:05d}.safetensors"


def sha256_of(path: Path, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def hash_file(path: Path, direct: Optional[bool] = None) -> str:
    """sha256 of a file, the next chunk read while the last is hashed (see fastio; ``direct``
    False reads through the page cache, so that other readers of the file share the pages)."""
    from .fastio import hash_file as pipelined

    return pipelined(path, direct=direct)


def fsync_path(path: Path) -> None:
    fd = os.open(str(path), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomic(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=False)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


@dataclass(frozen=True)
class ParamEntry:
    name: str
    flat: str
    offset: int
    numel: int
    shape: Tuple[int, ...]
    dtype: str  # the model's compute dtype for this parameter
    trainable: bool
    aliases: Tuple[str, ...]
    export_name: str


@dataclass(frozen=True)
class FlatEntry:
    key: str
    padded_numel: int
    shard_numel: int
    shard_world: int
    dtype: str
    trainable: bool


class Index:
    """A parsed ``index.json``."""

    def __init__(self, data: dict, directory: Path):
        self.data = data
        self.directory = directory
        if data.get("format") != FORMAT:
            raise CheckpointError(
                f"{directory / INDEX}: format {data.get('format')!r} is not {FORMAT!r}; "
                "this is not an hf_zero checkpoint of a version this code reads"
            )
        where = directory / INDEX
        try:
            self.world_size: int = int(data["world_size"])
            self.stage: int = int(data["stage"])
            self.flats: Dict[str, FlatEntry] = {k: FlatEntry(key=k, **v) for k, v in data["flats"].items()}
            self.params: Dict[str, ParamEntry] = {}
            for name, v in data["params"].items():
                v = dict(v)
                v["shape"] = tuple(v["shape"])
                v["aliases"] = tuple(v["aliases"])
                self.params[name] = ParamEntry(name=name, **v)
            self.files: Dict[str, dict] = dict(data["files"])
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise CheckpointError(f"{where}: corrupt index (a field is missing or malformed: "
                                  f"{type(exc).__name__}: {exc})") from None
        self._check_layout(where)

    def _check_layout(self, where: Path) -> None:
        """The index must describe a consistent layout: its rank files are those of its world
        size, every flat splits into whole shards, every parameter lies inside its flat."""
        expected = {rank_file(r, self.world_size) for r in range(self.world_size)}
        if self.world_size < 1 or not set(self.files) <= expected or rank_file(0, self.world_size) not in self.files:
            raise CheckpointError(
                f"{where}: corrupt index: world_size {self.world_size} does not match its file list "
                f"{sorted(self.files)} (expected names like {rank_file(0, max(1, self.world_size))})"
            )
        for f in self.flats.values():
            if f.shard_world < 1 or f.shard_numel * f.shard_world != f.padded_numel or f.shard_world > self.world_size:
                raise CheckpointError(
                    f"{where}: corrupt index: flat {f.key!r} has padded_numel {f.padded_numel} != "
                    f"shard_numel {f.shard_numel} x shard_world {f.shard_world} (world size {self.world_size})"
                )
        for p in self.params.values():
            flat = self.flats.get(p.flat)
            if flat is None:
                raise CheckpointError(f"{where}: corrupt index: parameter {p.name!r} is in flat {p.flat!r}, "
                                      "which the index does not describe")
            if p.offset < 0 or p.numel < 0 or p.offset + p.numel > flat.padded_numel:
                raise CheckpointError(
                    f"{where}: corrupt index: parameter {p.name!r} spans elements [{p.offset}, "
                    f"{p.offset + p.numel}) of flat {p.flat!r}, which has {flat.padded_numel}"
                )

    @classmethod
    def read(cls, directory: Path) -> "Index":
        directory = Path(directory)
        path = directory / INDEX
        if not directory.is_dir():
            raise CheckpointError(f"{directory}: no such checkpoint directory")
        if not path.is_file():
            from .detect import describe, detect

            found = detect(directory)
            if found.kind not in ("unknown", "hf_zero"):
                raise CheckpointError(describe(found))
            raise CheckpointError(
                f"{directory}: not an hf_zero checkpoint (no {INDEX}); an interrupted save leaves a "
                "'.partial-*' directory without one, which is never loaded"
            )
        try:
            data = json.loads(path.read_bytes().decode("utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"{path}: corrupt index, not JSON text ({exc})") from None
        if not isinstance(data, dict):
            raise CheckpointError(f"{path}: corrupt index: a JSON {type(data).__name__} where an object is expected")
        return cls(data, directory)

    def owner(self, flat: FlatEntry, element: int) -> Tuple[int, int]:
        """(rank file, position in it) of element ``element`` of ``flat``."""
        q = element // flat.shard_numel
        return q, element - q * flat.shard_numel

    def check_files(self, which: Optional[List[str]] = None, verify_hash: bool = True,
                    direct: Optional[bool] = None) -> None:
        """Raise CheckpointError naming the first missing, truncated or altered file."""
        for name, meta in self.files.items():
            if which is not None and name not in which:
                continue
            path = self.directory / name
            if not path.is_file():
                raise CheckpointError(f"{path}: missing (the index lists it; was a rank's file lost?)")
            size = path.stat().st_size
            if size != meta["size"]:
                raise CheckpointError(f"{path}: {size} bytes on disk, the index says {meta['size']} (truncated?)")
            if verify_hash and hash_file(path, direct) != meta["sha256"]:
                raise CheckpointError(f"{path}: sha256 differs from the index (the file was altered or corrupted)")


def resolve_tag(load_dir: Path, tag: Optional[str]) -> Path:
    """The checkpoint directory for ``tag``, or for the ``latest`` pointer, or ``load_dir``
    itself when it is a checkpoint."""
    load_dir = Path(load_dir)
    if tag is not None:
        return load_dir / tag
    if (load_dir / INDEX).is_file():
        return load_dir
    latest = load_dir / LATEST
    if latest.is_file():
        try:
            tag = latest.read_bytes().decode("utf-8").strip()
        except UnicodeDecodeError:
            raise CheckpointError(f"{latest}: not a tag (binary content); write the tag of a checkpoint into it") from None
        if not tag or "/" in tag or "\\" in tag or tag in (".", "..") or tag.startswith("."):
            raise CheckpointError(
                f"{latest}: points to {tag!r}, which is not a checkpoint directory inside {load_dir}; "
                "the pointer must hold a plain tag name (refusing to follow it)"
            )
        return load_dir / tag
    if not load_dir.exists():
        raise CheckpointError(f"{load_dir}: no such directory")
    from .detect import describe, detect

    raise CheckpointError(describe(detect(load_dir)))  # what it is instead, and what to run
