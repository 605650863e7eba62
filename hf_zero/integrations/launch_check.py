"""Start-up check: did the launcher start as many processes as it was asked for?

Note:
    ``accelerate launch --cpu --num_processes 2 train.py`` starts ONE process and sets no
    variable that says two were wanted (accelerate 1.15): the run then trains, unsharded, on half
    the intended global batch, and nothing fails. The launcher's request is therefore read, in
    order, from ``ACCELERATE_NUM_PROCESSES``, ``WORLD_SIZE``, and finally from the command line of
    the parent process when it is ``accelerate launch`` (its ``--num_processes`` flag, or the
    ``num_processes`` of its ``--config_file``). Linux only for the last source; elsewhere the
    check relies on the variables.
"""

from __future__ import annotations

import os
from typing import Mapping, Optional, Sequence, Tuple

ADVICE = (
    "`accelerate launch --cpu --num_processes N` starts a single process. For N CPU processes launch with "
    "`ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes N train.py` "
    "(or `accelerate launch --config_file recipes/accelerate/cpu_2proc.yaml train.py`), "
    "or with `torchrun --nproc_per_node N train.py`."
)


def _parent_cmdline() -> Optional[Sequence[str]]:
    try:
        with open(f"/proc/{os.getppid()}/cmdline", "rb") as fh:
            raw = fh.read()
    except OSError:
        return None
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def _flag(argv: Sequence[str], names: Sequence[str]) -> Optional[str]:
    for i, arg in enumerate(argv):
        for name in names:
            if arg == name and i + 1 < len(argv):
                return argv[i + 1]
            if arg.startswith(name + "="):
                return arg.split("=", 1)[1]
    return None


def _from_accelerate_cmdline(argv: Sequence[str]) -> Optional[int]:
    """``num_processes`` requested by an ``accelerate launch ...`` command line, if any."""
    try:
        at = next(i for i, a in enumerate(argv[:4]) if os.path.basename(a) in ("accelerate", "accelerate-launch"))
    except StopIteration:
        return None
    rest = list(argv[at + 1 :])
    if rest and rest[0] == "launch":
        rest = rest[1:]
    value = _flag(rest, ("--num_processes", "--num-processes"))
    if value is None:
        path = _flag(rest, ("--config_file", "--config-file"))
        if path:
            try:
                import yaml

                with open(path, encoding="utf-8") as fh:
                    value = (yaml.safe_load(fh) or {}).get("num_processes")
            except Exception:  # unreadable config: the launcher itself will have complained
                value = None
    try:
        return int(value) if value is not None else None
    except (TypeError, ValueError):
        return None


def expected_world_size(env: Optional[Mapping[str, str]] = None,
                        parent_cmdline: Optional[Sequence[str]] = ()) -> Tuple[Optional[int], str]:
    """``(processes the launcher asked for, where that number came from)``; ``(None, "")`` if unknown.

    ``parent_cmdline=()`` reads the real parent process; pass ``None`` to skip that source.
    """
    env = os.environ if env is None else env
    for var in ("ACCELERATE_NUM_PROCESSES", "WORLD_SIZE"):
        if env.get(var):
            try:
                return int(env[var]), f"{var}={env[var]}"
            except ValueError:
                pass
    argv = _parent_cmdline() if parent_cmdline == () else parent_cmdline
    if argv:
        n = _from_accelerate_cmdline(argv)
        if n is not None:
            return n, "the parent process `" + " ".join(argv[:8]) + "`"
    return None, ""


def check_world_size(actual: int, env: Optional[Mapping[str, str]] = None,
                     parent_cmdline: Optional[Sequence[str]] = ()) -> None:
    """Raise ``RuntimeError`` when ``actual`` processes joined but the launcher asked for another number."""
    expected, source = expected_world_size(env, parent_cmdline)
    if expected is not None and expected != actual:
        raise RuntimeError(
            f"the launcher asked for {expected} processes ({source}) but this run has a world size of {actual}. "
            + ADVICE
        )
