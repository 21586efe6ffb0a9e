"""Compare advantage estimators on the arith task: same warm start, same seeds, same budget.

A thin wrapper of the generic paired harness ``examples/compare.py`` (methods, paired bootstrap
CIs against GRPO at equal tokens and equal wall time, branch-token share, compare.md/.json/.png,
finished runs reused), kept for its command line:

    python examples/arith/compare.py --out runs/compare --estimators grpo,tempo,treerpo,ppo --seeds 0,1,2
"""

from __future__ import annotations

import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from examples import compare  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=os.path.join(ROOT, "examples/arith/demo.toml"))
    ap.add_argument("--out", default="runs/compare")
    ap.add_argument("--estimators", default="grpo,tempo,treerpo,ppo",
                    help=f"Methods of examples/compare.py: {', '.join(compare.METHODS)}.")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--token-budget", type=int, default=250_000, help="sampled tokens per run")
    ap.add_argument("--eval-every", type=int, default=10)
    ap.add_argument("--model", default=None)
    a, rest = ap.parse_known_args(argv)  # anything else (--set ...) goes to the harness as is
    args = ["--config", a.config, "--out", a.out, "--methods", a.estimators, "--seeds", a.seeds,
            "--token-budget", str(a.token_budget), "--eval-every", str(a.eval_every), *rest]
    return compare.main(args + (["--model", a.model] if a.model else []))


if __name__ == "__main__":
    sys.exit(main())
