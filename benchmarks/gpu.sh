#!/usr/bin/env bash
# The GPU figures in one go: lenet's training benchmark and the inference benchmark on CUDA.
#
#   bash benchmarks/gpu.sh [OUT_DIR]      # default OUT_DIR: $OUT if set, else benchmarks/results
#
# Uses .venv if it is there (carried from a set-up machine), else runs `make setup`. The venv
# must hold a CUDA build of torch: `make setup` pins the CPU build, so on a fresh GPU machine
# install one first, e.g. `.venv/bin/pip install torch==2.13.0 --index-url
# https://download.pytorch.org/whl/cu126` (pick the CUDA version nvidia-smi allows).
# Writes OUT_DIR/gpu-<gpu name>.txt (the GPU, driver, versions, then both benchmarks' tables)
# and the training benchmark's JSON beside it. Without a usable GPU it says why and exits 2.
set -euo pipefail

cd "$(dirname "$0")/.."
out_dir="${1:-${OUT:-benchmarks/results}}"
python=".venv/bin/python"

if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
    echo "gpu.sh: no NVIDIA GPU here (nvidia-smi is missing or sees no GPU); nothing measured." >&2
    echo "gpu.sh: run it on a machine with a GPU; for CPU figures use benchmarks/train_speed.py." >&2
    exit 2
fi
if [[ ! -x "$python" ]]; then
    echo "gpu.sh: no .venv here: running make setup" >&2
    make setup
fi
if ! "$python" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "gpu.sh: nvidia-smi sees a GPU, but the torch in .venv cannot use it:" >&2
    "$python" -c 'import torch; print("  torch", torch.__version__, "CUDA build:", torch.version.cuda)' >&2
    echo "gpu.sh: install a CUDA build of torch into .venv (see the top of this script)." >&2
    exit 2
fi
if ! "$python" -m lenet data info mnist --json | "$python" -c 'import json, sys; sys.exit(0 if json.load(sys.stdin)["verified"] else 1)'; then
    "$python" -m lenet data fetch mnist
fi

gpu_name="$(nvidia-smi --query-gpu=name --format=csv,noheader | head -n 1)"
slug="$(printf '%s' "$gpu_name" | tr -cs 'A-Za-z0-9' '-' | sed 's/^-*//; s/-*$//' | tr 'A-Z' 'a-z')"
mkdir -p "$out_dir"
report="$out_dir/gpu-${slug}.txt"

{
    echo "# lenet GPU benchmarks, $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "# commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
    echo
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
    echo
    echo "## Training: benchmarks/train_speed.py --device cuda (fp32)"
    echo
    "$python" benchmarks/train_speed.py --device cuda --json "$out_dir/train-${slug}-fp32.json"
    echo
    echo "## Training: benchmarks/train_speed.py --device cuda --amp bf16"
    echo
    "$python" benchmarks/train_speed.py --device cuda --amp bf16 \
        --json "$out_dir/train-${slug}-bf16.json"
    echo
    echo "## Inference: benchmarks/inference_speed.py --device cuda"
    echo
    "$python" benchmarks/inference_speed.py --device cuda
} 2>&1 | tee "$report"

echo "gpu.sh: figures written to $report" >&2
