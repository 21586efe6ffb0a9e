#!/usr/bin/env bash
# Multi-GPU TEMPO on GSM8K, one stage per process: vllm samples on one GPU, then torchrun trains
# with FSDP2 on all of them (`tcli loop` runs under torchrun too, but every rank then samples with
# the hf engine; this pipeline is the way to sample with vllm on several GPUs).
#   MODEL=/models/Qwen3-1.7B NGPU=4 examples/gsm8k/pipeline.sh
# Per step: the next PROMPTS prompts -> sample-tree (vllm, bf16) -> verify -> build-tree ->
# advantages -> torchrun train-step --parallel fsdp -> a normal checkpoint the next step samples from.
# Memory per GPU (examples/gsm8k/memory.py): trainer 10.3 GB on 4 GPUs; vllm alone on GPU 0.
# DRY_RUN=1 prints the tcli commands instead of running them (tests/unit/test_recipes.py parses them).
set -euo pipefail
cd "$(dirname "$0")/../.."
: "${MODEL:?give MODEL=DIR, a local Hugging Face causal LM directory}"
NGPU="${NGPU:-4}"
STEPS="${STEPS:-200}"
PROMPTS="${PROMPTS:-32}"
DATA="${DATA:-tcli/benchmarks/gsm8k_train.jsonl}"  # a JSONL file: each step takes its next lines
EVAL_DATA="${EVAL_DATA:-gsm8k}"                    # a file or a shipped benchmark name
TASK="${TASK:-gsm8k}"
MAX_NEW="${MAX_NEW:-512}"
EVAL_EVERY="${EVAL_EVERY:-20}"
OUT="${OUT:-runs/gsm8k-fsdp}"
TCLI="${TCLI:-tcli}"

run() {  # a tcli command, or its words (one per line, then a blank line) under DRY_RUN
    if [ -n "${DRY_RUN:-}" ]; then printf '%s\n' "$@" ""; else "$@"; fi
}

drop_checkpoint() {  # a checkpoint train-step wrote (tcli_state.json in it), never anything else
    if [ -f "$1/tcli_state.json" ] && [ ! -L "$1" ]; then rm -rf -- "$1"; fi
}

mkdir -p "$OUT"
ckpt="$MODEL"
for ((s = 0; s < STEPS; s++)); do
    d="$OUT/step_$s"
    mkdir -p "$d"
    first=$((s * PROMPTS + 1)) last=$(((s + 1) * PROMPTS))
    sed -n "${first},${last}p;${last}q" "$DATA" > "$d/prompts.jsonl"
    CUDA_VISIBLE_DEVICES=0 run "$TCLI" sample-tree "$d/prompts.jsonl" -m "$ckpt" -o "$d/rollouts.jsonl" \
        --engine vllm --dtype bfloat16 -n 8 --temperature 1.0 --max-new-tokens "$MAX_NEW" \
        --prompt-template boxed --seed "$s"
    run "$TCLI" verify "$d/rollouts.jsonl" --task "$TASK" -o "$d/verified.jsonl"
    run "$TCLI" build-tree "$d/verified.jsonl" -o "$d/tree.arrow"
    run "$TCLI" advantages "$d/tree.arrow" --estimator tempo -o "$d/adv.arrow"
    run torchrun --nproc-per-node "$NGPU" -m tcli train-step "$d/adv.arrow" -m "$ckpt" \
        -o "$OUT/ckpt_$((s + 1))" --parallel fsdp --bf16 --grad-checkpointing \
        --micro-batch-tokens 8192 --lr 1e-6 --device cuda --seed "$s" --metrics "$OUT/metrics.jsonl"
    ckpt="$OUT/ckpt_$((s + 1))"
    if (( (s + 1) % EVAL_EVERY == 0 || s + 1 == STEPS )); then
        CUDA_VISIBLE_DEVICES=0 run "$TCLI" eval -m "$ckpt" -d "$EVAL_DATA" --engine vllm \
            --dtype bfloat16 --task "$TASK" --limit 500 --max-new-tokens "$MAX_NEW" \
            --prompt-template boxed --summary "$OUT/eval_$((s + 1)).json"
    fi
    [ -n "${DRY_RUN:-}" ] || [ $s -lt 2 ] || drop_checkpoint "$OUT/ckpt_$((s - 1))"  # keep the last two
done
