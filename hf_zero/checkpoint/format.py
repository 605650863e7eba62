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
    * A rank file's entries are ordered so that those an export reads (``<flat>.master``,
      ``<flat>.param``, ``buffer.<name>``: :func:`in_export_range`) come first, right after the
      header; the index records that leading range as ``"export": {"bytes": N, "sha256": ...}``
      beside the file's size and sha256 (the header and those entries, with any wider entry
      moved there to keep every tensor aligned; see ``fastio``). Optional: an index without it
      (written before it existed) is read as before.
    * ``check_files`` verifies whole files (``load_checkpoint``: it uses every byte);
      ``check_export_ranges`` (``consolidate``) hashes only each file's export range, after its
      header (inside that range) shows that every entry the export reads lies inside it too;
      a file without the field, or whose export would read past it, is hashed whole. An export
      therefore never uses a byte that no digest covers.
    * A checkpoint directory is complete iff it has ``index.json``: the index is written last,
      inside a temporary directory that is then renamed into place.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Set, Tuple

FORMAT = "hf_zero.checkpoint/1"
INDEX = "index.json"
LATEST = "latest"
EXPORT = "export"  # a file entry's {"bytes", "sha256"} of its leading export range


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


def hash_file(path: Path, direct: Optional[bool] = None, length: Optional[int] = None) -> str:
    """sha256 of a file (of its first ``length`` bytes), the next chunk read while the last is
    hashed (see fastio; ``direct`` False reads through the page cache, so that other readers of
    the file share the pages)."""
    from .fastio import hash_file as pipelined

    return pipelined(path, direct=direct, length=length)


def in_export_range(entry: str) -> bool:
    """Whether a rank file's entry is one an export reads: a master shard, a frozen parameter's
    shard or a buffer (not optimizer states, not RNG states)."""
    if entry.startswith("buffer."):
        return True
    return entry.endswith((".master", ".param")) and ".state." not in entry


def _inside(path: Path, entries: Iterable[str], limit: int) -> bool:
    """Whether the safetensors header of ``path`` lies within its first ``limit`` bytes and
    places every one of ``entries`` there too (False for a header that cannot be parsed, or
    that lacks one of them)."""
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return False
        (n,) = struct.unpack("<Q", head)
        if 8 + n > limit:
            return False
        try:
            header = json.loads(f.read(n))
        except (ValueError, UnicodeDecodeError):
            return False
    if not isinstance(header, dict):
        return False
    for name in entries:
        try:
            start, end = header[name]["data_offsets"]
        except (KeyError, TypeError, ValueError):
            return False
        if not (isinstance(start, int) and isinstance(end, int) and 0 <= start <= end and 8 + n + end <= limit):
            return False
    return True


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
            for name, meta in self.files.items():
                export = meta.get(EXPORT)
                if export is not None and not (isinstance(export.get("bytes"), int) and isinstance(export.get("sha256"), str)
                                               and 8 <= export["bytes"] <= int(meta["size"])):
                    raise ValueError(f"file {name}: {EXPORT!r} is {export!r}, not a byte count (at most the "
                                     f"file's {meta['size']}) and a sha256")
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

    def export_entries(self) -> Dict[str, Set[str]]:
        """Per rank file, the entries an export reads: the master (frozen: param) shard of every
        flat holding an element of some parameter there, and rank 0's buffers."""
        out: Dict[str, Set[str]] = {name: set() for name in self.files}
        for p in self.params.values():
            if p.numel == 0:
                continue
            flat = self.flats[p.flat]
            first, last = self.owner(flat, p.offset)[0], self.owner(flat, p.offset + p.numel - 1)[0]
            for r in range(first, last + 1):
                out.setdefault(rank_file(r, self.world_size), set()).add(
                    f"{p.flat}.{'master' if p.trainable else 'param'}")
        for name in self.data.get("buffers", []):
            out[rank_file(0, self.world_size)].add(f"buffer.{name}")
        return out

    def check_export_ranges(self, direct: Optional[bool] = False) -> None:
        """Verify what an export reads (``consolidate``): each file's presence and size, then the
        sha256 of its export range alone where the index records one and the file's header
        (inside that range) places every entry the export reads inside it too; otherwise the
        sha256 of the whole file. ``direct`` False (default): through the page cache, which the
        export's own reads of the same pages then hit. Raise CheckpointError naming the file."""
        for name, entries in self.export_entries().items():
            path = self.directory / name
            if name not in self.files:
                raise CheckpointError(f"{path}: the export reads {sorted(entries)} from it, but the index "
                                      f"does not list it (corrupt index?)")
            self.check_files([name], verify_hash=False)
            export = self.files[name].get(EXPORT)
            if export is not None and _inside(path, entries, export["bytes"]):
                if hash_file(path, direct, length=export["bytes"]) != export["sha256"]:
                    raise CheckpointError(f"{path}: sha256 of its first {export['bytes']} bytes (the entries an "
                                          "export reads) differs from the index (the file was altered or corrupted)")
            else:
                self.check_files([name], verify_hash=True, direct=direct)


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
