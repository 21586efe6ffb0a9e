#!/usr/bin/env bash
# The countdown task's data (runs/countdown/data) and warm start (runs/countdown/sft), each built
# only when missing. The warm start's settings were chosen on val.jsonl; test is reported once.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${VENV:-.venv}/bin/python
OUT=runs/countdown
[ -f "$OUT/data/test.jsonl" ] || $PY -m examples.countdown.make_data --out "$OUT/data" --seed 0
if [ ! -f "$OUT/sft/tcli_state.json" ]; then
  OMP_NUM_THREADS=1 $PY -m examples.countdown.warmstart --out "$OUT/sft" --data "$OUT/data" \
    --good-rate "${GOOD_RATE:-0.5}" --eval-file test.jsonl --seed 0
fi
