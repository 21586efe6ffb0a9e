#!/usr/bin/env bash
# make demo: a complete RL run on this machine in minutes.
#   1. generate the arith task (train/test prompt files),
#   2. warm-start a tiny model by SFT on noisy step-by-step solutions (accuracy 10-50 %),
#   3. `tcli loop` with TEMPO (sample -> verify -> build-tree -> advantages -> train-step, eval),
#   4. print initial vs final accuracy and write runs/demo/tempo/metrics.png.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${VENV:-.venv}/bin/python
TCLI=${VENV:-.venv}/bin/tcli
OUT=runs/demo
start=$(date +%s)
mkdir -p "$OUT"

echo "== 1/3 arith task -> $OUT/data" >&2
$PY -m examples.arith.make_data --out "$OUT/data" --n-train 2000 --n-test 200 --seed 0 >&2

if [ ! -f "$OUT/sft/tcli_state.json" ]; then
  echo "== 2/3 warm start (SFT) -> $OUT/sft" >&2
  $PY -m examples.arith.warmstart --out "$OUT/sft" --data "$OUT/data" --eval-n 0 --seed 0 >&2
fi

echo "== 3/3 tcli loop (TEMPO) -> $OUT/tempo" >&2
# --overwrite: a previous demo run there is replaced (only the files tcli wrote); a directory
# holding anything else is refused (exit 2), never deleted
$TCLI loop --config examples/arith/demo.toml --overwrite

$PY - "$OUT/tempo" "$start" "$TCLI" <<'PY'
import json, sys, time
run, start, tcli = sys.argv[1], int(sys.argv[2]), sys.argv[3]
ev = [json.loads(l) for l in open(f"{run}/metrics.jsonl")]
ev = [m for m in ev if m["kind"] == "eval"]
first, last = ev[0], ev[-1]
best = max(ev, key=lambda m: m["accuracy"])
print()
print(f"{'':24}{'accuracy':>10}{'95% CI':>18}{'step':>6}{'train s':>9}")
for name, m in (("initial (warm start)", first), ("final", last), ("best", best)):
    lo, hi = m["accuracy_ci95"]
    print(f"{name:24}{m['accuracy']:>10.3f}{f'[{lo:.3f}, {hi:.3f}]':>18}{m['step']:>6}{m['wall_time']:>9.0f}")
print(f"\ngain: {100 * (last['accuracy'] - first['accuracy']):+.1f} points on {last['prompts']} held-out "
      f"prompts (greedy); total wall time of make demo's steps: {time.time() - start:.0f}s")
print(f"plot: {run}/metrics.png   rollouts: {run}/rollouts/   try: {tcli} show-tree {run}/rollouts/step_1.arrow")
PY
