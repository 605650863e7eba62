"""What a directory handed to ``load_checkpoint`` / ``consolidate`` is, judged from file names.

Note:
    * Only names and sizes are looked at (plus DeepSpeed's plain-text ``latest`` file): telling
      what a directory is never unpickles or loads anything.
    * Kinds: ``hf_zero`` (``index.json``, or a ``latest`` pointer to a directory with one),
      ``deepspeed`` (``<tag>/*_optim_states.pt`` + ``*_model_states.pt``, directly, under a
      ``latest`` file, or inside a Trainer ``checkpoint-N/``), ``trainer`` (a stock Trainer
      ``checkpoint-N/``: weights + ``optimizer.pt``), ``hf_model`` (``config.json`` + weights, no
      optimizer), ``trainer_output`` (a directory of ``checkpoint-N/`` subdirectories), or
      ``unknown``.
    * :func:`describe` turns a kind into the sentence the errors use: what the directory is and
      what to run instead.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Tuple

_DS_OPTIM = re.compile(r"(?:(?:bf16|fp16)_)?zero_pp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt")
_DS_MODEL3 = re.compile(r"zero_pp_rank_(\d+)_mp_rank_(\d+)_model_states\.pt")
_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


@dataclass(frozen=True)
class Detected:
    """What a directory is. ``directory`` is where the files of that kind are (for DeepSpeed, the
    ``global_stepN`` directory); ``world_size`` / ``stage`` are known for DeepSpeed only
    (``stage`` is 3, or None for "1 or 2": those two share a layout, told apart inside the files)."""

    kind: str
    directory: Path
    world_size: Optional[int] = None
    stage: Optional[int] = None
    weights: Optional[str] = None


def _read_latest(path: Path) -> Optional[str]:
    """A ``latest`` file's tag if it is short plain text naming a subdirectory, else None."""
    try:
        if path.stat().st_size > 4096:
            return None
        tag = path.read_bytes().decode("utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return None
    if not tag or "/" in tag or "\\" in tag or tag in (".", ".."):
        return None
    return tag


def deepspeed_layout(directory: Path) -> Optional[Tuple[int, Optional[int]]]:
    """(world size, stage or None) when ``directory`` holds one DeepSpeed tag's files."""
    if not directory.is_dir():
        return None
    names = [p.name for p in directory.iterdir()]
    optim = [m for m in (_DS_OPTIM.fullmatch(n) for n in names) if m]
    if not optim:
        return None
    model3 = [n for n in names if _DS_MODEL3.fullmatch(n)]
    world = len({m.group(1) for m in optim})
    if model3:
        return world, 3
    if "mp_rank_00_model_states.pt" in names:
        return world, None
    return None


def detect(path) -> Detected:
    """Classify ``path`` (see the module note)."""
    path = Path(path)
    if not path.is_dir():
        return Detected("missing", path)
    if (path / "index.json").is_file():
        return Detected("hf_zero", path)
    here = deepspeed_layout(path)
    if here is not None:
        return Detected("deepspeed", path, world_size=here[0], stage=here[1])
    latest = path / "latest"
    if latest.is_file():
        tag = _read_latest(latest)
        if tag is not None:
            target = path / tag
            if (target / "index.json").is_file():
                return Detected("hf_zero", target)
            found = deepspeed_layout(target)
            if found is not None:
                return Detected("deepspeed", target, world_size=found[0], stage=found[1])
    # a DeepSpeed tag directory without a (readable) latest file, e.g. inside a Trainer checkpoint
    tags = sorted((p for p in path.glob("global_step*") if p.is_dir()), key=lambda p: _step_of(p.name))
    for t in reversed(tags):
        found = deepspeed_layout(t)
        if found is not None:
            return Detected("deepspeed", t, world_size=found[0], stage=found[1])
    weights = next((w for w in _WEIGHTS if (path / w).is_file()), None)
    if weights is not None and (path / "optimizer.pt").is_file():
        return Detected("trainer", path, weights=weights)
    if weights is not None and (path / "config.json").is_file():
        return Detected("hf_model", path, weights=weights)
    if any(p.is_dir() and re.fullmatch(r"checkpoint-\d+", p.name) for p in path.iterdir()):
        return Detected("trainer_output", path)
    return Detected("unknown", path)


def _step_of(name: str) -> int:
    m = re.search(r"(\d+)$", name)
    return int(m.group(1)) if m else -1


def describe(found: Detected) -> str:
    """One sentence: what the directory is, and what to do with it in hf_zero."""
    d = found.directory
    if found.kind == "deepspeed":
        stage = f"stage-{found.stage}" if found.stage else "stage-1/2"
        return (f"{d}: a DeepSpeed {stage} checkpoint of world size {found.world_size}; resume it with "
                f"engine.load_checkpoint({str(d.parent)!r}) (any world size and stage), export it with "
                f"`hf-zero consolidate {d.parent} OUT`, or turn it into an hf_zero checkpoint with "
                f"`hf-zero convert {d.parent} OUT`")
    if found.kind == "trainer":
        return (f"{d}: a stock Trainer checkpoint ({found.weights} + optimizer.pt), not an hf_zero checkpoint; "
                "resume it under hf_zero with ZeroTrainer.train(resume_from_checkpoint=...) or "
                "hf_zero.checkpoint.trainer_format.load_trainer_checkpoint(engine, dir, group_names), which read its weights, "
                "optimizer and scheduler state")
    if found.kind == "hf_model":
        return (f"{d}: an HF model directory ({found.weights} + config.json, no optimizer state), not a "
                f"checkpoint to resume; start from its weights with hf_zero.from_pretrained(cls, {str(d)!r}) "
                "or from_pretrained(...) before hf_zero.initialize")
    if found.kind == "trainer_output":
        subs = sorted((p.name for p in d.iterdir() if p.is_dir() and re.fullmatch(r"checkpoint-\d+", p.name)),
                      key=_step_of)
        return (f"{d}: a Trainer output directory, not one checkpoint; pass one of its checkpoints, "
                f"e.g. {d / subs[-1]} (the newest)")
    if found.kind == "missing":
        return f"{d}: no such directory"
    if found.kind == "hf_zero":
        return f"{d}: an hf_zero checkpoint"
    listing = sorted(p.name for p in d.iterdir())[:8]
    return (f"{d}: neither a checkpoint (index.json) nor a directory of them (latest pointer), nor a DeepSpeed "
            f"(*_optim_states.pt) or Trainer (optimizer.pt) checkpoint; it holds {listing or 'nothing'}; pass "
            "the directory engine.save_checkpoint wrote, or its parent with the 'latest' pointer")
