"""Write the arith task's prompt files: ``train.jsonl`` and ``test.jsonl`` in the prompt-record
format of the shipped benchmarks in ``tcli/benchmarks`` (id, prompt, answer, meta).

    python -m examples.arith.make_data --out runs/arith/data --n-train 2000 --n-test 200 --seed 0
"""

from __future__ import annotations

import argparse
import os
import sys

if __package__ in (None, ""):  # run as a script: make `examples.arith` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from examples.arith.task import make_prompts  # noqa: E402


def write_split(path: str, records: list[dict]) -> None:
    from tcli.io import RecordWriter

    with RecordWriter(path, "jsonl") as w:
        w.write_all(records)


def main(argv: list[str] | None = None, make=make_prompts, doc: str = __doc__) -> int:
    """The command line of a task's data script; ``make(n, seed, split)`` makes its prompts
    (other tasks' scripts pass their own generator and docstring)."""
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0],
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
        write_split(os.path.join(a.out, f"{split}.jsonl"), make(n, a.seed, split))
    if not a.quiet:
        print(f"make_data: {a.n_train} train + {a.n_test} test prompts in {a.out}", file=sys.stderr)
    print(os.path.abspath(a.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
