"""Fast checks (no processes) of the pieces behind tests/test_scale.py: the topology, the
per-link formula against hand-computed values, int8 blockwise quantization, and the config
and size errors for MiCS / ZeRO++."""

from __future__ import annotations

import pytest
import torch

from hf_zero.config import ConfigError, ZeroConfig
from hf_zero.engine import quant
from hf_zero.engine.hierarchy import ScaleSettings, check_settings
from hf_zero.engine.topology import CROSS, INTRA, Topology, TopologyError
from hf_zero.memory import comm_bytes_per_step, link_bytes_per_step


def test_topology_nodes_and_rings():
    t = Topology(8, 4)
    assert t.num_nodes == 2 and t.node_of(3) == 0 and t.node_of(4) == 1 and t.local_rank_of(6) == 2
    assert t.node_ranks(1) == (4, 5, 6, 7)
    assert t.ring_link(list(range(8)), 3) == CROSS and t.ring_link(list(range(8)), 2) == INTRA
    assert t.ring_link(list(range(8)), 7) == CROSS  # the ring closes back to node 0
    assert t.ring_cross_edges(list(range(8))) == 2
    assert t.ring_cross_edges([0, 4]) == 2 and t.ring_cross_edges([0, 1]) == 0
    assert t.ring_cross_edges([1, 5]) == 2 and t.ring_cross_edges([5]) == 0


def test_topology_from_launcher_env():
    env = {"LOCAL_WORLD_SIZE": "2", "GROUP_RANK": "1"}
    assert Topology.from_launcher(4, 3, env=env) == Topology(4, 2)
    assert Topology.from_launcher(4, 3, ranks_per_node=1, env=env) == Topology(4, 1)  # the config wins
    assert Topology.from_launcher(4, 0, env={}) == Topology(4, 4)  # no launcher info: one node
    with pytest.raises(TopologyError, match="GROUP_RANK"):
        Topology.from_launcher(4, 0, env=env)  # rank 0 on node 1: not laid out node by node
    with pytest.raises(TopologyError, match="do not fill nodes of 3 ranks"):
        Topology(4, 3)


def test_link_formula_by_hand():
    p, b = 1024, 2  # one flat of 1024 elements, 2 bytes, 2 nodes x 2 ranks
    # stage 3: three world rings (forward and backward all-gather, reduce-scatter); each member
    # sends 3 * 256 elements; 2 of the ring's 4 edges cross nodes
    per = 3 * 256 * b
    assert link_bytes_per_step([p], 3, 2, 2, param_bytes=b, grad_bytes=b) == {"cross_node": 3 * 2 * per,
                                                                              "intra_node": 3 * 2 * per}
    # the flat formula's per-rank total, times the world, is the cluster total
    tot = link_bytes_per_step([p], 3, 2, 2, param_bytes=b, grad_bytes=b)
    assert sum(tot.values()) == 4 * comm_bytes_per_step(p, 3, 4, param_bytes=b, grad_bytes=b)
    # hpZ: the backward all-gather runs in the node groups (1 element of 2 ... 512 per member)
    hpz = link_bytes_per_step([p], 3, 2, 2, hpz_partition_size=2, param_bytes=b, grad_bytes=b)
    assert hpz == {"cross_node": 2 * 2 * per, "intra_node": 2 * 2 * per + 4 * 512 * b}
    # MiCS with a shard group per node: gathers and reduce-scatters stay in the node; the replica
    # all-reduce of each 512-element shard (pairs {0,2}, {1,3}: both edges cross) crosses
    mics = link_bytes_per_step([p], 3, 2, 2, mics_shard_size=2, param_bytes=b, grad_bytes=b)
    assert mics == {"cross_node": 2 * 2 * (2 * 1 / 2 * 512 * b), "intra_node": 3 * 4 * 512 * b}
    # qgZ: node step, 2 pieces of 512 (block 256): 1 peer each gets 512 + 2*4 bytes, intra;
    # cross step, 2 pieces of 256: 256 + 4 bytes to the one peer on the other node
    qg = link_bytes_per_step([p], 3, 2, 2, quantized_gradients=True, param_bytes=b, grad_bytes=b)
    assert qg["cross_node"] == 2 * 2 * per + 4 * (256 + 4)
    assert qg["intra_node"] == 2 * 2 * per + 4 * (512 + 8)
    # qwZ: each all-gathered element is 1 byte plus a 4-byte scale per 256
    qw = link_bytes_per_step([p], 3, 2, 2, quantized_weights=True, param_bytes=b, grad_bytes=b)
    assert qw["cross_node"] == 2 * 2 * 3 * (256 + 4) + 2 * per


