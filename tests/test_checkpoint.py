"""Sharded checkpoints: exact resume at the same and other world sizes and stages, atomic save,
Hugging Face export, and bad input. Real gloo processes; the losses of a run that never stopped
are the reference."""

from __future__ import annotations

import hashlib
import json
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import hf_zero
from hf_zero.checkpoint import CheckpointError, consolidate
from hf_zero.checkpoint.format import Index, resolve_tag
from launch import launch
from models import batches, build

S = "checkpoint_scenarios:train"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    ck = root / "ckpt"
    out = {}
    out["full"] = launch(2, S, {"stage": 2, "start": 0, "stop": 6}, root / "l_full")[0]
    out["part1"] = launch(2, S, {"stage": 2, "start": 0, "stop": 3, "save": str(ck), "export": str(root / "live")},
                          root / "l_p1")[0]
    out["same"] = launch(2, S, {"stage": 2, "start": 3, "stop": 6, "load": str(ck)}, root / "l_same")[0]
    out["2to3_stage3"] = launch(3, S, {"stage": 3, "start": 3, "stop": 6, "load": str(ck)}, root / "l_23")[0]
    out["2to1_stage1"] = launch(1, S, {"stage": 1, "start": 3, "stop": 6, "load": str(ck)}, root / "l_21")[0]
    # the same global batch at world 1 in two micro-batches: the saved run accumulated one
    out["2to1_accumulate2"] = launch(1, S, {"stage": 2, "start": 3, "stop": 6, "load": str(ck), "accumulate": 2},
                                     root / "l_21acc")[0]
    # 2 -> 3 (stage 1) saving at step 4, then 3 -> 2 (stage 3)
    ck2 = root / "ckpt2"
    out["3_stage1"] = launch(3, S, {"stage": 1, "start": 3, "stop": 4, "load": str(ck), "save": str(ck2)}, root / "l_31")[0]
    out["3to2_stage3"] = launch(2, S, {"stage": 3, "start": 4, "stop": 6, "load": str(ck2)}, root / "l_32")[0]
    # 2 -> 3 into stage 3 with optimizer states and parameter shards in NVMe swap files, saving at
    # step 4, then 3 -> 2 back at stage 2 with nothing offloaded
    nvme, ck3 = root / "nvme", root / "ckpt3"
    nvme.mkdir()
    offload = {"offload_optimizer": {"device": "nvme", "nvme_path": str(nvme)},
               "offload_param": {"device": "nvme", "nvme_path": str(nvme)}}
    out["3_nvme"] = launch(3, S, {"stage": 3, "start": 3, "stop": 4, "load": str(ck), "save": str(ck3),
                                  "zero_extra": offload}, root / "l_3nvme")[0]
    out["nvme_to_2"] = launch(2, S, {"stage": 2, "start": 4, "stop": 6, "load": str(ck3)}, root / "l_nvme2")[0]
    out["nvme_leftovers"] = sorted(p.name for p in nvme.iterdir())
    # stage 0 checkpoints (one copy on rank 0) load at stage 2
    ck0 = root / "ckpt0"
    launch(2, S, {"stage": 0, "start": 0, "stop": 3, "save": str(ck0)}, root / "l_s0")
    out["0to2"] = launch(2, S, {"stage": 2, "start": 3, "stop": 6, "load": str(ck0)}, root / "l_0to2")[0]
    # a rank dies in the middle of saving step 4: step 3 must stay the checkpoint
    with pytest.raises(AssertionError, match="failed"):
        launch(2, S, {"stage": 2, "start": 3, "stop": 4, "load": str(ck), "save": str(ck), "crash_rank": 1},
               root / "l_crash")
    return root, out


def test_resume_same_world_is_exact(runs):
    _, out = runs
    assert out["part1"]["losses"] + out["same"]["losses"] == out["full"]["losses"]
    assert out["same"]["client_state"] == {"epoch": 1, "note": "resume me"}
    assert out["same"]["lr"] == out["full"]["lr"]  # the scheduler resumed too


