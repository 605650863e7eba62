"""CUDA checks (skipped without a GPU): every stage, with and without CPU/NVMe optimizer
offload (and stage-3 parameter offload), on one GPU equals the unsharded CPU reference in fp32;
bf16 trains. Run by
scripts/gpu_check.sh on a GPU machine."""

from __future__ import annotations

import pytest
import torch

import hf_zero
from models import batches, build, grouped_params, make_optimizer, reference_run

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _train(stage, offload, tmp_path, dtype=None, opt="sgd", offload_param="none"):
    model = build("llama")
    optimizer = make_optimizer(opt, grouped_params(model))
    zo = {"stage": stage}
    if offload != "none":
        zo["offload_optimizer"] = {"device": offload, "nvme_path": str(tmp_path), "pin_memory": True}
    if offload_param != "none":
        zo["offload_param"] = {"device": offload_param, "nvme_path": str(tmp_path), "pin_memory": True}
    cfg = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 2, "gradient_clipping": 0.5,
           "zero_optimization": zo}
    if dtype:
        cfg[dtype] = {"enabled": True}
    engine, *_ = hf_zero.initialize(model=model, optimizer=optimizer, config=cfg)
    assert engine.device.type == "cuda"
    for step in batches(3, 2, 1):
        for micro in step:
            batch = {k: v.cuda() for k, v in micro[0].items()}
            loss = engine(**batch).loss
            engine.backward(loss)
            engine.step()
    sd = engine.full_state_dict()
    engine.destroy()
    return sd


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
@pytest.mark.parametrize("offload", ["none", "cpu", "nvme"])
def test_cuda_matches_cpu_reference(stage, offload, tmp_path):
    if stage == 0 and offload != "none":
        pytest.skip("offload needs stage >= 1")
    ref, _ = reference_run("llama", "sgd", batches(3, 2, 1), 0.5)
    got = _train(stage, offload, tmp_path)
    for k, v in ref.state_dict().items():
        torch.testing.assert_close(got[k], v.float(), atol=1e-5, rtol=0)  # GPU kernels differ from CPU's


@pytest.mark.parametrize("stage", [2, 3])
def test_cuda_bf16_close_to_reference(stage, tmp_path):
    ref, _ = reference_run("llama", "sgd", batches(3, 2, 1), 0.5)
    got = _train(stage, "cpu", tmp_path, dtype="bf16")
    for k, v in ref.state_dict().items():
        torch.testing.assert_close(got[k], v.float(), atol=5e-4, rtol=0)


@pytest.mark.parametrize("offload_param", ["cpu", "nvme"])
@pytest.mark.parametrize("dtype", [None, "bf16"])
def test_cuda_parameter_offload_matches_reference(offload_param, dtype, tmp_path):
    """Pinned host shards copied up per gather (CPU RAM, or NVMe read-ahead buffers whose reuse
    waits for the copy's CUDA event)."""
    ref, _ = reference_run("llama", "sgd", batches(3, 2, 1), 0.5)
    got = _train(3, "cpu", tmp_path, dtype=dtype, offload_param=offload_param)
    for k, v in ref.state_dict().items():
        torch.testing.assert_close(got[k], v.float(), atol=5e-4 if dtype else 1e-5, rtol=0)