def test_zero_pp_cuts_cross_node_bytes_at_scale():
    psi = 2**30  # padded sizes are multiples of 16 x world: blocks of 256
    base = link_bytes_per_step([psi], 3, 8, 8)["cross_node"]
    zpp = link_bytes_per_step([psi], 3, 8, 8, hpz_partition_size=8, quantized_weights=True,
                              quantized_gradients=True)["cross_node"]
    assert 2.5 < base / zpp < 4.0  # 3.1x: int8 gradients where ZeRO++ sends int4 (4x)


def test_quantize_roundtrip_error_bound():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4096, generator=g) * torch.linspace(1e-3, 10, 4096)
    x[:256] = 0  # an all-zero block stays exactly zero
    block = quant.block_size(x.numel())
    assert block == 256 and quant.block_size(48) == 16 and quant.block_size(7) == 1
    q, s = quant.quantize(x, block)
    assert q.dtype == torch.int8 and s.numel() == 16
    y = quant.dequantize(q, s, block, torch.empty_like(x))
    assert torch.equal(y[:256], torch.zeros(256))
    step = s.repeat_interleave(block)
    assert ((y - x).abs() <= step / 2 + 1e-6 * x.abs()).all()
    assert (y - x).abs().max() > 0
    x[300] = float("inf")
    q, s = quant.quantize(x, block)
    assert not torch.isfinite(quant.dequantize(q, s, block, torch.empty_like(x))[256:512]).all()
    assert quant.wire_bytes(4096, 256) == 4096 + 64


@pytest.mark.parametrize(
    ("zero", "message"),
    [
        ({"stage": 0, "mics_shard_size": 2}, r"mics_shard_size: 2 needs stage 1, 2 or 3"),
        ({"stage": 2, "zero_hpz_partition_size": 2}, r"zero_hpz_partition_size: ZeRO\+\+ .* needs stage 3"),
        ({"stage": 2, "zero_quantized_weights": True}, r"zero_quantized_weights: ZeRO\+\+ .* needs stage 3"),
        ({"stage": 3, "mics_shard_size": 2, "zero_quantized_gradients": True}, r"cannot be combined with ZeRO\+\+"),
        ({"stage": 3, "mics_hierarchical_params_gather": True}, r"hierarchical all-gather is not built"),
        ({"stage": 3, "mics_shard_size": -2}, r"mics_shard_size: expected an integer >= -1"),
    ],
)
def test_unsupported_combinations_are_config_errors(zero, message):
    with pytest.raises(ConfigError, match=message):
        ZeroConfig.load({"zero_optimization": zero})


def test_accepted_keys_round_trip():
    cfg = ZeroConfig.load({"zero_optimization": {"stage": 3, "zero_hpz_partition_size": 8, "zero_quantized_weights": True,
                                                 "zero_quantized_gradients": 1}, "hf_zero": {"ranks_per_node": 8}})
    assert ZeroConfig.load(cfg.to_dict()) == cfg
    s = ScaleSettings.from_config(cfg.zero_optimization)
    assert s.hpz and s.quantized_weights and s.quantized_gradients and not s.mics
    # DeepSpeed's "off" spellings
    off = ZeroConfig.load({"zero_optimization": {"stage": 3, "zero_hpz_partition_size": 0, "mics_shard_size": 0}})
    assert not ScaleSettings.from_config(off.zero_optimization).active


@pytest.mark.parametrize(
    ("settings", "world", "per_node", "message"),
    [
        (ScaleSettings(mics_shard_size=3), 4, 2, r"mics_shard_size: 3 does not divide the world of 4"),
        (ScaleSettings(hpz_partition_size=4), 8, 2, r"zero_hpz_partition_size: 4 would make hpZ groups span nodes"),
        (ScaleSettings(hpz_partition_size=3), 4, 4, r"3 does not divide the world of 4"),
    ],
)
def test_sizes_checked_against_the_world(settings, world, per_node, message):
    with pytest.raises(ConfigError, match=message):
        check_settings(settings, stage=3, world_size=world, topology=Topology(world, per_node), offload_param=False)
    with pytest.raises(ConfigError, match="not built with offload_param"):
        check_settings(ScaleSettings(quantized_weights=True), stage=3, world_size=2, topology=Topology(2, 2),
                       offload_param=True)
