"""File faults, one process (issue 13 items 4, 5, 8; issue 12 item 8): consolidate verifies
checksums, an export never leaves stale weights, bad indexes and pointers are named errors, and
a plain module's tied weights are exported under every name its state_dict() holds."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file

import hf_zero
from hf_zero.checkpoint import CheckpointError, consolidate
from hf_zero.cli import main
from models import batches, build


def _engine(model=None):
    model = model or build("llama")
    engine, *_ = hf_zero.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-2),
                                    config={"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": 2}})
    return engine


@pytest.fixture()
def saved(tmp_path):
    engine = _engine()
    for step in batches(1, 1, 1):
        engine.backward(engine(**step[0][0]).loss)
        engine.step()
    return engine, engine.save_checkpoint(tmp_path / "ck")


def test_consolidate_refuses_flipped_bytes(saved, tmp_path, capsys):
    _, path = saved
    f = next(path.glob("rank*.safetensors"))
    data = bytearray(f.read_bytes())
    # a byte of the last tensor the export reads (consolidate verifies the file's export range)
    data[json.loads((path / "index.json").read_text())["files"][f.name]["export"]["bytes"] - 5] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=f"{f.name}.*sha256"):
        consolidate(path.parent, tmp_path / "hf", progress=False)
    assert main(["consolidate", str(path.parent), str(tmp_path / "hf2"), "--quiet"]) == 2
    assert f.name in capsys.readouterr().err


def test_export_removes_stale_weights_only(saved, tmp_path):
    _, path = saved
    out = tmp_path / "hf"
    consolidate(path.parent, out, progress=False, max_shard_size="20KB")  # several shards + index
    assert (out / "model.safetensors.index.json").exists()
    (out / "notes.txt").write_text("mine")
    files = consolidate(path.parent, out, progress=False)
    assert files == ["model.safetensors"]
    left = sorted(p.name for p in out.iterdir())
    assert not any(n.startswith(("model-", ".part-")) or n.endswith("index.json") for n in left), left
    assert "notes.txt" in left


@pytest.mark.parametrize("content,match", [(b"[1, 2]", "JSON list"), (b"\xff\xfe\x00binary", "not JSON text")])
def test_bad_index_is_named(saved, content, match):
    _, path = saved
    (path / "index.json").write_bytes(content)
    with pytest.raises(CheckpointError, match=f"index.json.*{match}"):
        consolidate(path, path.parent / "hf", progress=False)


def test_index_with_wrong_offsets_or_world_is_named(saved):
    _, path = saved
    good = json.loads((path / "index.json").read_text())
    bad = json.loads(json.dumps(good))
    name = next(iter(bad["params"]))
    bad["params"][name]["offset"] = 10**9
    (path / "index.json").write_text(json.dumps(bad))
    with pytest.raises(CheckpointError, match=f"index.json.*{name}"):
        consolidate(path, path.parent / "hf", progress=False)
    bad = json.loads(json.dumps(good))
    bad["world_size"] = 4
    (path / "index.json").write_text(json.dumps(bad))
    with pytest.raises(CheckpointError, match="index.json.*world_size 4"):
        consolidate(path, path.parent / "hf", progress=False)
    bad = json.loads(json.dumps(good))
    bad["params"][name]["shape"] = [3, 3, 3]
    (path / "index.json").write_text(json.dumps(bad))
    with pytest.raises(CheckpointError, match=f"index.json.*{name}.*shape"):
        consolidate(path, path.parent / "hf", progress=False)


def test_latest_outside_the_directory_is_refused(saved):
    engine, path = saved
    (path.parent / "latest").write_text("../elsewhere")
    with pytest.raises(CheckpointError, match="latest.*refusing"):
        engine.load_checkpoint(path.parent)


class TiedPlain(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 8)
        self.head = nn.Linear(8, 10, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, x):
        return self.head(self.emb(x))


def test_plain_module_tied_weights_export_every_name(tmp_path):
    torch.manual_seed(0)
    model = TiedPlain()
    engine = _engine(model)
    path = engine.save_checkpoint(tmp_path / "ck")
    consolidate(path.parent, tmp_path / "hf", progress=False)
    engine.save_pretrained(tmp_path / "live")
    for out in ("hf", "live"):
        sd = load_file(str(tmp_path / out / "model.safetensors"))
        assert sorted(sd) == sorted(model.state_dict()), sorted(sd)
        fresh = TiedPlain()
        fresh.load_state_dict(sd, strict=True)
        torch.testing.assert_close(fresh.emb.weight, engine.full_state_dict()["emb.weight"])
