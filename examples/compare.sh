#!/usr/bin/env bash
# Paired comparison of RL methods on one task (examples/compare.py; `make compare TASK=...`).
#   TASK=countdown (default) | arith | tools | path/to/config.toml; OUT (default runs/compare-<task>);
#   any other flag goes to compare.py, e.g. --methods grpo,tempo --seeds 0,1,2 --token-budget 60000.
# Builds the task's data and warm start first when they are missing (examples/prepare_task.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
TASK="${TASK:-countdown}"
CONFIG=$(bash examples/prepare_task.sh "$TASK")
exec ${VENV:-.venv}/bin/python examples/compare.py --config "$CONFIG" --out "${OUT:-runs/compare-$(basename "$TASK" .toml)}" "$@"