@pytest.mark.parametrize("name", ["2to3_stage3", "2to1_stage1", "0to2", "2to1_accumulate2"])
def test_resume_other_world_and_stage(runs, name):
    _, out = runs
    # the same global batch split differently: equal up to summation order
    assert out[name]["losses"] == pytest.approx(out["full"]["losses"][3:], abs=2e-5)
    assert out[name]["lr"] == out["full"]["lr"]


def test_resume_chain_3_to_2(runs):
    _, out = runs
    assert out["3_stage1"]["losses"] + out["3to2_stage3"]["losses"] == pytest.approx(out["full"]["losses"][3:], abs=2e-5)


def test_resume_through_nvme_offload_at_another_world(runs):
    _, out = runs
    assert out["3_nvme"]["losses"] + out["nvme_to_2"]["losses"] == pytest.approx(out["full"]["losses"][3:], abs=2e-5)
    assert out["nvme_to_2"]["lr"] == out["full"]["lr"]
    assert out["nvme_leftovers"] == []


def test_crash_during_save_keeps_previous_checkpoint(runs):
    root, _ = runs
    ck = root / "ckpt"
    assert (ck / "latest").read_text() == "global_step3"
    assert (ck / ".partial-global_step4").is_dir() and not (ck / "global_step4").exists()
    with pytest.raises(CheckpointError, match="not an hf_zero checkpoint"):
        Index.read(ck / ".partial-global_step4")
    index = Index.read(resolve_tag(ck, None))
    index.check_files()  # every file intact
    assert index.data["global_steps"] == 3 and index.world_size == 2


def test_index_describes_every_parameter(runs):
    root, _ = runs
    index = Index.read(root / "ckpt" / "global_step3")
    model = build("llama")
    assert set(index.params) == {n for n, _ in model.named_parameters()}
    for name, p in model.named_parameters():
        assert tuple(index.params[name].shape) == tuple(p.shape)
    # no pickle: every file is JSON or safetensors
    for f in (root / "ckpt" / "global_step3").iterdir():
        assert f.suffix in (".json", ".safetensors"), f
    _assert_export_ranges(root / "ckpt" / "global_step3")  # two ranks' files


def _logits(model_dir_or_model, ids):
    from transformers import AutoModelForCausalLM

    model = model_dir_or_model
    if not isinstance(model, torch.nn.Module):
        model = AutoModelForCausalLM.from_pretrained(str(model), dtype=torch.float32)
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_consolidated_logits_equal_live_model(runs, tmp_path):
    root, _ = runs
    ids = batches(1, 1, 1)[0][0][0]["input_ids"]
    reference = build("llama")
    reference.load_state_dict(load_file(str(root / "live" / "reference_full.safetensors")))
    want = _logits(reference, ids)
    # offline, single file and sharded
    consolidate(root / "ckpt", tmp_path / "one", progress=False)
    files = consolidate(root / "ckpt", tmp_path / "many", max_shard_size="40KB", progress=False)
    assert len(files) > 1 and (tmp_path / "many" / "model.safetensors.index.json").is_file()
    for d in (tmp_path / "one", tmp_path / "many", root / "live"):
        torch.testing.assert_close(_logits(d, ids), want, atol=1e-5, rtol=0)
    # bf16 export
    consolidate(root / "ckpt", tmp_path / "bf16", dtype="bf16", progress=False)
    sd = load_file(str(tmp_path / "bf16" / "model.safetensors"))
    assert all(t.dtype == torch.bfloat16 for t in sd.values())


