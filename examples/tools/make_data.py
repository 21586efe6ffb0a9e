"""Write the tools task's prompt files: ``train.jsonl`` and ``test.jsonl`` (id, prompt, answer,
meta), multi-digit products and sums that the ``calc`` tool solves.

    python -m examples.tools.make_data --out runs/tools/data --n-train 2000 --n-test 200 --seed 0
"""

from __future__ import annotations

import argparse
import os
import sys

if __package__ in (None, ""):  # run as a script: make `examples.tools` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from examples.tools.task import make_prompts  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    from tcli.io import RecordWriter

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="Directory for train.jsonl and test.jsonl.")
    ap.add_argument("--n-train", type=int, default=2000, help="Train prompts (default 2000).")
    ap.add_argument("--n-test", type=int, default=200, help="Test prompts (default 200).")
    ap.add_argument("--seed", type=int, default=0, help="Random seed (same seed = same files).")
    ap.add_argument("--quiet", "-q", action="store_true", help="No summary on stderr.")
    a = ap.parse_args(argv)
    if a.n_train < 0 or a.n_test < 0:
        ap.error("--n-train and --n-test must be >= 0")
    os.makedirs(a.out, exist_ok=True)
    for split, n in (("train", a.n_train), ("test", a.n_test)):
        with RecordWriter(os.path.join(a.out, f"{split}.jsonl"), "jsonl") as w:
            w.write_all(make_prompts(n, a.seed, split))
    if not a.quiet:
        print(f"make_data: {a.n_train} train + {a.n_test} test prompts in {a.out}", file=sys.stderr)
    print(os.path.abspath(a.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
