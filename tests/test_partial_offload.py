"""Partial optimizer offload (``offload_optimizer.ratio``): ratios 0, 0.3 and 1.0 at stages 1-3,
with clipping, in fp32, bf16 and fp16 (dynamic loss scaling, an overflow step included), against
the unsharded single-process run and the no-offload run, world 2 over gloo; the host and device
steps run at the same time; checkpoints saved at one ratio resume at another ratio, without
offload and at another world size, and their files do not depend on the ratio."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

import hf_zero
from hf_zero.offload.partial import host_flat_indices, host_fraction, subset_view
from launch import launch
from models import batches, build, grouped_params, make_optimizer, reference_run
from scenarios import case_id

WORLD = 2
SLOW = pytest.mark.slow  # each fixture is one world-2 launch of a minute or more on 2 cores
RATIOS = (0.0, 0.3, 1.0)
BASE = dict(model="llama", opt="adamw", clip=0.5, accum=2)
FP32 = [dict(BASE, stage=s, offload="cpu", ratio=r) for s in (1, 2, 3) for r in RATIOS]
# bf16 against the fp32 reference with SGD (AdamW's normalisation magnifies bf16 rounding), as
# tests/test_offload.py does; bf16 AdamW is checked against its no-offload twin (FP16 too)
BF16 = [dict(BASE, stage=s, offload="cpu", ratio=r, dtype="bf16", opt="sgd") for s in (1, 2, 3) for r in RATIOS]
BF16_ADAMW = [dict(BASE, stage=2, offload="cpu", ratio=0.3, dtype="bf16")]
FP16 = [dict(BASE, stage=s, offload="cpu", ratio=r, dtype="fp16", overflow_step=1) for s in (1, 2, 3) for r in RATIOS]
# no clipping at stages 2-3: the host's units are stepped during backward (the eager path)
EAGER = [dict(BASE, stage=s, offload="cpu", ratio=0.3, clip=0.0) for s in (2, 3)]
SGD = [dict(BASE, stage=2, offload="cpu", ratio=0.3, opt="sgd")]


def twin(case: dict) -> dict:
    """The same run without offload."""
    return {k: v for k, v in case.items() if k not in ("offload", "ratio")}


OFFLOADED = FP32 + BF16 + BF16_ADAMW + FP16 + EAGER + SGD
CASES = OFFLOADED + list({case_id(twin(c)): twin(c) for c in OFFLOADED}.values())


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("partial")
    results = launch(WORLD, "partial_scenarios:parity", {"cases": CASES}, out, timeout=900)
    return out, results


def _weights(out, case):
    return load_file(str(out / f"{case_id(case)}.safetensors"))


@pytest.mark.parametrize("case", FP32 + BF16 + EAGER + SGD, ids=case_id)
@SLOW
def test_partial_offload_matches_unsharded_reference(run, case):
    out, _ = run
    ref, _ = reference_run(case["model"], case["opt"], batches(3, 2, WORLD), case["clip"])
    got = _weights(out, case)
    atol = 3e-4 if case.get("dtype") == "bf16" else (2e-4 if case["opt"] == "adamw" else 1e-6)
    for name, expected in ref.state_dict().items():
        torch.testing.assert_close(got[name], expected.float(), atol=atol, rtol=0, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("case", OFFLOADED, ids=case_id)
@SLOW
def test_partial_offload_is_bitwise_equal_to_no_offload(run, case):
    """The device part and the host part run the same optimizer on the same numbers."""
    out, results = run
    plain, offloaded = _weights(out, twin(case)), _weights(out, case)
    assert all(torch.equal(plain[k], offloaded[k]) for k in plain)
    for r in results:
        assert r[case_id(case)]["losses"] == r[case_id(twin(case))]["losses"]


@pytest.mark.parametrize("case", FP16, ids=case_id)
@SLOW
def test_fp16_overflow_step_is_skipped_on_every_rank(run, case):
    _, results = run
    for r in results:
        got, plain = r[case_id(case)], r[case_id(twin(case))]
        assert got["skipped"] == plain["skipped"] == 1
        assert got["scales"] == plain["scales"]
        assert got["scales"][1] == got["scales"][0] / 2  # the overflow halved the dynamic scale


@pytest.mark.parametrize("stage", (1, 2, 3))
@SLOW
def test_ratio_splits_the_state_between_host_and_device(run, stage):
    _, results = run
    for r in results:
        by_ratio = {ratio: r[case_id(dict(BASE, stage=stage, offload="cpu", ratio=ratio))] for ratio in RATIOS}
        none, part, full = by_ratio[0.0], by_ratio[0.3], by_ratio[1.0]
        assert none["host_flats"] == [] and none["host_fraction"] == 0.0
        assert full["host_flats"] == list(range(full["flats"])) and full["host_fraction"] == 1.0
        # the trailing flats, at least 30% of the elements, and not all of them
        assert part["host_flats"] == list(range(part["flats"] - len(part["host_flats"]), part["flats"]))
        assert 0.3 <= part["host_fraction"] < 1.0
        assert full["device_bytes"] < part["device_bytes"] < none["device_bytes"]


@pytest.mark.parametrize("case", [c for c in OFFLOADED if c["ratio"] == 0.3], ids=case_id)
@SLOW
def test_host_and_device_steps_run_at_the_same_time(run, case):
    """The host step (worker thread) waits up to 5 s for the device step to start: it sees it
    start only if the device step runs while the host step is in flight."""
    _, results = run
    for r in results:
        log = r[case_id(case)]["overlap"]
        hosts = [e for e in log if e[0] == "host"]
        devices = [e for e in log if e[0] == "device"]
        assert hosts and devices and all(e[3] for e in devices)  # device part only
        assert hosts[0][3], "the host step never saw the device step start: they ran one after the other"
        assert devices[0][1] < hosts[0][2]  # the device step started before the host step ended


# ---------------------------------------------------------------------------- unit level
def test_host_flats_are_the_trailing_ones_reaching_the_ratio():
    numels = [10, 40, 30, 20]
    assert host_flat_indices(numels, 0.0) == frozenset()
    assert host_flat_indices(numels, 1.0) == {0, 1, 2, 3}
    assert host_flat_indices(numels, 0.2) == {3}
    assert host_flat_indices(numels, 0.21) == {2, 3}       # rounded up: the device holds <= 79%
    assert host_flat_indices(numels, 0.5) == {2, 3}
    assert host_flat_indices(numels, 0.51) == {1, 2, 3}
    assert host_fraction(numels, 0.3) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="1.5"):
        host_flat_indices(numels, 1.5)


def test_subset_views_leave_the_optimizer_alone_and_step_only_their_pieces():
    from types import SimpleNamespace

    a, b = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2))
    opt = torch.optim.AdamW([{"params": [a]}, {"params": [b], "lr": 0.5}], lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    view = subset_view(opt, [SimpleNamespace(param=b, group=1)])
    opt.param_groups[1]["lr"] = 99.0  # after the view was made: not seen by it
    a.grad, b.grad = torch.ones(3), torch.ones(2)
    view.step()
    assert torch.equal(a.data, torch.ones(3)) and a not in opt.state
    assert b in opt.state and opt.state[b]["step"] == 1
    assert b.data.sub(1).abs().max().item() == pytest.approx(0.5 * 1 + 0.5 * 0.01, rel=1e-3)
    assert [g["params"] for g in opt.param_groups] == [[a], [b]]
    sched.step()  # no "lr_scheduler.step() before optimizer.step()" bookkeeping error


def test_ratio_zero_is_accepted_and_out_of_range_is_refused():
    from hf_zero.config import ConfigError, ZeroConfig

    cfg = {"train_micro_batch_size_per_gpu": 1,
           "zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu", "ratio": 0}}}
    assert ZeroConfig.load(cfg).zero_optimization.offload_optimizer.ratio == 0.0
    cfg["zero_optimization"]["offload_optimizer"]["ratio"] = 1.2
    with pytest.raises(ConfigError, match="ratio"):
        ZeroConfig.load(cfg)


# ---------------------------------------------------------------------------- checkpoints
STEPS, FIRST = 4, 2
SAVES = [dict(name="s2_r03", stage=2, ratio=0.3), dict(name="s3_r03", stage=3, ratio=0.3),
         dict(name="s2_none", stage=2, ratio=None), dict(name="s2_r1", stage=2, ratio=1.0)]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    out = tmp_path_factory.mktemp("partial_ck")
    results = launch(WORLD, "partial_scenarios:checkpoint_save", {"runs": SAVES, "steps": STEPS, "first": FIRST},
                     out, timeout=600)
    return out, results


def _world1_engine(stage, offload):
    model = build("llama")
    opt = make_optimizer("adamw", grouped_params(model))
    cfg = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 2 * WORLD, "gradient_clipping": 0.5,
           "zero_optimization": {"stage": stage, "offload_optimizer": offload}}
    return hf_zero.initialize(model=model, optimizer=opt, config=cfg)[0]


@pytest.mark.parametrize("name", ["s2_r03", "s3_r03"])
@pytest.mark.parametrize("offload", [{"device": "cpu", "ratio": 1.0}, {"device": "none"},
                                     {"device": "cpu", "ratio": 0.5}], ids=["ratio1", "none", "ratio0.5"])
@SLOW
def test_checkpoint_at_a_ratio_resumes_elsewhere(saved, name, offload):
    """Saved at world 2 with ratio 0.3; resumed at world 1 (the two ranks' micro-batches as
    accumulation steps) with full, no or another partial offload: the same weights as the
    uninterrupted world-2 run."""
    out, _ = saved
    data2 = batches(STEPS, 2, WORLD)
    data1 = [[[data2[s][m][r]] for m in range(2) for r in range(WORLD)] for s in range(STEPS)]
    stage = 3 if name.startswith("s3") else 2
    engine = _world1_engine(1 if stage == 3 else 3, offload)  # another stage too
    engine.load_checkpoint(out / name / "ck", tag="t")
    from scenarios import run_steps

    run_steps(engine, data1[FIRST:], 0)
    got = engine.full_state_dict()
    engine.destroy()
    expected = load_file(str(out / name / "uninterrupted.safetensors"))
    for k, v in expected.items():
        torch.testing.assert_close(got[k], v, atol=2e-5, rtol=0, msg=lambda m: f"{k}: {m}")


@SLOW
def test_checkpoint_files_do_not_depend_on_the_ratio(saved):
    """fp32, stage 2, world 2: the files saved at ratio 0.3, 1.0 and without offload hold the
    same tensors, bit for bit, under the same names."""
    out, _ = saved
    for rank in range(WORLD):
        fname = f"rank{rank:05d}-of-{WORLD:05d}.safetensors"
        plain = load_file(str(out / "s2_none" / "ck" / "t" / fname))
        for other in ("s2_r03", "s2_r1"):
            got = load_file(str(out / other / "ck" / "t" / fname))
            assert sorted(got) == sorted(plain)
            bad = [k for k in plain if not torch.equal(plain[k], got[k])]
            assert not bad, f"{other} rank {rank}: {bad[:5]}"


def _train_one(zero: dict, dtype=None):
    from scenarios import run_steps

    model = build("llama")
    cfg = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 2, "gradient_clipping": 0.5,
           "zero_optimization": zero}
    if dtype:
        cfg[dtype] = {"enabled": True}
    engine = hf_zero.initialize(model=model, optimizer=make_optimizer("adamw", grouped_params(model)), config=cfg)[0]
    run_steps(engine, batches(3, 2, 1), 0)
    sd = engine.full_state_dict()
    engine.destroy()
    return sd


@pytest.mark.parametrize("dtype", [None, "bf16"])
@pytest.mark.parametrize("param_device", ["cpu", "nvme"])
def test_partial_offload_with_parameter_offload_is_bitwise_equal_to_no_offload(tmp_path, param_device, dtype):
    """Stage 3 with the parameter shards in CPU RAM or on NVMe and 30% of the optimizer state
    on the host (optimizer state on NVMe: the same through swap files)."""
    plain = _train_one({"stage": 3}, dtype)
    nvme = {"nvme_path": str(tmp_path)} if param_device == "nvme" else {}
    got = _train_one({"stage": 3, "offload_optimizer": {"device": param_device, "ratio": 0.3, **nvme},
                      "offload_param": {"device": param_device, **nvme}}, dtype)
    assert all(torch.equal(plain[k], got[k]) for k in plain)
    assert not any(tmp_path.iterdir())  # swap files removed
