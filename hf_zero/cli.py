"""The ``hf-zero`` command.

Subcommands: ``consolidate`` (sharded checkpoint -> Hugging Face safetensors).
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
                            max_shard_size=args.max_shard_size, progress=not args.quiet)
    except (CheckpointError, ValueError) as exc:
        print(f"hf-zero consolidate: error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {len(files)} file(s) to {args.out_dir}: {', '.join(files)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hf-zero", description="ZeRO training tools for Hugging Face models")
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("consolidate", help="write Hugging Face safetensors from a sharded checkpoint")
    c.add_argument("checkpoint_dir", help="a checkpoint directory, or a directory with a 'latest' pointer")
    c.add_argument("out_dir", help="where to write model*.safetensors and config.json")
    c.add_argument("--tag", default=None, help="which checkpoint under CHECKPOINT_DIR (default: latest)")
    c.add_argument("--dtype", default=None, choices=["bf16", "fp16", "fp32"],
                   help="output dtype (default: the dtype the model trained in)")
    c.add_argument("--max-shard-size", default="5GB", help="largest output file, e.g. 5GB or 500MB")
    c.add_argument("--quiet", action="store_true", help="no progress bar")
    c.set_defaults(func=_consolidate)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
