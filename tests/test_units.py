"""Single-process checks of the engine's building blocks against naive references."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from hf_zero.engine.collectives import Collectives
from hf_zero.engine.flat import FlatParam, padded_size
from hf_zero.engine.optim import (OptimizerNotSupported, check_elementwise, clip_coefficient, global_grad_norm_sq,
                                  make_pieces, naive_grad_norm)
from hf_zero.engine.precision import LossScaler, local_overflow
from hf_zero.engine.units import build_units, find_layer_modules
from hf_zero.memory import backward_gathered_numel, comm_bytes_per_step, model_state_bytes
from models import build


def _params(*shapes, requires_grad=True):
    torch.manual_seed(0)
    return [nn.Parameter(torch.randn(*s), requires_grad=requires_grad) for s in shapes]


@pytest.mark.parametrize("world", [1, 2, 3, 5])
def test_flat_layout_and_segments_match_naive_ownership(world):
    shapes = [(3, 5), (7,), (2, 2, 2), (1,)]
    numel = sum(torch.Size(s).numel() for s in shapes)
    owned = {}
    for rank in range(world):
        params = _params(*shapes)
        values = [p.detach().clone() for p in params]
        flat = FlatParam(params, [f"p{i}" for i in range(4)], dtype=torch.float32, device=torch.device("cpu"),
                         shard_rank=rank, shard_world=world, sharded=False, alignment=4, master_dtype=torch.float32)
        assert flat.padded_numel == padded_size(numel, 4, world) and flat.padded_numel % (4 * world) == 0
        assert flat.full[numel:].abs().sum() == 0  # padding is zero
        for p, v in zip(params, values):  # parameters are views with their old values
            assert torch.equal(p, v) and p.untyped_storage().data_ptr() == flat.full.untyped_storage().data_ptr()
        for seg in flat.segments_in_shard():
            for k in range(seg.length):
                key = (seg.param_index, seg.param_start + k)
                assert key not in owned
                owned[key] = rank
                # naive: the owner of flat element e is e // shard_numel
                e = flat.offsets[seg.param_index] + seg.param_start + k
                assert e // flat.shard_numel == rank
                assert flat.shard[seg.shard_start + k] == values[seg.param_index].reshape(-1)[seg.param_start + k]
    assert len(owned) == numel  # every element owned exactly once


def test_sharded_flat_frees_and_regathers():
    params = _params((4, 4))
    flat = FlatParam(params, ["w"], dtype=torch.float32, device=torch.device("cpu"), shard_rank=0, shard_world=1,
                     sharded=True, alignment=4, master_dtype=torch.float32)
    before = params[0].detach().clone()
    flat.detach_shard()
    assert flat.full.untyped_storage().nbytes() == 0
    assert flat.master is flat.shard  # fp32: the master is the shard itself
    flat.alloc_full()
    flat.full.copy_(flat.shard)
    assert torch.equal(params[0], before)


def test_bf16_master_keeps_fp32_values():
    params = _params((5,))
    exact = params[0].detach().clone()
    flat = FlatParam(params, ["w"], dtype=torch.bfloat16, device=torch.device("cpu"), shard_rank=0, shard_world=1,
                     sharded=False, alignment=4, master_dtype=torch.float32)
    assert params[0].dtype == torch.bfloat16
    assert torch.equal(flat.master[:5], exact) and not flat.master_is_shard


@pytest.mark.parametrize("name,expected", [
    ("llama", ["model.layers.0", "model.layers.1"]),
    ("gpt2", ["transformer.h.0", "transformer.h.1"]),
    ("mixtral", ["model.layers.0", "model.layers.1"]),
    ("sparse_moe", ["blocks.0", "blocks.1"]),
])
def test_layer_units_found(name, expected):
    model = build(name)
    assert [n for n, _ in find_layer_modules(model)] == expected
    units = build_units(model, find_layer_modules(model))
    ids = [id(p) for u in units for _, p in u.params]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))


def test_tied_weights_live_in_the_root_unit():
    model = build("gpt2")
    units = build_units(model, find_layer_modules(model))
    root = {n for n, _ in units[0].params}
    assert "transformer.wte.weight" in root and "lm_head.weight" not in root  # one entry, first name


def test_weight_shared_by_two_layers_goes_to_root():
    class Block(nn.Module):
        def __init__(self, shared):
            super().__init__()
            self.shared = shared
            self.own = nn.Linear(2, 2)

    shared = nn.Linear(2, 2)
    model = nn.Module()
    model.blocks = nn.ModuleList([Block(shared), Block(shared)])
    units = build_units(model, find_layer_modules(model))
    assert {n for n, _ in units[0].params} == {"blocks.0.shared.weight", "blocks.0.shared.bias"}
    assert all(len(u.params) == 2 for u in units[1:])


def test_pieces_merge_runs_of_one_group():
    master = torch.arange(10.0)
    segs = [(0, 2, 0), (2, 3, 0), (5, 1, 1), (6, 2, None), (8, 2, 1)]
    pieces = make_pieces(0, master, segs)
    assert [(p.start, p.end, p.group) for p in pieces] == [(0, 5, 0), (5, 6, 1), (8, 10, 1)]
    pieces[0].param.data.add_(100)  # pieces alias the master shard
    assert master[0] == 100


def test_elementwise_check():
    p = [nn.Parameter(torch.zeros(2))]
    for ok in (torch.optim.AdamW(p), torch.optim.SGD(p, lr=0.1, momentum=0.9), torch.optim.Adam(p)):
        check_elementwise(ok)
    from transformers.optimization import Adafactor

    with pytest.raises(OptimizerNotSupported, match="Adafactor"):
        check_elementwise(Adafactor(p, lr=1e-3, relative_step=False))
    with pytest.raises(OptimizerNotSupported, match="LBFGS"):
        check_elementwise(torch.optim.LBFGS(p))


# Reference traces recorded from DeepSpeed 0.19.8's DynamicLossScaler (init_scale 8, window 2,
# min_scale 1, raise_error_at_min_scale False) on this overflow sequence, in its own venv.
SCALER_SEQUENCE = [False, True, False, False, True, True, True, True] + [False] * 5
DEEPSPEED_TRACES = {
    (1, False): [8.0, 4.0, 4.0, 4.0, 2.0, 1.0, 1.0, 1.0, 1.0, 1.0, 2.0, 2.0, 4.0],
    (2, False): [8.0, 8.0, 8.0, 8.0, 4.0, 2.0, 1.0, 1.0, 1.0, 1.0, 2.0, 2.0, 4.0],
    (2, True): [8.0, 8.0, 8.0, 8.0, 8.0, 4.0, 2.0, 1.0, 1.0, 1.0, 2.0, 2.0, 4.0],
}


@pytest.mark.parametrize("hysteresis,consecutive", sorted(DEEPSPEED_TRACES))
def test_loss_scaler_matches_deepspeed_trace(hysteresis, consecutive):
    s = LossScaler(8.0, dynamic=True, window=2, hysteresis=hysteresis, consecutive_hysteresis=consecutive,
                   min_scale=1.0)
    trace = []
    for overflow in SCALER_SEQUENCE:
        s.update(overflow)
        trace.append(s.scale)
    assert trace == DEEPSPEED_TRACES[(hysteresis, consecutive)]


def test_loss_scaler_hysteresis_spends_credit_first():
    s = LossScaler(16.0, dynamic=True, window=1000, hysteresis=2)
    s.update(True)
    assert s.scale == 16.0  # first overflow uses the hysteresis credit
    s.update(True)
    assert s.scale == 8.0
    static = LossScaler(128.0, dynamic=False)
    static.update(True)
    assert static.scale == 128.0


def test_local_overflow():
    assert local_overflow([torch.ones(3), torch.zeros(0)]).item() == 0.0
    assert local_overflow([torch.ones(3), torch.tensor([float("nan")])]).item() == 1.0
    assert local_overflow([torch.tensor([float("-inf")])]).item() == 1.0


def test_world_of_one_collectives_copy_and_count_nothing():
    comm = Collectives()
    out, shard = torch.zeros(4), torch.arange(4.0)
    comm.all_gather(out, shard)
    assert torch.equal(out, shard)
    comm.reduce_scatter(out, shard * 2)
    assert torch.equal(out, shard * 2)
    assert comm.take_totals().data == 0


def test_memory_formulas_reproduce_the_zero_paper_7b_on_4_gpus():
    gb = 1e9
    psi = 7e9
    totals = [model_state_bytes(psi, s, 4).total / gb for s in range(4)]
    assert totals == pytest.approx([112, 49, 38.5, 28])
    fp32 = model_state_bytes(psi, 3, 4, param_bytes=4, grad_bytes=4, master_bytes=0)
    assert fp32.total / gb == pytest.approx(16 * 7 / 4)
    ddp = comm_bytes_per_step(psi, 0, 8)
    assert comm_bytes_per_step(psi, 2, 8) == pytest.approx(ddp)
    assert comm_bytes_per_step(psi, 3, 8) == pytest.approx(1.5 * ddp)
    # stage 3 without the second gather of the carried unit and the embedding (Llama-2-7B:
    # 32000 x 4096 elements each): 1.5x less their share of the backward all-gather
    emb = 32000 * 4096
    assert comm_bytes_per_step(psi, 3, 8, backward_gathered=psi - 2 * emb) == pytest.approx(
        ddp * (1 + 0.5 * (psi - 2 * emb) / psi))


def test_backward_gathered_numel_skips_the_carried_unit_and_embeddings():
    # units: 0 root, 1 embedding, 2-3 layers, 4 head; forward runs 1, 2, 3, 4
    numels = [10, 100, 30, 30, 100]
    assert backward_gathered_numel(numels, [1, 2, 3, 4], embedding_units=[1]) == 60
    assert backward_gathered_numel(numels, [1, 2, 3, 4]) == 160
    assert backward_gathered_numel(numels, [1, 2, 3], embedding_units=[1]) == 30  # layer 3 last
    assert backward_gathered_numel(numels, []) == 0


@pytest.mark.parametrize("world", [1, 2, 3])
def test_grad_norm_on_flat_shards_matches_naive_norm(world):
    """The fast path (sum of squares over every rank's padded flat shard) against the naive
    per-parameter norm, and the clip coefficient against torch.nn.utils.clip_grad_norm_."""
    params = _params((3, 5), (7,), (2, 2, 2))
    for p in params:
        p.grad = torch.randn_like(p)
    flat_grad = torch.zeros(padded_size(sum(p.numel() for p in params), 4, world))
    flat_grad[: sum(p.numel() for p in params)] = torch.cat([p.grad.reshape(-1) for p in params])
    shards = flat_grad.chunk(world)
    total = torch.stack([global_grad_norm_sq([s]) for s in shards]).sum().sqrt()  # the all-reduce
    assert float(total) == pytest.approx(naive_grad_norm(params), rel=1e-6)
    coef = clip_coefficient(total, 0.5)
    reference = [p.grad.clone() for p in params]
    torch.nn.utils.clip_grad_norm_(params, 0.5)
    for p, g in zip(params, reference):
        torch.testing.assert_close(g * coef, p.grad)


def test_only_stock_embedding_units_skip_the_backward_gather():
    """Stage 3 does not gather a plain nn.Embedding unit in backward (its gradient needs the
    indices, not the table); a subclass with its own forward may read the weight: gathered."""
    from hf_zero.engine.stages import Unit

    class Scaled(nn.Embedding):
        def forward(self, ids):
            return super().forward(ids) * self.weight.norm()

    class Renamed(nn.Embedding):
        pass

    def reads(module, is_root=False):
        return Unit(0, "u", module, is_root, []).backward_reads_weights

    assert not reads(nn.Embedding(10, 4)) and not reads(Renamed(10, 4))
    assert reads(Scaled(10, 4)) and reads(nn.Linear(4, 4)) and reads(nn.Embedding(10, 4), is_root=True)
    # the reason it is safe: autograd's embedding backward runs with the table's storage freed
    emb = nn.Embedding(10, 4)
    ids = torch.tensor([[1, 3, 3]])
    out = emb(ids)
    expected = torch.zeros(10, 4).index_add_(0, ids.reshape(-1), torch.ones(3, 4))
    emb.weight.data.untyped_storage().resize_(0)
    out.sum().backward()
    torch.testing.assert_close(emb.weight.grad, expected)
