"""Write examples/rollouts/gsm8k_example.jsonl: hand-written responses to three real GSM8K test
prompts (the shipped benchmark ``gsm8k``), tokenised as UTF-8 bytes so the demo needs no model.

The responses of one prompt share prefixes and diverge at the step that decides the answer, which is
exactly where P2T/TEMPO put their credit. Run from the repository root:
    python examples/rollouts/make_example.py [--data gsm8k]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from tcli.io import resolve_data  # noqa: E402  (run from a checkout, installed or not)

RESPONSES = {
    "gsm8k-test-0000": [
        "She has 16 - 3 - 4 = 9 eggs left. She makes 9 * 2 = $18.\nThe answer is 18.",
        "She has 16 - 3 - 4 = 9 eggs left. She makes 9 * 2 = $18 per day.\n#### 18",
        "She has 16 - 3 = 13 eggs left. She makes 13 * 2 = $26.\nThe answer is 26.",
        "She has 16 - 3 - 4 = 9 eggs left. She makes 9 * 3 = $27.\nThe answer is 27.",
    ],
    "gsm8k-test-0001": [
        "White fiber is 2 / 2 = 1 bolt. Total 2 + 1 = 3 bolts.\nThe answer is \\boxed{3}.",
        "White fiber is 2 / 2 = 1 bolt. Total 2 + 1 = 3 bolts.\nThe answer is 3.",
        "White fiber is 2 * 2 = 4 bolts. Total 2 + 4 = 6 bolts.\nThe answer is 6.",
        "White fiber is 2 / 2 = 1 bolt. Total 2 + 1 = 3 bolts.\nThe answer is 3.",
    ],
    "gsm8k-test-0002": [
        "Cost 80,000 + 50,000 = $130,000. Value 80,000 * 2.5 = $200,000. Profit $70,000.\n#### 70,000",
        "Cost 80,000 + 50,000 = $130,000. Value 80,000 * 1.5 = $120,000. Loss.\n#### -10000",
        "Cost 80,000 + 50,000 = $130,000. Value 130,000 * 2.5 = $325,000. Profit $195,000.\n#### 195000",
        "Cost 80,000 + 50,000 = $130,000. Value 80,000 * 2.5 = $200,000. Profit is $70000.",
    ],
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="gsm8k", help="GSM8K test prompts: a file or a shipped "
                    "benchmark name")
    ap.add_argument("-o", "--output", default="examples/rollouts/gsm8k_example.jsonl")
    args = ap.parse_args()
    prompts = {}
    with open(resolve_data(args.data), encoding="utf-8") as f:
        for line in f:
            rec = json.loads(line)
            if rec["id"] in RESPONSES:
                prompts[rec["id"]] = rec
    with open(args.output, "w", encoding="utf-8") as out:
        for pid, texts in RESPONSES.items():
            p = prompts[pid]
            for i, text in enumerate(texts):
                rec = {
                    "schema": "tcli.rollout/1", "prompt_id": pid, "prompt": p["prompt"],
                    "answer": p["answer"], "meta": p["meta"], "sample_id": i,
                    "prompt_token_ids": list(p["prompt"].encode()),
                    "token_ids": list(text.encode()), "text": text, "logprobs": [0.0] * len(text.encode()),
                    "node_path": [], "segment_ends": [], "finish_reason": "stop",
                    "policy_version": 0, "model": "hand-written (UTF-8 bytes as tokens)",
                }
                out.write(json.dumps(rec, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
