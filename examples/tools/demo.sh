#!/usr/bin/env bash
# make demo-tools: RL teaches a tiny model to call a tool.
#   1. generate the task (multi-digit products and sums; train/test prompt files),
#   2. warm-start a tiny model by SFT on traces that call `calc` some of the time and guess the rest,
#   3. `tcli loop` with --tools calc (sample with tool calls -> verify -> advantages -> train, eval),
#   4. `tcli eval --tools calc` of the warm start and of the final policy: greedy accuracy (95 % CI),
#      tool-call rate and tool-error rate before and after.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${VENV:-.venv}/bin/python
TCLI=${VENV:-.venv}/bin/tcli
OUT=runs/tools
RUN=$OUT/tempo
TOOLS=(--tools calc --tool-format tags --max-turns 2)
start=$(date +%s)
mkdir -p "$OUT"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"

echo "== 1/4 task -> $OUT/data" >&2
$PY -m examples.tools.make_data --out "$OUT/data" --n-train 2000 --n-test 200 --seed 0

if [ ! -f "$OUT/sft/tcli_state.json" ]; then
  echo "== 2/4 warm start (SFT on tool and guess traces) -> $OUT/sft" >&2
  $PY -m examples.tools.warmstart --out "$OUT/sft" --data "$OUT/data" --eval-n 0 --seed 0
fi

echo "== 3/4 tcli loop (TEMPO, --tools calc) -> $RUN" >&2
# --overwrite: a previous demo run there is replaced (only the files tcli wrote); a directory
# holding anything else is refused (exit 2), never deleted
$TCLI loop --config examples/tools/demo.toml --overwrite

echo "== 4/4 tcli eval --tools calc: warm start and final policy" >&2
final=$(ls -d "$RUN"/checkpoints/step_* | sort -t_ -k2 -n | tail -1)
for pair in "initial=$OUT/sft" "final=$final"; do
  name=${pair%%=*}
  $TCLI eval -m "${pair#*=}" -d "$OUT/data/test.jsonl" "${TOOLS[@]}" --task arith \
    -o "$OUT/eval-$name.jsonl" --summary "$OUT/eval-$name.summary.json" >/dev/null
done
echo
$PY -m examples.tools.report --run "$RUN" --eval "initial=$OUT/eval-initial.jsonl" \
  --eval "final=$OUT/eval-final.jsonl" --json "$OUT/figures.json"
echo "total wall time of make demo-tools' steps: $(( $(date +%s) - start ))s"
echo "rollouts: $RUN/rollouts/   try: $TCLI show-tree $RUN/rollouts/step_1.arrow"
