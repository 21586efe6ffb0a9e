"""Arithmetic questions for a real instruction-tuned model: "What is 44 + 39?" / "What is 71 - 26?".

A mix of 1- and 2-digit operands, addition and subtraction (results never negative), written as
``train.jsonl`` / ``dev.jsonl`` / ``test.jsonl`` prompt records ``{"id", "prompt", "answer",
"meta"}``; the answer is a plain integer. Deterministic from ``--seed``.

Splits are disjoint by construction, as in ``examples/arith/task.py``: a stable hash of the
expression's text ("44 + 39"), not any seed, puts it in ``test`` (1 in 5), ``dev`` (1 in 5) or
``train``, so no held-out question is ever trained on. ``dev`` is for choosing settings; ``test``
is only for the reported numbers. Records take turns over the six kinds
(1+1, 2+1, 2+2 digits x add/sub) so that a prefix of a file (``eval.limit``) holds a mix.

    python examples/real/make_data.py --out runs/demo-real/data --seed 0
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import sys

SOURCE = "tcli-real-arith"
SHARE = 5               # 1 expression in 5 belongs to test, 1 in 5 to dev, the rest to train
SPLITS = ("train", "dev", "test")
# (digits of the larger operand, digits of the smaller, operator): the six kinds, cycled evenly
KINDS = [(1, 1, "+"), (1, 1, "-"), (2, 1, "+"), (2, 1, "-"), (2, 2, "+"), (2, 2, "-")]


def split_of(expr: str) -> str:
    """'test', 'dev' or 'train' from a stable hash of the expression text (not of any seed)."""
    h = int.from_bytes(hashlib.blake2b(f"{SOURCE}:{expr}".encode(), digest_size=8).digest(),
                       "little") % SHARE
    return "test" if h == 0 else "dev" if h == 1 else "train"


def expressions(kind: tuple[int, int, str]) -> list[tuple[str, int]]:
    """Every expression of one kind, in a fixed order: ``[("44 + 39", 83), ...]``. Addition in
    either order ("7 + 52" and "52 + 7"); subtraction larger minus smaller (never negative)."""
    lo = {1: 1, 2: 10}
    da, db, op = kind
    out = []
    for a in range(lo[da], 10 ** da):
        for b in range(lo[db], min(a, 10 ** db - 1) + 1 if op == "-" else 10 ** db):
            if op == "+":
                out.append((f"{a} + {b}", a + b))
                if da != db:
                    out.append((f"{b} + {a}", a + b))
            else:
                out.append((f"{a} - {b}", a - b))
    return out


def make_prompts(n: int, seed: int, split: str) -> list[dict]:
    """``n`` distinct prompt records of ``split`` (train|dev|test), deterministic for ``seed``: the
    kinds take turns (a kind whose expressions of the split are all used drops out, so the small
    1-digit kinds end early and the 2-digit ones fill the rest)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, not {split!r}")
    rng = random.Random(f"{SOURCE}:{split}:{seed}")
    pools = []
    for kind in KINDS:
        pool = [e for e in expressions(kind) if split_of(e[0]) == split]
        rng.shuffle(pool)
        pools.append((kind, pool))
    total = sum(len(p) for _, p in pools)
    if n > total:
        raise ValueError(f"cannot draw {n} distinct {split} prompts (the split holds {total})")
    out: list[dict] = []
    turn = 0
    while len(out) < n:
        kind, pool = pools[turn % len(pools)]
        turn += 1
        if not pool:
            continue
        expr, value = pool.pop()
        out.append({"id": f"real-arith-{split}-{len(out):06d}", "prompt": f"What is {expr}?",
                    "answer": str(value),
                    "meta": {"source": SOURCE, "split": split,
                             "kind": f"{kind[0]}d {kind[2]} {kind[1]}d", "seed": seed}})
    return out


def write_jsonl(path: str, records: list[dict]) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="Directory for train.jsonl and test.jsonl.")
    ap.add_argument("--n-train", type=int, default=2000, help="Train prompts (default 2000).")
    ap.add_argument("--n-dev", type=int, default=200, help="Dev prompts (default 200).")
    ap.add_argument("--n-test", type=int, default=200, help="Test prompts (default 200).")
    ap.add_argument("--seed", type=int, default=0, help="Random seed (same seed = same files).")
    ap.add_argument("--quiet", "-q", action="store_true", help="No summary on stderr.")
    a = ap.parse_args(argv)
    sizes = {"train": a.n_train, "dev": a.n_dev, "test": a.n_test}
    if min(sizes.values()) < 0:
        ap.error("--n-train, --n-dev and --n-test must be >= 0")
    try:
        splits = {split: make_prompts(n, a.seed, split) for split, n in sizes.items()}
    except ValueError as e:
        ap.error(str(e))
    seen: set[str] = set()
    for records in splits.values():
        prompts = {r["prompt"] for r in records}
        assert not prompts & seen, "splits overlap"
        seen |= prompts
    os.makedirs(a.out, exist_ok=True)
    for split, records in splits.items():
        write_jsonl(os.path.join(a.out, f"{split}.jsonl"), records)
    if not a.quiet:
        print(f"make_data: {a.n_train} train + {a.n_dev} dev + {a.n_test} test prompts in "
              f"{a.out} (disjoint by expression)", file=sys.stderr)
    print(os.path.abspath(a.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
