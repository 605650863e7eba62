"""Stage-3 access (issue 12): parameters read outside forward, ``hf_zero.gathered_parameters``,
an inference-only engine beside a trained one, and ``engine.generate``'s gather paths. Real gloo
processes (tests/access_scenarios.py, one launch per world size); every reference is computed
here, on one process, unsharded, on the same global batches."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from access_scenarios import (ACCUM, GEN_KW, PROBES, STEPS, apply_change, build_access, change_head, prompt_of)
from launch import launch
from models import batches, build, grouped_params, make_optimizer

S = "access_scenarios:run"
W2_PARTS = ["outside", "modify_ram", "modify_cpu_optimizer", "modify_nvme", "modify_stage2_cpu_optimizer",
            "reference_model", "generate", "generate_nvme"]
W3_PARTS = ["outside", "modify_ram", "generate"]


def _launch(tmp_path_factory, world, parts):
    root = tmp_path_factory.mktemp(f"access_w{world}")
    nvme = root / "nvme"
    nvme.mkdir()
    results = launch(world, S, {"parts": parts, "nvme": str(nvme)}, root / "out", timeout=600)
    return root / "out", results


@pytest.fixture(scope="module")
def w2(tmp_path_factory):
    return _launch(tmp_path_factory, 2, W2_PARTS)


@pytest.fixture(scope="module")
def w3(tmp_path_factory):
    return _launch(tmp_path_factory, 3, W3_PARTS)


@pytest.fixture(params=[2, 3], ids=["world2", "world3"])
def run(request):
    return request.getfixturevalue(f"w{request.param}") + (request.param,)


def reference_train(model, world, ref_model=None):
    """Unsharded SGD on the global batches the engine's ranks see together; returns the mean
    loss of each step (the engine's rank-mean)."""
    opt = make_optimizer("sgd", grouped_params(model))
    losses = []
    for step in batches(STEPS, ACCUM, world, rank_skew=False):
        n = len(step) * world
        total = 0.0
        for micro in step:
            for batch in micro:
                out = model(**batch)
                loss = out.loss
                if ref_model is not None:
                    with torch.no_grad():
                        ref_logits = ref_model(**batch).logits
                    loss = loss + 0.1 * F.mse_loss(out.logits, ref_logits)
                (loss / n).backward()
                total += loss.item() / n
        opt.step()
        opt.zero_grad()
        losses.append(total)
    return model, losses


def rank_mean(results, part):
    per_rank = [r[part]["losses"] for r in results]
    return [sum(x) / len(x) for x in zip(*per_rank)]


def assert_weights(path: Path, model, tol=1e-5):
    got = load_file(str(path))
    want = dict(model.named_parameters())
    assert set(got) == set(want)
    for name, t in got.items():
        torch.testing.assert_close(t, want[name].detach(), atol=tol, rtol=0, msg=name)


# ---------------------------------------------------------------------------------- item 1
def _is_clear_error(probe, name):
    assert probe["raised"] == "ShardedParameterError", probe
    assert repr(name) in probe["message"] and "hf_zero.gathered_parameters" in probe["message"]


def test_reading_outside_forward_raises_the_clear_error(run):
    _, results, world = run
    for r in results:
        res = r["outside"]
        for name in PROBES:
            _is_clear_error(res["before"][name], name)
            for between in res["between"]:
                _is_clear_error(between[name], name)
        _is_clear_error(res["after_exit"], PROBES[0])
        _is_clear_error(res["after_save"], PROBES[0])
        _is_clear_error(res["inside_other_unit"], "blocks.2.fc.weight")  # not listed: stays sharded


def test_every_value_read_raises_and_metadata_works(w2):
    _, results = w2
    uses = results[0]["outside"]["uses"]
    assert uses.pop("metadata") == ["(16, 16)", "torch.float32", "256", "True"]
    assert set(uses.values()) == {"ShardedParameterError"}, uses


def test_own_parameter_output_and_child_weight_train_like_unsharded(run):
    """AccessNet's blocks return their own parameter and the parent uses block 0's weight after
    block 0 ran: losses and final weights equal the unsharded run's."""
    out, results, world = run
    model, losses = reference_train(build_access(), world)
    assert rank_mean(results, "outside") == pytest.approx(losses, abs=1e-5)
    assert_weights(out / f"outside_w{world}.safetensors", model)
    # no gradient arrived after its unit was reduced: the on-demand gather stayed for backward
    assert all(r["outside"]["late_units"] == [] for r in results)


def test_eval_forward_after_training_equals_reference(run):
    out, results, world = run
    model, _ = reference_train(build_access(), world)
    for rank in range(world):
        with torch.no_grad():
            want = model(**batches(1, 1, world, rank_skew=False, seed=9)[0][0][rank]).logits
        got = load_file(str(out / f"eval_logits_w{world}_r{rank}.safetensors"))["logits"]
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
        for name in PROBES:  # the no-grad forward released what it gathered on demand
            _is_clear_error(results[rank]["outside"]["after_eval"][name], name)


def test_inside_gathered_parameters_equals_reference(run):
    _, results, world = run
    model, _ = reference_train(build_access(), world)
    want = float(dict(model.named_parameters())[PROBES[0]].detach().sum())
    for r in results:
        assert r["outside"]["inside_sum"] == pytest.approx(want, abs=1e-4)


def test_ranks_entering_with_different_parameters_fail_clearly(run):
    _, results, world = run
    for r in results:
        res = r["outside"]
        assert "ranks entered with different parameters" in res["mismatch"], res["mismatch"]
        assert res["after_mismatch_sum"] == pytest.approx(r["outside"]["inside_sum"], abs=1e-6)
        assert res["pins_left"] == 0


def test_nested_blocks_release_at_the_outermost_exit(w2):
    _, results = w2
    for r in results:
        nest = r["outside"]["nested"]
        assert nest["inner_b0"]["raised"] is None and nest["inner_b2"]["raised"] is None
        assert nest["outer_b0"]["raised"] is None  # the outer block still holds block 0
        _is_clear_error(nest["outer_b2_after_inner"], "blocks.2.fc.weight")  # only the inner held it
        _is_clear_error(nest["after_b0"], "blocks.0.fc.weight")


# ---------------------------------------------------------------------------------- item 3
MODIFY = [("modify_ram", 2), ("modify_cpu_optimizer", 2), ("modify_nvme", 2), ("modify_ram", 3),
          ("modify_stage2_cpu_optimizer", 2)]


@pytest.mark.parametrize("part,world", MODIFY)
def test_gathered_read_then_modify_on_rank0_then_train(request, part, world):
    out, results = request.getfixturevalue(f"w{world}")
    where = part[len("modify_"):]
    init = dict(build_access().named_parameters())
    changed = build_access()
    apply_change(changed)
    for rank in range(world):
        got = load_file(str(out / f"initial_{where}_w{world}_r{rank}.safetensors"))
        for name, t in got.items():  # read: the full initial values on every rank
            torch.testing.assert_close(t, init[name].detach(), atol=0, rtol=0, msg=name)
        got = load_file(str(out / f"changed_{where}_w{world}_r{rank}.safetensors"))
        for name, t in changed.named_parameters():  # rank 0's change, the others' lost
            torch.testing.assert_close(got[name], t.detach(), atol=0, rtol=0, msg=name)
        if "stage2" not in part:
            _is_clear_error(results[rank][part]["after_exit"], "blocks.1.fc.weight")
    model, losses = reference_train(changed, world)
    assert rank_mean(results, part) == pytest.approx(losses, abs=1e-5)
    assert_weights(out / f"modify_{where}_w{world}.safetensors", model)


def test_modify_refuses_replaced_data_and_bad_rank(w2):
    _, results = w2
    res = results[0]["modify_ram"]
    assert "'head.weight' no longer views the engine's buffer" in res["replaced_data"]
    assert "modifier_rank=2" in res["bad_rank"] and "0..1" in res["bad_rank"]


# ---------------------------------------------------------------------------------- item 2
def test_reference_model_beside_trained_engine(w2):
    out, results = w2
    world = 2
    ref = build("llama", seed=5)
    ref.eval()
    for rank, r in enumerate(results):
        res = r["reference_model"]
        assert res["ref_inference_only"] and res["ref_optimizer"] and res["ref_frozen"]
        assert "no optimizer" in res["ref_backward"] and "inference-only" in res["ref_backward"]
        _is_clear_error(res["ref_probe"], "model.layers.0.mlp.up_proj.weight")
        got = load_file(str(out / f"ref_logits_w{world}_r{rank}.safetensors"))
        for s, step in enumerate(batches(STEPS, ACCUM, world, rank_skew=False)):
            for m, micro in enumerate(step):
                with torch.no_grad():
                    want = ref(**micro[rank]).logits
                torch.testing.assert_close(got[f"s{s}m{m}"], want, atol=1e-6, rtol=0)
    model, losses = reference_train(build("llama"), world, ref_model=ref)
    assert rank_mean(results, "reference_model") == pytest.approx(losses, abs=1e-5)
    assert_weights(out / f"trained_w{world}.safetensors", model)


# ---------------------------------------------------------------------------------- item 4
def test_generate_both_paths_equal_unsharded_greedy(run):
    _, results, world = run
    model = build("llama", seed=7)
    model.eval()
    for rank, r in enumerate(results):
        res = r["generate"]
        want = model.generate(prompt_of(rank), **GEN_KW).tolist()
        assert res["prompt"] == prompt_of(rank).tolist()
        for path in ("full", "per_unit", "auto"):
            assert res[path] == want, path
            _is_clear_error(res[f"{path}_after"], "model.layers.0.mlp.up_proj.weight")  # released after
        assert res["full_path"] == "full" and res["per_unit_path"] == "per_unit"
        assert res["auto_path"] == "full"  # a tiny model fits: measured on every rank
        assert "gather='everything'" in res["bad_gather"]
        own = dict(GEN_KW, max_new_tokens=3 + 3 * rank, min_new_tokens=None)
        want_ragged = model.generate(prompt_of(rank), **own).tolist()
        assert res["ragged_full"] == want_ragged and res["ragged_per_unit"] == want_ragged
        assert res["tight"] == want and res["tight_path"] == "per_unit"  # one rank short: all per unit
        assert "not_a_generate_argument" in res["error_inside"]
        _is_clear_error(res["after_error"], "model.layers.0.mlp.up_proj.weight")
        assert res["class_after_error"] == "ShardedParameter"


def test_generate_after_weights_changed_on_rank0(run):
    """gathered_parameters(modifier_rank=0) on an engine without optimizer, then generate."""
    _, results, world = run
    model = build("llama", seed=7)
    model.eval()
    change_head(model)
    for rank, r in enumerate(results):
        want = model.generate(prompt_of(rank), **GEN_KW).tolist()
        assert r["generate"]["changed_full"] == want and r["generate"]["changed_per_unit"] == want
        assert want != r["generate"]["full"]  # the change matters for these tokens


def test_generate_with_parameter_shards_on_nvme(w2):
    _, results = w2
    model = build("llama", seed=7)
    model.eval()
    for rank, r in enumerate(results):
        want = model.generate(prompt_of(rank), **GEN_KW).tolist()
        assert r["generate_nvme"]["full"] == want and r["generate_nvme"]["per_unit"] == want
        _is_clear_error(r["generate_nvme"]["after"], "model.layers.0.mlp.up_proj.weight")
