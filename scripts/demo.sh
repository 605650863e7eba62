#!/usr/bin/env bash
# The main job on the embedded default (recipes/tiny): a small Llama-architecture model learns
# two-digit addition from data/addition with ZeRO stage 2 + CPU optimizer offload on two CPU
# processes (gloo); it writes the sharded checkpoint and the consolidated safetensors, reloads
# them with from_pretrained and prints its answers and its accuracy before and after.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_venv.sh
exec .venv/bin/torchrun --nproc_per_node 2 -m hf_zero.cli train tiny "$@"
