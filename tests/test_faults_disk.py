"""A disk that fills up (issue 13, item 7), on a real small tmpfs: ``save_checkpoint`` names the
file, the directory and the bytes needed and free, leaves no ``.partial-<tag>``, and the previous
checkpoint stays loadable; ``save_pretrained`` and ``hf-zero consolidate`` into a full disk fail
with the same facts (the command line: no traceback) and remove their hidden ``.part-*`` shards.

The tmpfs needs ``mount -t tmpfs`` (root, or a user namespace); where it is not permitted the
tests skip saying so, and ``tests/test_faults.py::test_failed_save_on_one_rank_raises_everywhere_
and_keeps_latest`` still covers the save path with an injected ``ENOSPC``."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import hf_zero
from hf_zero.checkpoint.format import CheckpointError, Index, resolve_tag
from models import build


@pytest.fixture
def small_fs(tmp_path):
    mnt = tmp_path / "small"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"mount -t tmpfs is not permitted here ({r.stderr.strip() or r.returncode})")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def fill(fs: Path, leave: int) -> Path:
    """Take all of ``fs``'s free space but ``leave`` bytes with one real file."""
    filler = fs / "filler"
    free = shutil.disk_usage(fs).free
    with open(filler, "wb") as f:
        f.write(b"\0" * max(0, free - leave))
    return filler


def _engine(seed=0):
    cfg = {"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": 2},
           "optimizer": {"type": "AdamW", "params": {"lr": 1e-2}}}
    return hf_zero.initialize(model=build("llama", seed=seed), config=cfg)[0]


def _step(engine, seed):
    ids = torch.randint(0, 96, (2, 8), generator=torch.Generator().manual_seed(seed))
    engine.backward(engine(input_ids=ids, labels=ids).loss)
    engine.step()


def test_save_into_a_full_tmpfs_names_the_facts_and_keeps_the_previous(small_fs):
    ck = small_fs / "ck"
    engine = _engine()
    _step(engine, 0)
    engine.save_checkpoint(ck)
    saved = {k: v.clone() for k, v in engine.full_state_dict().items()}
    _step(engine, 1)
    filler = fill(small_fs, leave=16 << 10)
    with pytest.raises(CheckpointError) as e:
        engine.save_checkpoint(ck)
    msg = str(e.value)
    assert "rank00000-of-00001.safetensors" in msg and "No space left on device" in msg, msg
    assert f"into {ck / '.partial-global_step2'}" in msg and "bytes free there" in msg, msg
    assert sorted(p.name for p in ck.iterdir()) == ["global_step1", "latest"]  # no .partial-*
    filler.unlink()
    Index.read(resolve_tag(ck, None)).check_files()  # sizes and sha256 of the previous checkpoint
    fresh = _engine(seed=1)
    path, _ = fresh.load_checkpoint(ck)
    assert path.name == "global_step1"
    for k, v in fresh.full_state_dict().items():
        assert torch.equal(v, saved[k]), k


def test_save_pretrained_into_a_full_tmpfs_leaves_no_part_files(small_fs, monkeypatch):
    from hf_zero.checkpoint.consolidate import HFShardWriter

    written, flush = [], HFShardWriter._flush

    def counting_flush(self):
        flush(self)
        written.append(self.shards[-1][0])

    monkeypatch.setattr(HFShardWriter, "_flush", counting_flush)
    engine = _engine()
    fill(small_fs, leave=24 << 10)  # room for one small shard, not the rest
    out = small_fs / "export"
    with pytest.raises(CheckpointError) as e:
        engine.save_pretrained(out, max_shard_size="20KB")
    msg = str(e.value)
    assert "No space left on device" in msg and str(out) in msg and "bytes free there" in msg, msg
    assert re.search(r"writing [1-9]\d* bytes into", msg), msg
    assert written == [".part-00000.safetensors"]  # one shard landed before the disk was full ...
    assert not [p.name for p in out.iterdir() if p.name.startswith(".part-")]  # ... and is gone


def test_consolidate_into_a_full_tmpfs_is_a_clear_error(small_fs, tmp_path):
    engine = _engine()
    _step(engine, 0)
    engine.save_checkpoint(tmp_path / "ck")
    fill(small_fs, leave=24 << 10)
    out = small_fs / "export"
    cli = [sys.executable, "-c", "import sys; from hf_zero.cli import main; sys.exit(main())"]
    r = subprocess.run(cli + ["consolidate", str(tmp_path / "ck"), str(out), "--max-shard-size", "20KB", "--quiet"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr, r.stderr
    assert "hf-zero consolidate: error:" in r.stderr and "No space left on device" in r.stderr, r.stderr
    assert str(out) in r.stderr and "bytes free there" in r.stderr, r.stderr
    assert re.search(r"\.part-0000[1-9]\.safetensors: No space", r.stderr), r.stderr  # a later shard failed
    assert not [p.name for p in out.iterdir() if p.name.startswith(".part-")], sorted(os.listdir(out))