def test_cli_consolidate(runs, tmp_path):
    root, _ = runs
    cmd = [sys.executable, "-m", "hf_zero.cli", "consolidate", str(root / "ckpt"), str(tmp_path / "out"),
           "--max-shard-size", "100KB", "--quiet"]
    res = subprocess.run(cmd, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert "wrote" in res.stdout and (tmp_path / "out" / "config.json").is_file()
    bad = subprocess.run([sys.executable, "-m", "hf_zero.cli", "consolidate", str(tmp_path / "nope"), str(tmp_path / "o")],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "no such directory" in bad.stderr


# ---------------------------------------------------------------------- single process, bad input
def _engine(name="llama", stage=2):
    model = build(name)
    engine, *_ = hf_zero.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-2),
                                    config={"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": stage}})
    data = batches(2, 1, 1)
    for step in data:
        loss = engine(**step[0][0]).loss
        engine.backward(loss)
        engine.step()
    return engine


@pytest.fixture()
def saved(tmp_path):
    engine = _engine()
    path = engine.save_checkpoint(tmp_path / "ck")
    return engine, path


def _assert_untouched(engine, before):
    after = engine.full_state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_tied_gpt2_roundtrip(tmp_path):
    engine = _engine("gpt2", stage=3)
    engine.save_checkpoint(tmp_path / "ck")
    consolidate(tmp_path / "ck", tmp_path / "hf", progress=False)
    keys = load_file(str(tmp_path / "hf" / "model.safetensors")).keys()
    assert "transformer.wte.weight" in keys and "lm_head.weight" not in keys  # written once
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"))
    assert model.lm_head.weight is model.transformer.wte.weight
    sd = engine.full_state_dict()
    torch.testing.assert_close(model.lm_head.weight, sd["lm_head.weight"])


def test_truncated_shard(saved):
    engine, path = saved
    f = next(path.glob("rank*.safetensors"))
    with open(f, "r+b") as fh:
        fh.truncate(f.stat().st_size - 100)
    before = engine.full_state_dict()
    with pytest.raises(CheckpointError, match=f"{f.name}.*truncated"):
        engine.load_checkpoint(path.parent)
    _assert_untouched(engine, before)


def test_corrupted_shard(saved):
    engine, path = saved
    f = next(path.glob("rank*.safetensors"))
    data = bytearray(f.read_bytes())
    data[-5] ^= 0xFF
    f.write_bytes(bytes(data))
    before = engine.full_state_dict()
    with pytest.raises(CheckpointError, match=f"{f.name}.*sha256"):
        engine.load_checkpoint(path.parent)
    _assert_untouched(engine, before)


def test_missing_rank_file(saved):
    engine, path = saved
    f = next(path.glob("rank*.safetensors"))
    f.unlink()
    with pytest.raises(CheckpointError, match=f"{f.name}.*missing"):
        engine.load_checkpoint(path.parent)


def test_index_from_another_model(saved, tmp_path):
    engine, path = saved
    other = _engine("gpt2")
    before = other.full_state_dict()
    with pytest.raises(CheckpointError, match="index.json.*another model"):
        other.load_checkpoint(path.parent)
    _assert_untouched(other, before)


def test_not_a_checkpoint(tmp_path):
    engine = _engine()
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="neither a checkpoint"):
        engine.load_checkpoint(tmp_path / "empty")
    with pytest.raises(CheckpointError, match="no such"):
        engine.load_checkpoint(tmp_path / "absent")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "index.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="corrupt index"):
        engine.load_checkpoint(tmp_path / "bad")


def test_unstorable_client_state_fails_before_writing(tmp_path):
    engine = _engine()
    with pytest.raises(CheckpointError, match="without pickle"):
        engine.save_checkpoint(tmp_path / "ck", client_state={"thing": object()})
    assert not (tmp_path / "ck").exists()


def test_resave_same_tag_replaces_atomically(saved):
    engine, path = saved
    engine.save_checkpoint(path.parent, tag=path.name)
    Index.read(path).check_files()
    assert not any(p.name.startswith((".old", ".partial")) for p in path.parent.iterdir())


