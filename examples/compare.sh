#!/usr/bin/env bash
# Paired comparison of RL methods on one task (examples/compare.py; `make compare TASK=...`).
#   TASK=countdown (default) | arith | tools | path/to/config.toml; OUT (default runs/compare-<task>);
#   any other flag goes to compare.py, e.g. --methods grpo,tempo --seeds 0,1,2 --token-budget 60000.
# Builds the task's data and warm start first when they are missing.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
TASK="${TASK:-countdown}"
case "$TASK" in
  countdown)
    bash examples/countdown/prepare.sh
    CONFIG=examples/countdown/countdown.toml ;;
  arith)  # make demo's data and warm start, built with demo.sh's commands when missing
    [ -f runs/demo/data/test.jsonl ] || \
      $PY -m examples.arith.make_data --out runs/demo/data --n-train 2000 --n-test 200 --seed 0
    [ -f runs/demo/sft/tcli_state.json ] || OMP_NUM_THREADS=1 \
      $PY -m examples.arith.warmstart --out runs/demo/sft --data runs/demo/data --eval-n 0 --seed 0
    CONFIG=examples/arith/demo.toml ;;
  tools)  # make demo-tools' data and warm start, built with its commands when missing
    [ -f runs/tools/data/test.jsonl ] || \
      $PY -m examples.tools.make_data --out runs/tools/data --n-train 2000 --n-test 200 --seed 0
    [ -f runs/tools/sft/tcli_state.json ] || OMP_NUM_THREADS=1 \
      $PY -m examples.tools.warmstart --out runs/tools/sft --data runs/tools/data --eval-n 0 --seed 0
    CONFIG=examples/tools/demo.toml ;;
  *)
    [ -f "$TASK" ] || { echo "compare.sh: TASK must be countdown, arith, tools or a config file, not '$TASK'" >&2; exit 2; }
    CONFIG="$TASK" ;;
esac
exec $PY examples/compare.py --config "$CONFIG" --out "${OUT:-runs/compare-$(basename "$TASK" .toml)}" "$@"
