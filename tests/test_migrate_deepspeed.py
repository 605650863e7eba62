"""Resume and export checkpoints saved by real DeepSpeed (issue 16).

The fixtures under tests/data/deepspeed/ were written by DeepSpeed itself
(scripts/make_deepspeed_fixtures.py, world 2 on the CPU accelerator over gloo): each holds the
checkpoint after 3 steps, the global losses of DeepSpeed's own next 3 steps, and DeepSpeed's
``zero_to_fp32`` output. The references are DeepSpeed's, never ours.
"""

from __future__ import annotations

import hashlib
import json
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hf_zero.checkpoint import CheckpointError, consolidate
from hf_zero.checkpoint.deepspeed_format import load_pt, open_deepspeed
from hf_zero.cli import main
from launch import launch

FIXTURES = Path(__file__).resolve().parent / "data" / "deepspeed"
ALL = [f"stage{s}_{d}" for s in (1, 2, 3) for d in ("fp32", "bf16", "fp16")]


def _meta(name):
    return json.loads((FIXTURES / name / "meta.json").read_text())


@pytest.mark.parametrize("name", ALL)
def test_masters_equal_zero_to_fp32(name):
    """Every parameter read from the partitions equals DeepSpeed's zero_to_fp32 bit for bit."""
    ck = open_deepspeed(FIXTURES / name)
    assert ck.stage == int(name[5]) and ck.world_size == 2
    ref = load_file(str(FIXTURES / name / "zero_to_fp32.safetensors"))
    assert set(ck.shapes) == set(ref)
    for pname, shape in ck.shapes.items():
        out = torch.empty(ref[pname].numel())
        ck.read(pname, "master", 0, out.numel(), out)
        assert torch.equal(out.view(shape), ref[pname]), pname
    assert ck.state_keys() == ["exp_avg", "exp_avg_sq"]
    assert ck.steps() == [3.0, 3.0]


@pytest.mark.parametrize("name", ["stage1_fp32", "stage2_bf16", "stage3_fp32", "stage3_bf16"])
def test_consolidate_equals_zero_to_fp32(tmp_path, name, capsys):
    """`hf-zero consolidate ds_dir out --dtype fp32` writes exactly zero_to_fp32's tensors."""
    out = tmp_path / "out"
    assert main(["consolidate", str(FIXTURES / name), str(out), "--dtype", "fp32", "--quiet",
                 "--max-shard-size", "40KB"]) == 0
    capsys.readouterr()
    ref = load_file(str(FIXTURES / name / "zero_to_fp32.safetensors"))
    got = {}
    files = sorted(out.glob("model*.safetensors"))
    assert len(files) > 1  # bounded shards: 40KB each
    for f in files:
        got.update(load_file(str(f)))
    assert set(got) == set(ref)
    for k in ref:
        assert got[k].dtype == torch.float32 and torch.equal(got[k], ref[k]), k


def test_consolidate_default_dtype_is_the_training_dtype(tmp_path):
    files = consolidate(FIXTURES / "stage2_bf16", tmp_path / "out", progress=False)
    sd = load_file(str(tmp_path / "out" / files[0]))
    ref = load_file(str(FIXTURES / "stage2_bf16" / "zero_to_fp32.safetensors"))
    for k, v in sd.items():
        assert v.dtype == torch.bfloat16 and torch.equal(v, ref[k].to(torch.bfloat16)), k


class _NotAllowed:
    pass


