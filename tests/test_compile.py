"""torch.compile under ZeRO stages 0-3 (world 2, gloo, the tiny Llama): the compiled engine trains
to the weights of the eager engine and of the unsharded eager run.

One launch trains every case (tests/compile_scenarios.py: the ways users compile, ``how``) and the
same stages eagerly; the unsharded references run here.

Tolerance. Compile's own noise, measured here on the unsharded model (3 steps, accumulation 2,
clip 0.5, lr 1e-2 / 0.1): ``aot_eager`` gives bit-identical weights and losses to eager (SGD and
AdamW); inductor differs by 7.5e-9 (SGD) and 7.0e-6 (AdamW, whose division by the second moment's
root magnifies last-bit differences) in the weights, 1.2e-7 / 3.6e-7 in the losses. So:
    * against the eager engine at the same stage (same sharding, same summation order):
      ``aot_eager`` must be bit-identical; inductor within 1e-7 (SGD) / 5e-5 (AdamW);
    * against the unsharded eager run: tests/test_parity.py's tolerances (sharding reorders the
      sums: SGD 1e-6, AdamW 2e-4), losses 1e-5.
Graph breaks: the only ones are at hf_zero's unit hooks, which run eagerly (``torch._dynamo.disable``
with the reason ``HOOK_REASON``), and nothing recompiles after the first optimizer step.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

import compile_scenarios as C
from launch import launch

WORLD = 2
CASES = [
    dict(stage=0, how="wrap", opt="sgd", backend="aot_eager"),
    dict(stage=1, how="inplace", opt="sgd", backend="aot_eager"),
    dict(stage=2, how="module", opt="adamw", backend="aot_eager"),
    dict(stage=3, how="wrap", opt="sgd", backend="aot_eager"),
    dict(stage=3, how="engine", opt="adamw", backend="aot_eager"),
]
EAGER = [dict(c, how="eager", backend="eager") for c in CASES]
INDUCTOR = [dict(stage=3, how="wrap", opt="adamw", backend="inductor"),
            dict(stage=3, how="eager", opt="adamw", backend="eager")]
PARITY_ATOL = {"sgd": 1e-6, "adamw": 2e-4}
INDUCTOR_ATOL = {"sgd": 1e-7, "adamw": 5e-5}


def _eager_twin(case):
    return dict(case, how="eager", backend="eager")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("compile")
    results = launch(WORLD, "compile_scenarios:compile_parity", {"cases": CASES + EAGER}, out, timeout=900)
    return out, results


def _unsharded(opt, backend=None, cache={}):
    key = (opt, backend)
    if key not in cache:
        cache[key] = C.unsharded_run(opt, WORLD, backend=backend)
    return cache[key]


def _weights(out, case):
    return load_file(str(out / f"{C.case_name(case)}.safetensors"))


def _assert_same_as_eager_twin(out, case):
    """The compiled case's final weights equal its eager twin's bit for bit."""
    got, eager = _weights(out, case), _weights(out, _eager_twin(case))
    assert set(got) == set(eager)
    for k in eager:
        assert torch.equal(got[k], eager[k]), f"{k}: max diff {(got[k] - eager[k]).abs().max().item()}"


@pytest.mark.parametrize("case", CASES, ids=C.case_name)
def test_compiled_engine_matches_eager_engine_bit_for_bit(run, case):
    out, results = run
    _assert_same_as_eager_twin(out, case)
    for r in range(WORLD):
        assert results[r][C.case_name(case)]["losses"] == results[r][C.case_name(_eager_twin(case))]["losses"]


@pytest.mark.parametrize("case", CASES, ids=C.case_name)
def test_compiled_engine_matches_unsharded_eager_run(run, case):
    out, results = run
    ref_model, ref_losses, _ = _unsharded(case["opt"])
    got = _weights(out, case)
    ref = ref_model.state_dict()
    assert set(got) == set(ref)  # the model's own names: no "_orig_mod." from the compile wrapper
    for k, v in ref.items():
        torch.testing.assert_close(got[k], v, atol=PARITY_ATOL[case["opt"]], rtol=0, msg=lambda m: f"{k}: {m}")
    mean = [sum(x) / WORLD for x in zip(*(r[C.case_name(case)]["losses"] for r in results))]
    assert mean == pytest.approx(ref_losses, abs=1e-5)
    assert all(r[C.case_name(case)]["steps"] == 3 for r in results)


@pytest.mark.parametrize("case", CASES, ids=C.case_name)
def test_graph_breaks_only_at_unit_hooks_and_no_recompiles(run, case):
    _, results = run
    for r in range(WORLD):
        res = results[r][C.case_name(case)]
        assert res["is_compiled"]
        assert res["last"]["graphs"] >= 2, res["last"]  # compiled, and split at the hooks
        assert res["last"]["breaks"] > 0
        others = [k for k in res["last"]["reasons"] if C.HOOK_REASON not in k]
        assert not others, others
        assert res["last"] == res["first"], "recompiled after the first step"


def test_compiled_unsharded_noise_floor():
    """The premise of the tolerances: aot_eager is exact on the unsharded model, and compiling it
    has no graph break (so every break counted above is hf_zero's)."""
    for opt in ("sgd", "adamw"):
        eager, eager_losses, _ = _unsharded(opt)
        compiled, losses, counters = _unsharded(opt, "aot_eager")
        assert counters["breaks"] == 0 and counters["graphs"] == 1
        assert losses == eager_losses
        for (k, a), b in zip(compiled.state_dict().items(), eager.state_dict().values()):
            assert torch.equal(a, b), k


def test_eager_engine_is_not_compiled(run):
    _, results = run
    assert not any(results[0][C.case_name(c)]["is_compiled"] for c in EAGER)
    assert results[0][C.case_name(EAGER[0])]["last"]["graphs"] == 0


@pytest.mark.slow
def test_inductor_stage3_matches_eager_engine(tmp_path):
    """Inductor (C++ codegen on CPU; its first compile takes about a minute on the 2-core box)."""
    results = launch(WORLD, "compile_scenarios:compile_parity", {"cases": INDUCTOR}, tmp_path, timeout=900)
    got, eager = _weights(tmp_path, INDUCTOR[0]), _weights(tmp_path, INDUCTOR[1])
    for k in eager:
        torch.testing.assert_close(got[k], eager[k], atol=INDUCTOR_ATOL["adamw"], rtol=0, msg=lambda m: f"{k}: {m}")
    ref_model, ref_losses, _ = _unsharded("adamw")
    for k, v in ref_model.state_dict().items():
        torch.testing.assert_close(got[k], v, atol=PARITY_ATOL["adamw"], rtol=0, msg=lambda m: f"{k}: {m}")
    res = results[0][C.case_name(INDUCTOR[0])]
    assert not [k for k in res["last"]["reasons"] if C.HOOK_REASON not in k]
    assert res["last"] == res["first"]


# ---------------------------------------------------------------------------------- Trainer
TRAINER_CASES = [dict(name="stage2-compiled", stage=2, backend="aot_eager"),
                 dict(name="stage3-compiled", stage=3, backend="aot_eager"),
                 dict(name="stage3-eager", stage=3)]


@pytest.fixture(scope="module")
def trainer_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("trainer_compile")
    return out, launch(WORLD, "compile_scenarios:trainer_compile", {"cases": TRAINER_CASES}, out, timeout=900)


@pytest.fixture(scope="module")
def trainer_reference(tmp_path_factory):
    return C.plain_trainer(tmp_path_factory.mktemp("ref_eager")), \
        C.plain_trainer(tmp_path_factory.mktemp("ref_compiled"), "aot_eager")


def test_plain_trainer_compile_noise_floor(trainer_reference):
    """aot_eager changes nothing in the stock Trainer's one-process run: the premise below."""
    (eager, losses, norms), (compiled, c_losses, c_norms) = trainer_reference
    assert c_losses == losses and c_norms == norms
    for (k, a), b in zip(compiled.state_dict().items(), eager.state_dict().values()):
        assert torch.equal(a, b), k


@pytest.mark.parametrize("case", TRAINER_CASES[:2], ids=lambda c: c["name"])
def test_zero_trainer_torch_compile_matches_eager(trainer_run, trainer_reference, case):
    """``torch_compile=True``: bit-identical to the eager ZeroTrainer at stage 3, and within
    tests/test_trainer.py's tolerances of the stock eager Trainer on one process."""
    out, results = trainer_run
    (ref_model, ref_losses, ref_norms), _ = trainer_reference
    got = _weights_named(out, case["name"])
    for r in range(WORLD):
        res = results[r][case["name"]]
        assert res["is_compiled"] and res["stage"] == case["stage"]
        assert res["losses"] == pytest.approx(ref_losses, abs=1e-5)
        assert res["grad_norms"] == pytest.approx(ref_norms, rel=1e-5)
        assert res["counters"]["graphs"] >= 2
        assert not [k for k in res["counters"]["reasons"] if C.HOOK_REASON not in k]
    for k, v in ref_model.state_dict().items():
        torch.testing.assert_close(got[k], v, atol=2e-4, rtol=0, msg=lambda m: f"{k}: {m}")
    if case["stage"] == 3:
        eager = _weights_named(out, "stage3-eager")
        assert all(torch.equal(got[k], eager[k]) for k in eager)
        assert results[0][case["name"]]["losses"] == results[0]["stage3-eager"]["losses"]
    assert not results[0]["stage3-eager"]["is_compiled"]


def _weights_named(out, name):
    return load_file(str(out / f"{name}.safetensors"))


@pytest.mark.slow
def test_stock_trainer_deepspeed_argument_torch_compile_stage3(tmp_path):
    """The bootstrap path: the stock Trainer script of tests/bootstrap_scripts.py under
    ``torchrun -m hf_zero.run train.py --deepspeed '<stage 3>' --torch_compile``. The run logs its
    graph breaks (TORCH_LOGS=graph_breaks): hf_zero's hooks are among them, so the model did run
    compiled; losses match the stock eager Trainer on one process (1e-5)."""
    import json

    import bootstrap_scripts as B
    import integration_scenarios as S
    from test_bootstrap import STEPS, TRAIN_ARGS, _check_trainer_run, _env, _launcher, _plain_trainer, _run, _steps

    reference = _plain_trainer(tmp_path / "ref", STEPS)
    (tmp_path / "train.py").write_text(B.TRAINER)
    out = tmp_path / "out"
    cmd = [*_launcher("torchrun"), "train.py", "--output_dir", out, "--deepspeed", json.dumps(S.zero_cfg(3)),
           "--torch_compile", "--torch_compile_backend", "aot_eager", *TRAIN_ARGS, *_steps(STEPS)]
    p = _run(cmd, _env(TORCH_LOGS="graph_breaks"), tmp_path)
    _check_trainer_run(p, out, reference, 3, STEPS)
    assert C.HOOK_REASON in p.stdout + p.stderr


# ------------------------------------------------------------------- precision, offload
#: compiled (aot_eager) vs the eager engine in bf16, fp16 with the dynamic loss scale (an inf on
#: rank 0 in optimizer step 1: that step is skipped, the scale halves) and CPU optimizer offload
MIXED = [
    dict(stage=2, how="wrap", opt="adamw", backend="aot_eager", dtype="bf16"),
    dict(stage=3, how="wrap", opt="adamw", backend="aot_eager", dtype="bf16"),
    dict(stage=2, how="wrap", opt="adamw", backend="aot_eager", dtype="fp16", overflow_step=1),
    dict(stage=3, how="engine", opt="adamw", backend="aot_eager", dtype="fp16", overflow_step=1),
    dict(stage=2, how="wrap", opt="adamw", backend="aot_eager", offload="cpu"),
]


@pytest.fixture(scope="module")
def mixed_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("compile_mixed")
    cases = MIXED + [_eager_twin(c) for c in MIXED]
    return out, launch(WORLD, "compile_scenarios:compile_parity", {"cases": cases}, out, timeout=900)


@pytest.mark.parametrize("case", MIXED, ids=C.case_name)
def test_compiled_mixed_precision_and_offload_match_eager_engine(mixed_run, case):
    out, results = mixed_run
    _assert_same_as_eager_twin(out, case)
    for r in range(WORLD):
        res, ref = results[r][C.case_name(case)], results[r][C.case_name(_eager_twin(case))]
        assert res["is_compiled"] and not ref["is_compiled"]
        assert res["losses"] == ref["losses"] and res["record"] == ref["record"]
        assert not [k for k in res["last"]["reasons"] if C.HOOK_REASON not in k]
        assert res["last"] == res["first"], "recompiled after the first step"


@pytest.mark.parametrize("case", [c for c in MIXED if c.get("overflow_step") is not None], ids=C.case_name)
def test_compiled_fp16_overflow_step_is_skipped_on_every_rank(mixed_run, case):
    out, results = mixed_run
    for r in range(WORLD):
        rec = results[r][C.case_name(case)]["record"]
        assert results[r][C.case_name(case)]["skipped"] == 1
        assert [x["skipped"] for x in rec] == [0, 1, 1]
        assert rec[1]["loss_scale"] == rec[0]["loss_scale"] / 2  # halved by the overflow
        assert rec[2]["loss_scale"] == rec[1]["loss_scale"]


def test_compiled_autograd_is_refused_clearly(tmp_path):
    """Compiled autograd cannot trace hf_zero's gradient hooks in torch 2.13 (docs/engine.md):
    engine.backward raises a message naming it and the way out, before any gradient moves; the
    engine then trains to exactly the weights of one that never saw the call."""
    results = launch(WORLD, "compile_scenarios:compiled_autograd", {"stages": [0, 2, 3]}, tmp_path, timeout=600)
    for r in range(WORLD):
        for stage, res in results[r].items():
            assert res["error"] is not None, f"stage {stage}: compiled autograd was not refused"
            assert "compiled autograd" in res["error"] and "outside the compiled_autograd context" in res["error"]
            assert res["losses"] == res["fresh_losses"] and res["same_weights"] and res["steps"] == 2
