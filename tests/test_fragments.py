"""hf_zero's tensor-fragment functions (DeepSpeed's ``safe_get_full_*`` names) at stages 0-3.

Reference: the unsharded single-process run on the same global batches, which reads
``p.grad``, ``p`` and ``optimizer.state[p]`` directly and does to them what the scenario's setters
do (tests/fragment_scenarios.py). Tolerances: fp32 as in tests/test_parity.py (gradients and Adam
states agree to last-bit noise, weights after three AdamW steps to 2e-4); bf16 / fp16 compute
against the fp32 reference: relative error of each tensor below 15% (measured up to 6%, the
bf16 embedding gradient; a gradient not averaged over the 2 ranks would be off by 50%, fp16's
loss scale of 256 left in by a factor of 256).
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from fragment_scenarios import SET_GRAD, SET_STATE, SET_WEIGHT, set_values
from launch import launch
from models import batches, build, grouped_params, make_optimizer
from scenarios import case_id

CASES = [
    dict(model="llama", stage=0),
    dict(model="llama", stage=1),
    dict(model="llama", stage=2),
    dict(model="llama", stage=3),
    dict(model="llama", stage=2, dtype="bf16"),
    dict(model="llama", stage=3, dtype="fp16"),
    dict(model="llama", stage=1, offload="cpu"),
    dict(model="llama", stage=3, offload="nvme", freeze="embed_tokens"),
]
WORLD = 2


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("fragments")
    nvme = tmp_path_factory.mktemp("fragments_nvme")
    launch(WORLD, "fragment_scenarios:fragments", {"cases": CASES}, out, timeout=900,
           env={"HF_ZERO_TEST_NVME": str(nvme)})
    return out


def reference(case):
    """What the scenario records, from an unsharded run (see the module docstring)."""
    model = build("llama")
    if case.get("freeze"):
        for n, p in model.named_parameters():
            if case["freeze"] in n:
                p.requires_grad_(False)
    opt = make_optimizer("adamw", grouped_params(model))
    named = dict(model.named_parameters())
    trainable = {n: p for n, p in named.items() if p.requires_grad}
    data = batches(3, 2, WORLD)
    out = {}
    for s, step in enumerate(data):
        k = len(step) * len(step[0])
        for micro in step:
            for batch in micro:
                (model(**batch).loss / k).backward()
        for p in trainable.values():
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        if s == 1:
            out.update({f"{n}.grad": p.grad.clone() for n, p in trainable.items()})
        if s == 2 and SET_GRAD in trainable:
            trainable[SET_GRAD].grad = set_values(SET_GRAD, trainable[SET_GRAD].shape)
        opt.step()
        opt.zero_grad()
        if s == 1:
            for n, p in trainable.items():
                out[f"{n}.fp32"] = p.detach().clone()
                out[f"{n}.exp_avg"] = opt.state[p]["exp_avg"].clone()
                out[f"{n}.exp_avg_sq"] = opt.state[p]["exp_avg_sq"].clone()
            with torch.no_grad():
                named[SET_WEIGHT].copy_(set_values(SET_WEIGHT, named[SET_WEIGHT].shape))
                opt.state[named[SET_STATE]]["exp_avg"].zero_()
    return out, {k: v.detach() for k, v in model.state_dict().items()}


def _close(got, expected, name, case):
    if case.get("dtype"):
        err = (got.float() - expected).norm() / expected.norm().clamp_min(1e-12)
        assert err < 0.15, f"{name}: relative error {float(err):.3g}"
    elif name.endswith(".fp32") or "final" in name:
        torch.testing.assert_close(got, expected, atol=2e-4, rtol=0, msg=lambda m: f"{name}: {m}")
    else:
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-4, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_full_values_match_the_unsharded_run(run, case):
    tag = case_id(case)
    expected, expected_final = reference(case)
    got = load_file(str(run / f"{tag}.full.safetensors"))
    # frozen parameters have no fp32 weight, gradient or state (None, as DeepSpeed's getters)
    assert set(got) == set(expected)
    if case.get("freeze"):
        assert not any(case["freeze"] in k for k in got)
    for name, value in expected.items():
        _close(got[name], value, name, case)
    # the setters took effect: step 3 from the set weight, state and gradient lands where the
    # reference's does
    final = load_file(str(run / f"{tag}.final.safetensors"))
    for name, value in expected_final.items():
        _close(final[name], value.float(), f"final {name}", case)


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_local_fragments_tile_the_full_values(run, case):
    """Every rank's fragment sits at its local_range; together they are the full value, exactly."""
    tag = case_id(case)
    full = load_file(str(run / f"{tag}.full.safetensors"))
    local = [load_file(str(run / f"{tag}.local{r}.safetensors")) for r in range(WORLD)]
    names = {k.rsplit(".", 1)[0] for k in full if k.endswith(".fp32")}
    assert names
    for n in names:
        for key in ("fp32", "exp_avg") + (("grad",) if case["stage"] >= 2 else ()):
            flat = full[f"{n}.{key}"].reshape(-1)
            covered = torch.zeros(flat.numel(), dtype=torch.int32)
            for r in range(WORLD):
                start, end = local[r][f"{n}.range"].tolist()
                frag = local[r][f"{n}.{key}"]
                assert frag.numel() == end - start
                assert torch.equal(frag.float(), flat[start:end]), f"{n}.{key} rank {r}"
                covered[start:end] += 1
            # stage 0: every rank holds everything; stages 1-3: each element on exactly one rank
            assert bool((covered == (WORLD if case["stage"] == 0 else 1)).all()), n


def test_errors_name_the_parameter_and_the_fix():
    """Outside any engine, and with the wrong shape: clear errors, no collective."""
    import hf_zero

    plain = torch.nn.Linear(2, 2).weight
    with pytest.raises(ValueError, match="not managed by an hf_zero engine"):
        hf_zero.safe_get_full_fp32_param(plain)
