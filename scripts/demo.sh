#!/usr/bin/env bash
# The main job on the embedded default: a tiny Llama trained with ZeRO stage 2 by two CPU
# processes (gloo), checked against nothing but its own loss going down.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_venv.sh
exec .venv/bin/torchrun --nproc_per_node 2 examples/train_tiny.py "$@"
