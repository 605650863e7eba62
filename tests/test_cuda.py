"""CUDA checks (skipped without a GPU): every stage, with and without CPU/NVMe optimizer
offload (and stage-3 parameter offload), on one GPU equals the unsharded CPU reference in fp32;
bf16 trains; the asynchronous save stages into kept pinned memory. Run by
scripts/gpu_check.sh on a GPU machine."""

from __future__ import annotations

import pytest
import torch

import hf_zero
from models import batches, build, grouped_params, make_optimizer, reference_run

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _train(stage, offload, tmp_path, dtype=None, opt="sgd", offload_param="none", ratio=1.0, keep=None):
    model = build("llama")
    optimizer = make_optimizer(opt, grouped_params(model))
    zo = {"stage": stage}
    if offload != "none":
        zo["offload_optimizer"] = {"device": offload, "nvme_path": str(tmp_path), "pin_memory": True, "ratio": ratio}
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
    if keep is not None:
        keep.update(report=engine.memory_report(), host=sorted(engine._host_flats),
                    master_devices=[f.master.device.type if f.master is not None else "nvme"
                                    for f in engine._trainable_flats],
                    copies=(engine.host.copies.issued, engine.host.copies.async_issued) if engine.host else None)
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


# ---------------------------------------------------------------------------- issue 15
@pytest.mark.parametrize("stage", [1, 2, 3])
@pytest.mark.parametrize("ratio", [0.3, 0.5])
@pytest.mark.parametrize("offload", ["cpu", "nvme"])
def test_cuda_partial_offload_matches_reference(stage, ratio, offload, tmp_path):
    """offload_optimizer.ratio on a GPU: the leading flats' masters and states on the GPU, the
    trailing ones on the host, both steps at once; the same weights as the CPU reference."""
    ref, _ = reference_run("llama", "sgd", batches(3, 2, 1), 0.5)
    info = {}
    got = _train(stage, offload, tmp_path, ratio=ratio, keep=info)
    for k, v in ref.state_dict().items():
        torch.testing.assert_close(got[k], v.float(), atol=1e-5, rtol=0)
    n = len(info["master_devices"])
    assert 0 < len(info["host"]) < n
    for i, where in enumerate(info["master_devices"]):
        assert where == ("cuda" if i not in info["host"] else ("cpu" if offload == "cpu" else "nvme"))
    assert ratio <= info["report"]["optimizer_host_fraction"] < 1.0
    issued, on_stream = info["copies"]
    assert issued > 0


@pytest.mark.parametrize("dtype", [None, "bf16"])
def test_cuda_offload_copies_run_on_the_copy_stream(dtype, tmp_path):
    """With a GPU every gradient shard goes down and (unless fp32 shares the master) every
    updated shard goes up on the copy stream, not the compute stream."""
    info = {}
    _train(2, "cpu", tmp_path, dtype=dtype, ratio=1.0, keep=info)
    issued, on_stream = info["copies"]
    assert issued > 0 and on_stream == issued


def test_cuda_copy_stream_events_order_copies():
    from hf_zero.offload.streams import CopyStream

    dev = torch.device("cuda")
    cs = CopyStream(dev)
    assert cs.stream is not None and cs.stream != torch.cuda.current_stream(dev)
    src = torch.randn(1 << 24, device=dev)          # 64 MiB
    src.mul_(2.0)                                    # queued on the compute stream before the copy
    host = torch.empty(src.numel(), pin_memory=True)
    ev = cs.copy(host, src)
    ev.synchronize()
    assert ev.done() and torch.equal(host, src.cpu())  # the copy saw the multiply
    back = torch.empty_like(src)
    host.add_(1.0)
    up = cs.copy(back, host)
    up.wait_compute()                                # compute-stream work below runs after the copy
    assert torch.equal(back.sub(1.0).cpu(), src.cpu())
    assert cs.async_issued == 2
    torch.cuda.synchronize()


@pytest.mark.parametrize("stage", [2, 3])
def test_cuda_async_save_stages_into_kept_pinned_memory(stage, tmp_path):
    """On a GPU the asynchronous save's snapshot goes into pinned host memory that the engine
    keeps (the default there) and refills at the next save; the files equal a synchronous save
    of the same state, byte for byte."""
    model = build("llama")
    optimizer = make_optimizer("adamw", grouped_params(model))
    engine, *_ = hf_zero.initialize(model=model, optimizer=optimizer, config={
        "train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": stage}})
    ptrs = []
    for i, step in enumerate(batches(2, 1, 1)):
        batch = {k: v.cuda() for k, v in step[0][0].items()}
        engine.backward(engine(**batch).loss)
        engine.step()
        engine.save_checkpoint(tmp_path / "async", tag=f"s{i}", async_save=True)
        staged = engine._checkpoint_staging
        assert staged is not None and all(t.is_pinned() for t in staged._held.values())
        ptrs.append({k: t.data_ptr() for k, t in staged._held.items()})
        engine.wait_for_checkpoint()
        engine.save_checkpoint(tmp_path / "sync", tag=f"s{i}")
    assert ptrs[0] == ptrs[1]  # the second snapshot refilled the first one's memory
    for i in range(2):
        for f in sorted((tmp_path / "sync" / f"s{i}").glob("rank*.safetensors")):
            assert f.read_bytes() == (tmp_path / "async" / f"s{i}" / f.name).read_bytes(), f
    engine.destroy()
    assert engine._checkpoint_staging is None
