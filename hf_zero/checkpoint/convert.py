"""``hf-zero convert``: write a DeepSpeed ZeRO checkpoint as an hf_zero sharded checkpoint.

Note:
    * Output: ``<out>/<tag>/`` (tag: DeepSpeed's, e.g. ``global_step3``) with ``index.json`` and
      ``ranks`` rank files (default: the DeepSpeed run's world size), plus ``<out>/latest``. It
      resumes like any hf_zero checkpoint, at any world size and stage.
    * Layout: one flat per DeepSpeed optimizer group (its parameters end to end, as DeepSpeed
      groups them), cut into ``ranks`` equal shards; rank file r holds shard r of the fp32
      masters and of every optimizer state. Each rank file is assembled on its own, so host
      memory is one rank file (model states / ``ranks``), never the model.
    * The scheduler state is stored as DeepSpeed's (``{"__deepspeed__": ...}``) when its
      translation depends on the resuming engine's scheduler (DeepSpeed's ``WarmupLR`` family);
      ``load_checkpoint`` translates it then (:func:`deepspeed_format.translate_scheduler`).
    * Atomic as ``save_checkpoint``: written into ``.partial-<tag>``, renamed, then ``latest``.
"""

from __future__ import annotations

import math
import os
import shutil
from pathlib import Path
from typing import Dict, List, Optional

import torch

from .detect import describe, detect
from .format import FORMAT, INDEX, LATEST, CheckpointError, fsync_path, rank_file, write_json_atomic


def convert(ds_dir, out_dir, *, tag: Optional[str] = None, ranks: Optional[int] = None) -> Path:
    """Write the DeepSpeed checkpoint at ``ds_dir`` as an hf_zero checkpoint under ``out_dir``;
    returns the checkpoint directory."""
    from .deepspeed_format import DeepSpeedIndex, open_deepspeed
    from .sharded import _json_safe, _write_rank_file

    ck = open_deepspeed(Path(ds_dir), tag)
    if ck is None:
        found = detect(Path(ds_dir) / tag if tag else Path(ds_dir))
        raise CheckpointError(describe(found) if found.kind != "hf_zero" else
                              f"{found.directory}: already an hf_zero checkpoint; nothing to convert")
    view = DeepSpeedIndex(ck)
    world = int(ranks or ck.world_size)
    if world < 1:
        raise CheckpointError(f"ranks={world}: write at least one rank file")
    out_dir = Path(out_dir)
    name = ck.directory.name
    if out_dir.resolve() in (ck.directory.resolve(), ck.directory.parent.resolve()):
        raise CheckpointError(f"{out_dir}: write the conversion next to the DeepSpeed checkpoint, not into it")

    # one flat per DeepSpeed group, its parameters end to end
    flats: Dict[str, dict] = {}
    params: Dict[str, dict] = {}
    members: Dict[str, List[tuple]] = {}
    for g, shapes in enumerate(ck.group_shapes):
        key = f"g{g}"
        off = 0
        members[key] = []
        for pname, shape in shapes.items():
            n = int(math.prod(shape))
            e = view.params[pname]
            params[pname] = {"flat": key, "offset": off, "numel": n, "shape": list(shape), "dtype": e.dtype,
                             "trainable": True, "aliases": list(e.aliases), "export_name": pname}
            members[key].append((pname, off, n))
            off += n
        shard = max(1, -(-off // world))
        flats[key] = {"padded_numel": shard * world, "shard_numel": shard, "shard_world": world,
                      "dtype": "float32", "trainable": True}
    state_keys = ck.state_keys()

    out_dir.mkdir(parents=True, exist_ok=True)
    partial = out_dir / f".partial-{name}"
    final = out_dir / name
    if partial.exists():
        shutil.rmtree(partial)
    partial.mkdir()
    try:
        files = {}
        for r in range(world):
            tensors: Dict[str, torch.Tensor] = {}
            for key, flat in flats.items():
                lo, hi = r * flat["shard_numel"], (r + 1) * flat["shard_numel"]
                for kind in ["master"] + [f"state.{k}" for k in state_keys]:
                    buf = torch.zeros(flat["shard_numel"], dtype=torch.float32)
                    for pname, off, n in members[key]:
                        a, b = max(lo, off), min(hi, off + n)
                        if a < b:
                            src = "master" if kind == "master" else kind[len("state."):]
                            ck.read(pname, src, a - off, b - a, buf[a - lo:b - lo])
                    tensors[f"{key}.{kind}"] = buf
            if r == 0:
                for bname, b in ck.buffers().items():
                    tensors[f"buffer.{bname}"] = b.detach().clone().contiguous()
            fname = rank_file(r, world)
            files[fname] = _write_rank_file(partial / fname, tensors)  # with its export range
            del tensors
        ds_sched = ck.model_states.get("lr_scheduler")
        data = view.data
        index = {
            "format": FORMAT,
            "stage": ck.stage,
            "world_size": world,
            "global_steps": data["global_steps"],
            "micro_steps": data["micro_steps"],
            "gradient_accumulation_steps": data["gradient_accumulation_steps"],
            "skipped_steps": data["skipped_steps"],
            "compute_dtype": data["compute_dtype"],
            "export_all_aliases": False,
            "flats": flats,
            "params": params,
            "buffers": data["buffers"],
            "files": files,
            "rng": [],
            "optimizer": {"class": "DeepSpeed ZeRO (converted)",
                          "param_groups": _json_safe(data["optimizer"]["param_groups"]),
                          "scalar_states": data["optimizer"]["scalar_states"]},
            "lr_scheduler": (None if ds_sched is None else
                             {"__deepspeed__": _json_safe(ds_sched)} if set(ds_sched) == {"last_batch_iteration"}
                             else _json_safe(ds_sched)),
            "loss_scaler": data["loss_scaler"],
            "dataloader": None,
            "client_state": _json_safe(data["client_state"]),
            "zero_config": _json_safe(ck.config()),
            "converted_from": str(ck.directory),
        }
        for side in ("config.json",):
            for src in (ck.directory / side, ck.directory.parent / side):
                if src.is_file():
                    shutil.copyfile(src, partial / side)
                    break
        write_json_atomic(partial / INDEX, index)
        fsync_path(partial)
        if final.exists():
            shutil.rmtree(final)
        os.rename(partial, final)
        tmp = out_dir / f".{LATEST}.tmp"
        tmp.write_text(name)
        os.replace(tmp, out_dir / LATEST)
        fsync_path(out_dir)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return final
