#!/usr/bin/env bash
# Every GPU path in one run of at most 13 minutes, on a machine with a CUDA GPU, from the repo root:
# official vLLM, CUDA projection in float32 and bfloat16, faiss-gpu, the projected pass's
# throughput against a training step and exact gradients on the GPU, and the shared-prompt pass on
# GRPO-shaped work. Record the output in docs/benchmarks.md (section "GPU").
#
#   bash benchmarks/gpu_check.sh [VENV]      # VENV: where to install (default .venv-gpu)
set -euo pipefail
VENV=${1:-.venv-gpu}
OUT=${OUT:-/tmp/gradsel-gpu-check}
if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
    # The CUDA build of torch that official vLLM pins, then gradsel with the gpu extra.
    "$VENV/bin/pip" install --quiet -e '.[gpu,math]'
fi
PY="$VENV/bin/python"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
timeout 420 "$PY" benchmarks/gpu_check.py --out "$OUT"
# Throughput on the GPU: the 36M Llama, 64 problems x 8 rollouts, bfloat16, 16384-token packing.
timeout 120 "$PY" benchmarks/score.py --model 50m --problems 64 --repeats 3 --device cuda --dtype bfloat16 \
    --max-tokens-per-batch 16384 | tail -12
# The shared-prompt pass on GRPO-shaped work (prompts ~300 tokens, responses 100-150, k = 16):
# shared / today's path / a training step over the same sequences, and the padding of each packing.
timeout 240 "$PY" benchmarks/score.py --shape grpo --model 50m --problems 16 --k 16 --repeats 3 --device cuda \
    --dtype bfloat16 --max-tokens-per-batch 16384 | tail -12
