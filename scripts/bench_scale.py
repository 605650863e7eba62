#!/usr/bin/env python
"""Bytes by link and step time of each hierarchical mode on a simulated 2-node x 2-rank cluster.

One command; this file is both the launcher and the worker:

    python scripts/bench_scale.py              # all modes, 2x2, 10 timed steps each
    python scripts/bench_scale.py --quick      # 3 timed steps each
    python scripts/bench_scale.py --json out.json

What it does
------------
* Launch: two torchrun agents on localhost (``--nnodes 2 --nproc_per_node 2``, c10d
  rendezvous), as tests/launch.py:launch_cluster does; ranks 0-1 are node 0, ranks 2-3 node 1.
  Both "nodes" share this machine, so no link is slower than another: the step times show the
  compute and (de)quantization cost of each mode, not what a slow interconnect would cost.
* Every mode trains the same Llama (random init, fp32, AdamW) on the same batches. After
  ``--warmup`` untimed steps, ``--steps`` steps are timed (ranks aligned with an untimed barrier;
  a step's time is the slowest rank's); the bytes of the last step are summed over the 4 ranks
  and split by link from the engine's counters (memory_report()["comm_bytes_last_step"]).
* The formula (hf_zero.memory.link_bytes_per_step) is printed next to the measurement for the
  same flats, and for an 8-node x 8-GPU and a 128-node x 8-GPU cluster with a 7B-parameter bf16
  model (per GPU, per step, accumulation 1), MiCS and hpZ groups being one node (8 GPUs) there.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench import REPO, free_port, timed_step  # noqa: E402
MODES = {
    "stage 3": {"stage": 3},
    "MiCS node (stage 3)": {"stage": 3, "mics_shard_size": 2},
    "MiCS node (stage 2)": {"stage": 2, "mics_shard_size": 2},
    "hpZ node": {"stage": 3, "zero_hpz_partition_size": 2},
    "qwZ": {"stage": 3, "zero_quantized_weights": True},
    "qgZ": {"stage": 3, "zero_quantized_gradients": True},
    "ZeRO++ (qwZ+qgZ+hpZ)": {"stage": 3, "zero_quantized_weights": True, "zero_quantized_gradients": True,
                             "zero_hpz_partition_size": 2},
    "stage 2": {"stage": 2},
}
#: group sizes of one node (2 here) become the big clusters' node size (8) in the formula rows
NODE_SIZED = ("mics_shard_size", "zero_hpz_partition_size")
NODES, PER_NODE = 2, 2


def _formula(flats, zero: dict, nodes: int, per_node: int, nbytes: int, again=None) -> dict:
    from hf_zero.memory import link_bytes_per_step

    return link_bytes_per_step(flats, zero["stage"], nodes, per_node, param_bytes=nbytes, grad_bytes=nbytes,
                               backward_gathered=again,
                               mics_shard_size=zero.get("mics_shard_size", -1),
                               hpz_partition_size=zero.get("zero_hpz_partition_size", 1),
                               quantized_weights=zero.get("zero_quantized_weights", False),
                               quantized_gradients=zero.get("zero_quantized_gradients", False))


# ---------------------------------------------------------------------------------- worker
def step(engine, ids):
    loss = engine(input_ids=ids, labels=ids).loss
    engine.backward(loss)
    engine.step()
    return loss


def worker(args) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import hf_zero
    from hf_zero.initialize import init_distributed

    rank, world = init_distributed()
    cfg = LlamaConfig(vocab_size=512, hidden_size=args.hidden, intermediate_size=2 * args.hidden,
                      num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=64, tie_word_embeddings=False)
    g = torch.Generator().manual_seed(1)
    data = [torch.randint(0, 512, (world, 4, 32), generator=g) for _ in range(args.warmup + args.steps)]
    out = {}
    for name, zero in MODES.items():
        torch.manual_seed(0)
        model = LlamaForCausalLM(cfg)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        engine, *_ = hf_zero.initialize(model=model, optimizer=opt, config={
            "train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1, "gradient_clipping": 1.0,
            "zero_optimization": zero})
        times = []
        for i, batch in enumerate(data):
            ids = batch[rank]
            loss, dt = timed_step(lambda: step(engine, ids))
            if i >= args.warmup:
                times.append(dt)
        comm = engine.memory_report()["comm_bytes_last_step"]
        again = set(engine.runtime.regathered_in_backward())
        out[name] = {"step_s": sorted(times)[len(times) // 2], "comm": comm, "loss": loss.item(),
                     "flats": [f.padded_numel for u in engine.units for f in u.flats if f.trainable],
                     # stage 3: whether the flat is all-gathered again in backward
                     "again": [u in again for u in engine.units for f in u.flats if f.trainable]}
        engine.destroy()
    Path(args.out_dir, f"rank{rank}.json").write_text(json.dumps(out))


# ---------------------------------------------------------------------------------- launcher
def launch(args) -> dict:
    port = free_port()
    out_dir = Path(tempfile.mkdtemp(prefix="bench_scale_"))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    passthrough = ["--worker", "--out-dir", str(out_dir), "--steps", str(args.steps), "--warmup", str(args.warmup),
                   "--hidden", str(args.hidden), "--layers", str(args.layers)]
    procs = []
    for node in range(NODES):
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nnodes={NODES}", f"--nproc_per_node={PER_NODE}",
               "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}", f"--rdzv_id=bench{port}",
               "--max_restarts=0", __file__, *passthrough]
        procs.append(subprocess.Popen(cmd, env=env, stdout=open(out_dir / f"node{node}.log", "w"), stderr=subprocess.STDOUT))
    codes = [p.wait() for p in procs]
    if any(codes):
        logs = "\n".join((out_dir / f"node{i}.log").read_text()[-3000:] for i in range(NODES))
        raise SystemExit(f"bench_scale: a node failed ({codes}); logs in {out_dir}:\n{logs}")
    return [json.loads((out_dir / f"rank{r}.json").read_text()) for r in range(NODES * PER_NODE)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out-dir", help=argparse.SUPPRESS)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    if args.quick:
        args.steps, args.warmup = 3, 1
    sys.path.insert(0, str(REPO))
    per_rank = launch(args)
    rows, big = [], []
    psi = 7 * 2**30  # a 7B-parameter model (a size whose shards split into 256-element blocks)
    for name, zero in MODES.items():
        res = [r[name] for r in per_rank]
        cross = sum(r["comm"]["cross_node"]["data"] for r in res)
        intra = sum(r["comm"]["intra_node"]["data"] for r in res)
        f = _formula(res[0]["flats"], zero, NODES, PER_NODE, 4, res[0]["again"])
        row = {"mode": name, "zero_optimization": zero, "step_s": res[0]["step_s"], "cross_node_bytes": cross,
               "intra_node_bytes": intra, "formula_cross_node_bytes": f["cross_node"],
               "formula_intra_node_bytes": f["intra_node"], "loss": res[0]["loss"]}
        for nodes in (8, 128):
            # one flat, all of it gathered again in backward at stage 3 (an upper bound: the
            # engine skips the head and the embedding there, ~4% of a 7B model)
            g = _formula([psi], {k: (8 if k in NODE_SIZED else v) for k, v in zero.items()}, nodes, 8, 2)
            row[f"{nodes}x8_cross_node_GB_per_gpu"] = g["cross_node"] / (nodes * 8) / 1e9
            row[f"{nodes}x8_intra_node_GB_per_gpu"] = g["intra_node"] / (nodes * 8) / 1e9
        rows.append(row)
    params = sum(per_rank[0]["stage 3"]["flats"])
    print(f"2 nodes x 2 ranks (simulated on this machine), Llama hidden {args.hidden}, {args.layers} layers, "
          f"{params / 1e6:.2f}M parameters (padded), fp32; bytes per step summed over the 4 ranks")
    print(f"{'mode':<22} {'step ms':>8} {'cross MB':>9} {'(formula)':>9} {'intra MB':>9} {'(formula)':>9} "
          f"{'8x8 cross GB/GPU':>17} {'128x8 cross GB/GPU':>19}")
    for r in rows:
        print(f"{r['mode']:<22} {1e3 * r['step_s']:8.1f} {r['cross_node_bytes'] / 1e6:9.3f} "
              f"{r['formula_cross_node_bytes'] / 1e6:9.3f} {r['intra_node_bytes'] / 1e6:9.3f} "
              f"{r['formula_intra_node_bytes'] / 1e6:9.3f} {r['8x8_cross_node_GB_per_gpu']:17.2f} "
              f"{r['128x8_cross_node_GB_per_gpu']:19.2f}")
    print("(8x8 and 128x8: formula, 7B parameters in bf16, accumulation 1, per GPU per step)")
    if args.json:
        Path(args.json).write_text(json.dumps({"nodes": NODES, "ranks_per_node": PER_NODE, "params_padded": params,
                                               "steps": args.steps, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
