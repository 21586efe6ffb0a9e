"""Write the countdown task's prompt files: ``train.jsonl``, ``val.jsonl`` (train split, disjoint
from train.jsonl: for choosing warm-start settings without looking at test) and ``test.jsonl``.

    python -m examples.countdown.make_data --out runs/countdown/data --seed 0
"""

from __future__ import annotations

import argparse
import os
import sys

if __package__ in (None, ""):  # run as a script: make `examples.countdown` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from examples.arith.make_data import write_split  # noqa: E402
from examples.countdown.task import make_prompts  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="Directory for train/val/test.jsonl.")
    ap.add_argument("--n-train", type=int, default=1500, help="Train prompts (default 1500; "
                    "about 1,000 three-number train instances exist, half the prompts use them).")
    ap.add_argument("--n-val", type=int, default=200, help="Validation prompts (default 200).")
    ap.add_argument("--n-test", type=int, default=200, help="Test prompts (default 200).")
    ap.add_argument("--seed", type=int, default=0, help="Random seed (same seed = same files).")
    ap.add_argument("--quiet", "-q", action="store_true", help="No summary on stderr.")
    a = ap.parse_args(argv)
    if min(a.n_train, a.n_val, a.n_test) < 0:
        ap.error("--n-train, --n-val and --n-test must be >= 0")
    os.makedirs(a.out, exist_ok=True)
    train_val = make_prompts(a.n_train + a.n_val, a.seed, "train")
    for name, recs in (("train", train_val[:a.n_train]), ("val", train_val[a.n_train:]),
                       ("test", make_prompts(a.n_test, a.seed, "test"))):
        write_split(os.path.join(a.out, f"{name}.jsonl"), recs)
    if not a.quiet:
        print(f"make_data: {a.n_train} train + {a.n_val} val + {a.n_test} test prompts in {a.out}",
              file=sys.stderr)
    print(os.path.abspath(a.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
