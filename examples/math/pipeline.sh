#!/usr/bin/env bash
# Multi-GPU TEMPO toward MATH: full fine-tune of Qwen2.5-Math-7B with FSDP2 on 8 GPUs, trained on
# GSM8K-train, evaluated on MATH-500 (math-verify). The stages are examples/gsm8k/pipeline.sh's.
#   MODEL=/models/Qwen2.5-Math-7B examples/math/pipeline.sh
# Memory per GPU (examples/gsm8k/memory.py): trainer 22.8 GB on 8 GPUs; vllm alone on GPU 0.
set -euo pipefail
export NGPU="${NGPU:-8}" EVAL_DATA="${EVAL_DATA:-math500}" TASK="${TASK:-auto}"
export MAX_NEW="${MAX_NEW:-1024}" EVAL_EVERY="${EVAL_EVERY:-25}" OUT="${OUT:-runs/math-fsdp}"
exec "$(dirname "$0")/../gsm8k/pipeline.sh" "$@"
