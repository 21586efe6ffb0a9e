#!/usr/bin/env bash
# The Unix-tool shape of tcli on a shipped rollout file (no model needed):
#   verify -> build-tree -> advantages, every intermediate file kept for inspection.
set -euo pipefail
cd "$(dirname "$0")/.."
TCLI="${TCLI:-${VENV:-.venv}/bin/tcli}"
out="${OUT:-runs/pipeline-demo}"
mkdir -p "$out"
in=examples/rollouts/gsm8k_example.jsonl

"$TCLI" verify "$in" --task gsm8k -o "$out/verified.jsonl"
"$TCLI" build-tree "$out/verified.jsonl" -o "$out/tree.arrow"            # Arrow works too
"$TCLI" advantages "$out/tree.arrow" --estimator grpo -o "$out/grpo.jsonl" --quiet
"$TCLI" advantages "$out/tree.arrow" --estimator tempo -o "$out/tempo.jsonl" --stats

echo
echo "Rewards per response (verify):"
"$TCLI" show-tree "$out/tree.arrow" --index 0 --bytes
echo
echo "Where TEMPO moves credit relative to GRPO (first group):"
"$(dirname "$TCLI")/python" - "$out/grpo.jsonl" "$out/tempo.jsonl" <<'PY'
import json, sys
g = [json.loads(l) for l in open(sys.argv[1])]
t = [json.loads(l) for l in open(sys.argv[2])]
for a, b in zip(g, t):
    if a["prompt_id"] != g[0]["prompt_id"]:
        break
    text = a["text"].replace("\n", " ")
    diffs = [i for i, (x, y) in enumerate(zip(a["advantages"], b["advantages"])) if abs(x - y) > 1e-9]
    print(f"sample {a['sample_id']} r={a['reward']:.0f} GRPO A={a['advantages'][0]:+.3f} "
          f"TEMPO differs at {len(diffs)} of {len(diffs and a['advantages'])} tokens: "
          + ", ".join(f"{text[i]!r}@{i}:{b['advantages'][i]:+.2f}" for i in diffs[:6]))
PY
echo
echo "Intermediate files in $out/:"
ls "$out"
