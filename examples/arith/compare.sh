#!/usr/bin/env bash
# GRPO vs TEMPO vs TreeRPO vs PPO on the arith task, 3 seeds each, equal sampled-token budget
# (examples/compare.py through examples/arith/compare.py; `make compare TASK=arith` does the same
# with 5 seeds and every method).
# Needs the warm start from `make demo` (runs/demo/sft). Takes ~15-25 minutes on 2 CPU cores.
set -euo pipefail
cd "$(dirname "$0")/../.."
${VENV:-.venv}/bin/python examples/arith/compare.py --out "${OUT:-runs/compare}" "$@"
