#!/usr/bin/env bash
# The GPU check, for a machine with one CUDA GPU (run from the repository root; needs torch,
# transformers, accelerate, safetensors, pytest installed; hf_zero itself runs from the tree).
# 1. the CUDA parity tests at world size 1 (partial offload and the copy stream included);
# 2. the offload step benchmark at the 1.3B and 3.4B Llama shapes: no offload, exact, delayed,
#    partial ratio 0.3 and 0.5 (scripts/bench_offload_gpu.py --modes to pick fewer).
# Finishes within ~10 minutes on an H100/H200; prints a short table and writes runs/*.json.
# Without a GPU, check the benchmark script itself with:
#   python scripts/bench_offload_gpu.py --device cpu --shapes tiny --seq 32 --micro 2
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT=${OUT:-runs}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
echo "== CUDA parity tests"
timeout 240 python -m pytest -q tests/test_cuda.py -p no:cacheprovider 2>&1 | tail -5
echo "== offload benchmark (bf16, stage 2, CPU optimizer offload: none / exact / delayed / ratio 0.3 / 0.5)"
timeout 420 python scripts/bench_offload_gpu.py --json "$OUT/bench_offload_gpu.json" "$@"