def test_dataloader_position_resumes(tmp_path):
    """A checkpoint in the second epoch resumes with the next unseen micro-batch of that epoch."""
    D = "checkpoint_scenarios:dataloader_resume"
    # 40 samples / 2 ranks / micro 2 = 10 micro-batches per epoch and rank; stop in epoch 2
    full = launch(2, D, {"stop": 16}, tmp_path / "full")
    first = launch(2, D, {"stop": 16, "save": str(tmp_path / "ck"), "save_at": 12}, tmp_path / "first")
    rest = launch(2, D, {"stop": 16, "load": str(tmp_path / "ck")}, tmp_path / "rest")
    for r in range(2):
        assert first[r]["seen"] + rest[r]["seen"] == full[r]["seen"]
        assert len(rest[r]["seen"]) == 4


def test_resumed_micro_steps_follow_the_new_accumulation(tmp_path):
    """The boundary after a resume: a checkpoint saved at step 3 with 1 micro-batch per step
    resumes at micro-step 6 under 2 (the next boundary is a whole step away); one saved in the
    middle of an accumulation is refused under another accumulation, naming both counts."""
    from hf_zero.checkpoint.sharded import resumed_micro_steps

    ours = {"micro_steps": 3, "zero_config": {"gradient_accumulation_steps": 1}}
    assert resumed_micro_steps(ours, 2, tmp_path) == 6
    assert resumed_micro_steps(ours, 1, tmp_path) == 3
    assert resumed_micro_steps({"micro_steps": 8, "gradient_accumulation_steps": 4}, 2, tmp_path) == 4
    assert resumed_micro_steps({"micro_steps": 5}, 2, tmp_path) == 5  # no record of the old count: kept
    mid = {"micro_steps": 7, "zero_config": {"gradient_accumulation_steps": 2}}
    assert resumed_micro_steps(mid, 2, tmp_path) == 7
    with pytest.raises(CheckpointError, match=r"micro-batch 1 of an accumulation of 2.*gradient_accumulation_steps=2"):
        resumed_micro_steps(mid, 4, tmp_path)