def test_pt_outside_the_allowlist_is_refused(tmp_path):
    path = tmp_path / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    torch.save({"optimizer_state_dict": {"zero_stage": 2, "x": _NotAllowed()}}, str(path))
    with pytest.raises(CheckpointError, match=r"zero_pp_rank_0_mp_rank_00_optim_states.pt: refused: .*_NotAllowed"):
        load_pt(path)
    # the DeepSpeed stand-ins load: the fixture's optimizer file, weights_only
    sd = load_pt(FIXTURES / "stage2_fp32" / "global_step3" / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    assert sd["optimizer_state_dict"]["zero_stage"] == 2
    assert vars(sd["optimizer_state_dict"]["loss_scaler"])["cur_scale"] == 1.0
    with pytest.raises(pickle.UnpicklingError):  # plain weights_only without our allowlist refuses it too
        torch.load(str(FIXTURES / "stage2_fp32" / "global_step3" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"),
                   weights_only=True)


def test_missing_rank_file_is_named(tmp_path):
    import shutil

    d = tmp_path / "ds"
    shutil.copytree(FIXTURES / "stage2_fp32", d)
    (d / "global_step3" / "zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    with pytest.raises(CheckpointError, match="saved by 2 ranks, but .* holds 1"):
        consolidate(d, tmp_path / "out", progress=False)


# world, stage and micro-batches per step of the resuming hf_zero run for each fixture (DeepSpeed
# saved at world 2, one micro-batch of 6 rows per rank); world 3 launches take 30-45 s on the
# shared 2-core box: marked slow
_slow = pytest.mark.slow
RESUMES = [
    ("stage1_fp32", 1, 3, 1), pytest.param("stage1_fp32", 3, 2, 1, marks=_slow), ("stage2_fp32", 2, 2, 1),
    pytest.param("stage2_fp32", 3, 0, 1, marks=_slow), pytest.param("stage3_fp32", 3, 1, 1, marks=_slow),
    ("stage3_fp32", 1, 2, 2), pytest.param("stage3_fp32", 2, 3, 1, marks=_slow),
    pytest.param("stage1_bf16", 2, 1, 1, marks=_slow), ("stage2_bf16", 1, 0, 2), ("stage2_bf16", 1, 2, 1),
    pytest.param("stage3_bf16", 1, 3, 2, marks=_slow), pytest.param("stage3_bf16", 2, 3, 1, marks=_slow),
    pytest.param("stage3_bf16", 3, 2, 1, marks=_slow),
    ("stage2_fp16", 2, 2, 1), pytest.param("stage1_fp16", 1, 3, 2, marks=_slow),
    pytest.param("stage3_fp16", 2, 3, 1, marks=_slow), pytest.param("stage3_fp16", 1, 1, 1, marks=_slow),
]


@pytest.mark.parametrize("name,world,stage,accumulate", RESUMES)
def test_resume_matches_deepspeed_continuation(tmp_path, name, world, stage, accumulate):
    """engine.load_checkpoint(ds_dir) at another world size / stage continues DeepSpeed's curve.

    fp32: the next 3 losses within 1e-5 at every world size and accumulation. bf16: within 1e-5
    (in practice bitwise) whenever each micro-batch holds the rows one DeepSpeed rank held, e.g.
    world 1 with 2 micro-batches per step; with another split (world 1 in one micro-batch of 12
    rows, world 3 in micro-batches of 4) the first loss (it depends only on the loaded weights)
    within 1e-5 and the later ones within 3e-4, because bf16 gradients of a different batch
    split round differently (the same happens between two hf_zero runs)."""
    meta = _meta(name)
    info = launch(world, "migrate_scenarios:resume_deepspeed",
                  {"fixture": name, "stage": stage, "accumulate": accumulate}, tmp_path)[0]
    assert info["global_steps"] == meta["steps_before"]
    assert info["lr"] == pytest.approx([0.004, 0.004])  # WarmupLR after 3 of 5 warm-up steps
    ref = meta["continuation_losses"]
    same_split = meta["global_batch"] // (world * accumulate) == meta["global_batch"] // meta["world_size"]
    if meta["dtype"] == "fp16":
        # DeepSpeed's scaler state after 3 steps (2^8 grown once at its third step, window 2),
        # and its growth rule continued: grown again after the 5th step
        assert info["scaler"] == {"scale": 512.0, "hysteresis_left": 2, "iteration": 3, "last_overflow_iteration": -1}
        assert info["scales"] == [512.0, 512.0, 1024.0]
        # DeepSpeed unscales the gradients of a step that grows the scale by the grown scale
        # (docs/config.md, "fp16"): the step after a growth (the 3rd here) differs slightly
        assert info["losses"][:2] == pytest.approx(ref[:2], abs=1e-5, rel=0)
        assert info["losses"][2] == pytest.approx(ref[2], abs=3e-4, rel=0)
    elif meta["dtype"] == "fp32" or same_split:
        assert info["losses"] == pytest.approx(ref, abs=1e-5, rel=0)
    else:
        assert info["losses"][0] == pytest.approx(ref[0], abs=1e-5, rel=0)
        assert info["losses"] == pytest.approx(ref, abs=3e-4, rel=0)


# ---------------------------------------------------------------------------------- convert
@pytest.mark.parametrize("name,ranks", [("stage3_bf16", None), ("stage1_fp32", 3)])
def test_convert_then_consolidate_equals_zero_to_fp32(tmp_path, name, ranks, capsys):
    """`hf-zero convert` writes an hf_zero checkpoint (verified by its own index: sizes, sha256)
    whose export equals zero_to_fp32's; the moments are DeepSpeed's, element for element."""
    args = ["convert", str(FIXTURES / name), str(tmp_path / "conv")] + (["--ranks", str(ranks)] if ranks else [])
    assert main(args) == 0
    capsys.readouterr()
    from hf_zero.checkpoint.format import Index

    index = Index.read(tmp_path / "conv" / "global_step3")
    assert index.world_size == (ranks or 2) and index.data["global_steps"] == 3
    index.check_files()
    for fname, meta in index.files.items():  # written like a save's: masters first, digest of that range
        raw = (index.directory / fname).read_bytes()
        assert meta["export"]["bytes"] < meta["size"]
        assert meta["export"]["sha256"] == hashlib.sha256(raw[: meta["export"]["bytes"]]).hexdigest()
    consolidate(tmp_path / "conv", tmp_path / "out", dtype="fp32", progress=False)
    got = load_file(str(tmp_path / "out" / "model.safetensors"))
    ref = load_file(str(FIXTURES / name / "zero_to_fp32.safetensors"))
    assert set(got) == set(ref) and all(torch.equal(got[k], ref[k]) for k in ref)
    from hf_zero.checkpoint.sharded import _SliceReader

    ck, reader = open_deepspeed(FIXTURES / name), _SliceReader(index)
    for pname, e in index.params.items():
        a, b = torch.empty(e.numel), torch.empty(e.numel)
        ck.read(pname, "exp_avg_sq", 0, e.numel, a)
        reader.read(e.flat, "state.exp_avg_sq", e.offset, e.numel, b)
        assert torch.equal(a, b), pname


def test_convert_refuses_what_is_not_deepspeed(tmp_path, capsys):
    d = tmp_path / "checkpoint-4"
    for f in ("model.safetensors", "optimizer.pt"):
        (d / f).parent.mkdir(parents=True, exist_ok=True)
        (d / f).write_bytes(b"x")
    assert main(["convert", str(d), str(tmp_path / "out")]) == 2
    assert "a stock Trainer checkpoint" in capsys.readouterr().err


def test_converted_checkpoint_resumes_deepspeed_curve(tmp_path):
    """The converted checkpoint (3 rank files) resumed at world 2, stage 3: DeepSpeed's losses."""
    from hf_zero.checkpoint.convert import convert

    convert(FIXTURES / "stage2_fp32", tmp_path / "conv", ranks=3)
    info = launch(2, "migrate_scenarios:resume_deepspeed",
                  {"fixture": "stage2_fp32", "stage": 3, "load": str(tmp_path / "conv")}, tmp_path / "run")[0]
    assert info["loaded"].endswith("conv/global_step3")
    assert info["lr"] == pytest.approx([0.004, 0.004]) and info["sched_lr"] == pytest.approx([0.004, 0.004])
    assert info["losses"] == pytest.approx(_meta("stage2_fp32")["continuation_losses"], abs=1e-5, rel=0)


# ------------------------------------------------------------------ DeepSpeed inside a Trainer checkpoint
TRAINER_CK = FIXTURES / "trainer_stage2_fp32" / "checkpoint-3"


def test_trainer_deepspeed_checkpoint_is_read_in_place(tmp_path):
    """A Trainer(deepspeed=...) checkpoint-N/ (DeepSpeed's latest + global_stepN/ inside, next to
    the Trainer's files): detected as DeepSpeed, exported equal to zero_to_fp32, and its
    scheduler.pt is the Trainer's schedule after 3 of 6 steps."""
    from hf_zero.checkpoint.deepspeed_format import trainer_scheduler_state
    from hf_zero.checkpoint.detect import detect

    found = detect(TRAINER_CK)
    assert (found.kind, found.world_size, found.directory.name) == ("deepspeed", 2, "global_step3")
    consolidate(TRAINER_CK, tmp_path / "out", dtype="fp32", progress=False)
    got = load_file(str(tmp_path / "out" / "model.safetensors"))
    ref = load_file(str(TRAINER_CK / "zero_to_fp32.safetensors"))
    assert set(got) == set(ref) and all(torch.equal(got[k], ref[k]) for k in ref)
    assert (tmp_path / "out" / "config.json").is_file()  # the Trainer's config.json beside the tag

    model = torch.nn.Linear(1, 1)  # two groups, as the Trainer's (decay / no decay)
    opt = torch.optim.AdamW([{"params": [model.weight]}, {"params": [model.bias]}], lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.0, (6 - s) / 6))
    state = trainer_scheduler_state(TRAINER_CK, sched)
    sched.load_state_dict(state)
    assert state["last_epoch"] == 3 and sched.get_last_lr() == pytest.approx([0.005, 0.005])
    assert _meta("trainer_stage2_fp32")["lr"]["4"] == pytest.approx(0.005)  # what the Trainer used next


def test_engine_loads_trainer_deepspeed_checkpoint():
    """engine.load_checkpoint(checkpoint-N) with DeepSpeed's files inside: step counts, group lr
    (the Trainer's linear schedule after 3 of 6 steps) and masters equal zero_to_fp32."""
    import hf_zero
    from models import build, grouped_params

    model = build("llama")
    opt = torch.optim.AdamW(grouped_params(model), lr=1e-2, weight_decay=0.1)
    engine, _, _, _ = hf_zero.initialize(model=model, optimizer=opt,
                                         config={"train_batch_size": 12, "zero_optimization": {"stage": 1}})
    path, _ = engine.load_checkpoint(TRAINER_CK)
    assert path.name == "global_step3" and engine.global_steps == 3
    assert [g["lr"] for g in engine.optimizer.param_groups] == pytest.approx([0.005, 0.005])
    ref = load_file(str(TRAINER_CK / "zero_to_fp32.safetensors"))
    sd = engine.full_state_dict()
    assert all(torch.equal(sd[k].float(), ref[k]) for k in ref)


@pytest.mark.slow  # a Trainer launch per case: ~30 s each on the 2-core box
@pytest.mark.parametrize("world,stage", [(2, 2), (1, 3)])
def test_zero_trainer_continues_the_trainer_deepspeed_curve(tmp_path, world, stage):
    """ZeroTrainer resuming the Trainer(deepspeed=...) run's checkpoint-3 logs the losses and lr
    that the DeepSpeed run itself logged at steps 4-6 (same rows, in order)."""
    meta = _meta("trainer_stage2_fp32")
    info = launch(world, "migrate_scenarios:trainer_resume_deepspeed",
                  {"stage": stage, "output_dir": str(tmp_path / "run")}, tmp_path / "logs")[0]
    after = [str(k) for k in range(meta["steps_before"] + 1, len(meta["losses"]) + 1)]
    # steps 1-3 come back from the checkpoint's trainer_state.json: the run's own log, not retrained
    assert [info["losses"][k] for k in after] == pytest.approx([meta["losses"][k] for k in after], abs=1e-5, rel=0)
    assert [info["lr"][k] for k in after] == pytest.approx([meta["lr"][k] for k in after], rel=1e-9)
    # the data is the run's own: this rank's rows at steps 4-6 are its share of what DeepSpeed's ranks were fed
    ds_global = [sum((fed[int(k) - 1] for fed in meta["fed_rows"]), []) for k in after]
    per = len(ds_global[0]) // world
    assert info["fed"][:len(after)] == [rows[:per] for rows in ds_global]
