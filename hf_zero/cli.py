"""The ``hf-zero`` command.

Subcommands: ``consolidate`` (sharded or DeepSpeed checkpoint -> Hugging Face safetensors),
``convert`` (DeepSpeed checkpoint -> hf_zero sharded checkpoint), ``estimate``
(memory per GPU / node for every stage and offload), ``plan`` (the least-sharded setup that fits,
written as a ZeRO JSON), ``train`` (run a recipe under the current launcher), ``recipes`` (list
and validate the recipes), ``launch`` (start a script from an accelerate YAML that says
``distributed_type: DEEPSPEED``, on hf_zero: :mod:`hf_zero.cli_launch`).
"""

from __future__ import annotations

import argparse
import sys
from typing import List, Optional


def _consolidate(args) -> int:
    from .checkpoint.consolidate import consolidate
    from .checkpoint.format import CheckpointError

    try:
        files = consolidate(args.checkpoint_dir, args.out_dir, tag=args.tag, dtype=args.dtype,
                            max_shard_size=args.max_shard_size, progress=not args.quiet,
                            verify=not args.no_verify)
    except (CheckpointError, ValueError, OSError) as exc:
        print(f"hf-zero consolidate: error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {len(files)} file(s) to {args.out_dir}: {', '.join(files)}")
    return 0


def _convert(args) -> int:
    from .checkpoint.convert import convert
    from .checkpoint.format import CheckpointError

    try:
        path = convert(args.ds_dir, args.out_dir, tag=args.tag, ranks=args.ranks)
    except (CheckpointError, ValueError, OSError) as exc:
        print(f"hf-zero convert: error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote hf_zero checkpoint {path}")
    return 0


def _activation_spec(args):
    from .estimate import ActivationSpec

    if args.no_activations:
        return None
    return ActivationSpec(seq_len=args.seq_len, micro_batch=args.micro_batch, recompute=not args.no_recompute,
                          attention=args.attention)


def _shape(args):
    from .estimate import EstimateError, resolve_model
    from .recipes import RecipeError

    try:
        return resolve_model(args.model)
    except (EstimateError, RecipeError) as exc:
        print(f"hf-zero {args.command}: error: {exc}", file=sys.stderr)
        return None


def _estimate(args) -> int:
    from .estimate import as_json, estimate_all, format_table

    shape = _shape(args)
    if shape is None:
        return 2
    spec = _activation_spec(args)
    rows = estimate_all(shape, args.gpus, args.nodes, spec=spec, dtype=args.dtype)
    if args.json:
        print(as_json(shape, rows, spec))
    else:
        print(format_table(shape, args.gpus * args.nodes, args.gpus, rows, spec))
    return 0


def _plan(args) -> int:
    import json

    from .estimate import GB, plan

    shape = _shape(args)
    if shape is None:
        return 2
    p = plan(shape, args.gpus, args.gpu_memory, args.nodes, cpu_memory_gb=args.cpu_memory,
             activations=_activation_spec(args), dtype=args.dtype)
    cfg = p.zero_config(nvme_path=args.nvme_path)
    if args.json:
        print(json.dumps({"setup": p.setup.label, "fits": p.fits, "per_gpu_gb": p.estimate.gpu_total / GB,
                          "reasons": p.reasons, "zero_config": cfg}, indent=2))
    else:
        print(f"model: {shape.name} ({shape.num_params / 1e9:.3f}B parameters), {args.nodes} node(s) x {args.gpus} "
              f"GPU(s) of {args.gpu_memory:g} GB")
        print(f"recommended: {p.setup.label}" + ("" if p.fits else "  (DOES NOT FIT)"))
        for r in p.reasons:
            print(f"  - {r}")
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(cfg, fh, indent=2)
            fh.write("\n")
        if not args.json:
            print(f"wrote {args.out}")
    return 0 if p.fits else 1


def _train(args) -> int:
    from .config import ConfigError
    from .recipes import RecipeError, run

    try:
        run(args.recipe, args.overrides, smoke=args.smoke, output_dir=args.output_dir)
    except (RecipeError, ConfigError) as exc:
        print(f"hf-zero train: error: {exc}", file=sys.stderr)
        return 2
    return 0


def _recipes(args) -> int:
    from .estimate import GB
    from .recipes import list_recipes, load_recipe, validate

    bad = 0
    names = args.names or list_recipes()
    for name in names:
        v = validate(load_recipe(name))
        status = "ok" if v.ok else "INVALID"
        est = f"{v.estimate.gpu_total / GB:.1f} GB per {'process' if v.recipe.on_cpu else 'GPU'}" if v.estimate else "-"
        print(f"{name:<28} {status:<8} {v.estimate.setup.label if v.estimate else '-':<30} {est}")
        for msg in v.errors:
            print(f"    error: {msg}")
        for msg in v.warnings:
            print(f"    warning: {msg}")
        bad += not v.ok
    return 1 if bad else 0


def _launch(args) -> int:
    from .cli_launch import main as launch_main

    target = ["-m", *args.target] if args.module and args.target else list(args.target)
    return launch_main(args.config_file, target, num_processes=args.num_processes,
                       main_process_port=args.main_process_port)