# ------------------------------------------------- the export range: what consolidate verifies
def _entries(path: Path) -> dict:
    """{entry: (first byte, end byte) in the file}, from the safetensors header of ``path``."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    head = json.loads(raw[8 : 8 + n])
    head.pop("__metadata__", None)
    return {k: (8 + n + v["data_offsets"][0], 8 + n + v["data_offsets"][1]) for k, v in head.items()}


def _assert_export_ranges(directory: Path) -> dict:
    """Every rank file's index entry records its export range: hashlib's sha256 of its first
    ``bytes`` bytes, which hold every master, frozen param and buffer, and no optimizer state or
    RNG state behind them (this model's entries are all 4-byte aligned: nothing joins the lead)."""
    files = json.loads((directory / "index.json").read_text())["files"]
    for name, meta in files.items():
        raw = (directory / name).read_bytes()
        n = meta["export"]["bytes"]
        assert meta["size"] == len(raw) and meta["sha256"] == hashlib.sha256(raw).hexdigest()
        assert meta["export"]["sha256"] == hashlib.sha256(raw[:n]).hexdigest()
        for entry, (start, end) in _entries(directory / name).items():
            if entry.endswith((".master", ".param")) or entry.startswith("buffer."):
                assert end <= n, (name, entry)
            else:
                assert start >= n, (name, entry)
        assert any(".state." in e for e in _entries(directory / name)) and n < len(raw)
    return files


def test_index_records_export_range_sync_and_async(tmp_path):
    engine = _engine()
    sync = engine.save_checkpoint(tmp_path / "sync")
    asyn = engine.save_checkpoint(tmp_path / "async", async_save=True)
    engine.wait_for_checkpoint()
    assert _assert_export_ranges(asyn) == _assert_export_ranges(sync)  # the same state, the same files


def _flip(path: Path, entry: str) -> None:
    """Invert one byte in the middle of ``entry``'s bytes in the file."""
    start, end = _entries(path)[entry]
    data = bytearray(path.read_bytes())
    data[(start + end) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _weights(out: Path) -> dict:
    return load_file(str(out / "model.safetensors"))


def _assert_same_weights(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_consolidate_verifies_the_export_range_only(saved, tmp_path):
    """Altered optimizer-state bytes (outside the export range) do not stop an export, which
    reads none of them; an altered master byte does, naming the file, with no weights written."""
    _, path = saved
    f = next(path.glob("rank*.safetensors"))
    consolidate(path, tmp_path / "ref", progress=False)
    _flip(f, "u2.f0.state.exp_avg_sq")
    consolidate(path, tmp_path / "out", progress=False)
    _assert_same_weights(_weights(tmp_path / "out"), _weights(tmp_path / "ref"))
    _flip(f, "u2.f0.master")
    with pytest.raises(CheckpointError, match=f"{f.name}.*sha256"):
        consolidate(path, tmp_path / "bad", progress=False)
    assert sorted(p.name for p in (tmp_path / "bad").iterdir()) == []  # no model*.safetensors, no .part-*


def test_load_still_verifies_whole_files(saved):
    engine, path = saved
    f = next(path.glob("rank*.safetensors"))
    _flip(f, "u2.f0.state.exp_avg")
    before = engine.full_state_dict()
    with pytest.raises(CheckpointError, match=f"{f.name}.*sha256"):
        engine.load_checkpoint(path.parent)
    _assert_untouched(engine, before)


@pytest.mark.parametrize("edit,altered", [
    ("removed", "u2.f0.state.exp_avg"),  # an index written before the field: the whole file is hashed
    ("header_only", "u2.f0.master"),     # a range that leaves out masters the export reads: likewise
])
def test_consolidate_hashes_whole_files_without_a_usable_export_range(saved, tmp_path, edit, altered):
    _, path = saved
    f = next(path.glob("rank*.safetensors"))
    consolidate(path, tmp_path / "ref", progress=False)
    index = json.loads((path / "index.json").read_text())
    for name, meta in index["files"].items():
        if edit == "removed":
            del meta["export"]
        else:  # a correct digest of the header alone
            raw = (path / name).read_bytes()
            n = 8 + struct.unpack("<Q", raw[:8])[0]
            meta["export"] = {"bytes": n, "sha256": hashlib.sha256(raw[:n]).hexdigest()}
    (path / "index.json").write_text(json.dumps(index))
    consolidate(path, tmp_path / "out", progress=False)
    _assert_same_weights(_weights(tmp_path / "out"), _weights(tmp_path / "ref"))
    _flip(f, altered)
    with pytest.raises(CheckpointError, match=f"{f.name}: sha256 differs"):
        consolidate(path, tmp_path / "bad", progress=False)
    assert not list((tmp_path / "bad").glob("model*.safetensors"))


def test_malformed_export_range_is_a_corrupt_index(saved):
    _, path = saved
    index = json.loads((path / "index.json").read_text())
    meta = next(iter(index["files"].values()))
    meta["export"]["bytes"] = meta["size"] + 1
    (path / "index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="index.json: corrupt index.*export"):
        Index.read(path)


def test_buffers_are_in_the_export_range(tmp_path):
    """A module's persistent buffers (an int64 counter, fp32 running statistics) are exported, so
    they lie in the export range with the masters: altered optimizer states pass, an altered
    running mean is refused."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.BatchNorm1d(5), torch.nn.Linear(5, 3))
    engine, *_ = hf_zero.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-2),
                                    config={"train_micro_batch_size_per_gpu": 4, "zero_optimization": {"stage": 2}})
    engine.backward(engine(torch.randn(4, 6)).pow(2).mean())
    engine.step()
    path = engine.save_checkpoint(tmp_path / "ck")
    _assert_export_ranges(path)
    f = next(path.glob("rank*.safetensors"))
    _flip(f, "u0.f0.state.exp_avg")
    consolidate(path, tmp_path / "out", progress=False)
    sd = _weights(tmp_path / "out")
    for name, b in model.named_buffers():
        assert torch.equal(sd[name], b), name
    _flip(f, "buffer.1.running_mean")
    with pytest.raises(CheckpointError, match=f"{f.name}.*sha256"):
        consolidate(path, tmp_path / "bad", progress=False)
