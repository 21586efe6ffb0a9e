#!/usr/bin/env bash
# The demo's training loop as a shell pipeline of separate tcli commands, keeping every intermediate
# file: runs/pipeline/step_N/{prompts,rollouts,verified,tree,advantaged}.jsonl + ckpt/.
# Needs the warm start and data from `make demo` (runs/demo/sft, runs/demo/data).
#   bash examples/arith/pipeline.sh [STEPS]
set -euo pipefail
cd "$(dirname "$0")/../.."
STEPS="${1:-5}"
T=${VENV:-.venv}/bin/tcli
PY=${VENV:-.venv}/bin/python
OUT=runs/pipeline
DATA=runs/demo/data
ckpt=runs/demo/sft
[ -f "$ckpt/tcli_state.json" ] || { echo "run 'make demo' first (needs $ckpt)" >&2; exit 2; }
mkdir -p "$OUT"

"$T" eval --model "$ckpt" --data "$DATA/test.jsonl" --task arith --prompt-template plain \
     --max-new-tokens 40 --summary "$OUT/eval_0.json" --quiet
for step in $(seq 1 "$STEPS"); do
  d="$OUT/step_$step"; mkdir -p "$d"
  # 16 prompts per step, a different slice each step
  "$PY" -c "import sys; l=open('$DATA/train.jsonl').readlines(); k=16*($step-1)%len(l); sys.stdout.writelines(l[k:k+16])" > "$d/prompts.jsonl"
  "$T" sample-tree "$d/prompts.jsonl" --model "$ckpt" --n 8 --max-new-tokens 40 --temperature 1.0 \
       --prompt-template plain --seed "$step" -o "$d/rollouts.jsonl"
  "$T" verify "$d/rollouts.jsonl" --task arith -o "$d/verified.jsonl"
  "$T" build-tree "$d/verified.jsonl" -o "$d/tree.jsonl"
  "$T" advantages "$d/tree.jsonl" --estimator tempo -o "$d/advantaged.jsonl" --stats
  "$T" train-step "$d/advantaged.jsonl" --model "$ckpt" -o "$d/ckpt" --lr 2e-4 \
       --metrics "$OUT/train_metrics.jsonl" > /dev/null
  ckpt="$d/ckpt"
done
"$T" eval --model "$ckpt" --data "$DATA/test.jsonl" --task arith --prompt-template plain \
     --max-new-tokens 40 --summary "$OUT/eval_$STEPS.json" --quiet
"$PY" - "$OUT" "$STEPS" <<'PY'
import json, sys
out, steps = sys.argv[1], sys.argv[2]
a, b = (json.load(open(f"{out}/eval_{s}.json")) for s in ("0", steps))
print(f"accuracy before {a['accuracy']:.3f} -> after {steps} pipeline steps {b['accuracy']:.3f}; files in {out}/")
PY