def _add_model_args(p):
    p.add_argument("model", metavar="MODEL_OR_CONFIG",
                   help="a recipe name/path, a config.json or model directory, a cached hub id, or a count (7B)")
    p.add_argument("--gpus", type=int, required=True, help="GPUs (ranks) per node")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16", help="training precision")
    p.add_argument("--seq-len", type=int, default=2048, help="activation estimate: tokens per sample")
    p.add_argument("--micro-batch", type=int, default=1, help="activation estimate: samples per micro-step")
    p.add_argument("--no-recompute", action="store_true", help="activation estimate without recomputation")
    p.add_argument("--attention", choices=["sdpa", "flash", "eager"], default="sdpa")
    p.add_argument("--no-activations", action="store_true", help="model states only")
    p.add_argument("--json", action="store_true", help="machine-readable output")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hf-zero", description="ZeRO training tools for Hugging Face models")
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("consolidate", help="write Hugging Face safetensors from a sharded (or DeepSpeed) checkpoint")
    c.add_argument("checkpoint_dir", help="a checkpoint directory, or a directory with a 'latest' pointer")
    c.add_argument("out_dir", help="where to write model*.safetensors and config.json")
    c.add_argument("--tag", default=None, help="which checkpoint under CHECKPOINT_DIR (default: latest)")
    c.add_argument("--dtype", default=None, choices=["bf16", "fp16", "fp32"],
                   help="output dtype (default: the dtype the model trained in)")
    c.add_argument("--max-shard-size", default="5GB", help="largest output file, e.g. 5GB or 500MB")
    c.add_argument("--quiet", action="store_true", help="no progress bar")
    c.add_argument("--no-verify", action="store_true",
                   help="skip the sha256 check of the rank files (sizes are still checked)")
    c.set_defaults(func=_consolidate)

    v = sub.add_parser("convert", help="write a DeepSpeed ZeRO checkpoint as an hf_zero sharded checkpoint")
    v.add_argument("ds_dir", help="the DeepSpeed checkpoint: the directory with 'latest', or a global_stepN/")
    v.add_argument("out_dir", help="where to write <tag>/index.json, the rank files and 'latest'")
    v.add_argument("--tag", default=None, help="which DeepSpeed tag (default: its 'latest')")
    v.add_argument("--ranks", type=int, default=None,
                   help="number of rank files (default: the DeepSpeed run's world size); any count resumes anywhere")
    v.set_defaults(func=_convert)

    e = sub.add_parser("estimate", help="memory per GPU and per node for each stage, with and without offload")
    _add_model_args(e)
    e.set_defaults(func=_estimate)

    p = sub.add_parser("plan", help="recommend the least-sharded setup that fits and write its ZeRO JSON")
    _add_model_args(p)
    p.add_argument("--gpu-memory", type=float, required=True, help="memory of one GPU, GB")
    p.add_argument("--cpu-memory", type=float, default=None, help="host memory per node, GB (checks CPU offload)")
    p.add_argument("--nvme-path", default="/local_nvme", help="nvme_path written when NVMe offload is chosen")
    p.add_argument("--out", default=None, help="write the ZeRO JSON here")
    p.set_defaults(func=_plan)

    t = sub.add_parser("train", help="run a recipe under the current launcher (torchrun / accelerate launch)")
    t.add_argument("recipe", help="a recipe name (see `hf-zero recipes`) or directory")
    t.add_argument("overrides", nargs="*", metavar="key=value",
                   help="TrainingArguments fields, or zero.<dotted.key> for the ZeRO config")
    t.add_argument("--smoke", action="store_true",
                   help="same model class and ZeRO config, tiny random model and local data: seconds on a CPU")
    t.add_argument("--output-dir", default=None, help="default: runs/<recipe>")
    t.set_defaults(func=_train)

    la = sub.add_parser("launch", help="run a script from an accelerate config YAML with distributed_type: DEEPSPEED "
                                       "(hf_zero in place of DeepSpeed)")
    la.add_argument("--config_file", "--config-file", required=True,
                    help="the accelerate config YAML (deepspeed_config: {deepspeed_config_file: zero.json})")
    la.add_argument("--num_processes", "--num-processes", type=int, default=None,
                    help="override the YAML's num_processes (over all machines)")
    la.add_argument("--main_process_port", "--main-process-port", type=int, default=None,
                    help="override the YAML's main_process_port")
    la.add_argument("-m", "--module", action="store_true", help="run a module (python -m MODULE), not a script")
    la.add_argument("target", nargs=argparse.REMAINDER, metavar="SCRIPT [ARGS...] | -m MODULE [ARGS...]",
                    help="what to run, with its own arguments")
    la.set_defaults(func=_launch)

    r = sub.add_parser("recipes", help="list the recipes and validate them (config, batch, memory)")
    r.add_argument("names", nargs="*")
    r.set_defaults(func=_recipes)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # key=value overrides may follow the options of `train`
        if getattr(args, "command", None) != "train" or any("=" not in x or x.startswith("-") for x in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = list(args.overrides) + extra
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
