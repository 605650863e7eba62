"""Directories that are not hf_zero checkpoints: each error says what the directory is and what
to run (issue 16). Hand-made directories; only names matter to the detection."""

from __future__ import annotations

import pytest

from hf_zero.checkpoint import CheckpointError, consolidate
from hf_zero.checkpoint.detect import describe, detect
from hf_zero.cli import main


def _touch(path, data=b"x"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def _stock_trainer(root):
    for f in ("model.safetensors", "optimizer.pt", "scheduler.pt", "trainer_state.json", "config.json"):
        _touch(root / f)
    return root


def _deepspeed(root, stage, world, prefix=""):
    tag = root / "global_step7"
    for r in range(world):
        _touch(tag / f"{prefix}zero_pp_rank_{r}_mp_rank_00_optim_states.pt")
        if stage == 3:
            _touch(tag / f"zero_pp_rank_{r}_mp_rank_00_model_states.pt")
    if stage != 3:
        _touch(tag / "mp_rank_00_model_states.pt")
    (root / "latest").write_text("global_step7")
    return root


def test_stock_trainer_checkpoint_is_named(tmp_path):
    d = _stock_trainer(tmp_path / "checkpoint-25")
    found = detect(d)
    assert found.kind == "trainer" and found.weights == "model.safetensors"
    msg = describe(found)
    assert "a stock Trainer checkpoint (model.safetensors + optimizer.pt)" in msg
    with pytest.raises(CheckpointError, match=r"a stock Trainer checkpoint \(model.safetensors \+ optimizer.pt\)"):
        consolidate(d, tmp_path / "out", progress=False)


def test_hf_model_directory_is_named(tmp_path):
    d = tmp_path / "model"
    _touch(d / "config.json", b"{}")
    _touch(d / "model.safetensors")
    assert detect(d).kind == "hf_model"
    with pytest.raises(CheckpointError, match=r"an HF model directory .*from_pretrained"):
        consolidate(d, tmp_path / "out", progress=False)


@pytest.mark.parametrize("stage,world,prefix", [(2, 4, ""), (3, 3, ""), (1, 2, "bf16_")])
def test_deepspeed_directory_is_named(tmp_path, stage, world, prefix):
    d = _deepspeed(tmp_path / "ds", stage, world, prefix)
    found = detect(d)
    assert (found.kind, found.world_size, found.directory.name) == ("deepspeed", world, "global_step7")
    msg = describe(found)
    label = "stage-3" if stage == 3 else "stage-1/2"
    assert f"a DeepSpeed {label} checkpoint of world size {world}" in msg
    assert "hf-zero consolidate" in msg and "hf-zero convert" in msg
    # the tag directory itself, and a Trainer checkpoint-N/ holding one without `latest`
    assert detect(d / "global_step7").kind == "deepspeed"
    (d / "latest").unlink()
    assert detect(d).directory == d / "global_step7"


def test_trainer_output_directory_points_at_newest_checkpoint(tmp_path):
    _stock_trainer(tmp_path / "run" / "checkpoint-5")
    _stock_trainer(tmp_path / "run" / "checkpoint-20")
    msg = describe(detect(tmp_path / "run"))
    assert "a Trainer output directory" in msg and msg.endswith("checkpoint-20 (the newest)")


def test_unknown_directory_lists_contents(tmp_path, capsys):
    d = tmp_path / "junk"
    _touch(d / "notes.txt")
    assert detect(d).kind == "unknown"
    assert main(["consolidate", str(d), str(tmp_path / "out"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "neither a checkpoint" in err and "notes.txt" in err


def test_cli_consolidate_names_stock_trainer(tmp_path, capsys):
    d = _stock_trainer(tmp_path / "checkpoint-3")
    assert main(["consolidate", str(d), str(tmp_path / "out"), "--quiet"]) == 2
    assert "a stock Trainer checkpoint" in capsys.readouterr().err


def test_tag_without_index_names_what_it_is(tmp_path):
    """``tag=`` pointing at a Trainer checkpoint (no index.json) names it too."""
    _stock_trainer(tmp_path / "run" / "checkpoint-9")
    with pytest.raises(CheckpointError, match="a stock Trainer checkpoint"):
        consolidate(tmp_path / "run", tmp_path / "out", tag="checkpoint-9", progress=False)
