"""Where did the credit go? Reads the rollouts a comparison wrote (examples/compare.py) and measures,
per method, how its per-token advantages differ from GRPO's on the very same groups.

GRPO gives every token of a response the same advantage; a tree method moves credit between
tokens. If tree credit is to help, that movement must land on the tokens that decide the outcome
(on countdown: the first move, the first three tokens) and it must be large enough to matter. So,
over every (response, token) of every step (D = A_method - A_grpo, recomputed from the rollouts'
rewards with tcli's own GRPO):

- ``branch``: share of tokens at a branch point of the group's prefix tree (where TEMPO's
  correction can be non-zero);
- ``moved``: sum |D| / sum |A_grpo|, how much credit the method moves at all;
- ``D@branch`` / ``D@first3``: share of sum |D| on branch tokens / on the first three tokens;
- ``A@first3``: share of the method's own sum |A| on the first three tokens (GRPO: 3 / length);
- ``flipped``: share of tokens whose sign differs from GRPO's (both non-zero);
- ``split_at``: mean token index of a tree's first split (tree sampling), ``H@split`` vs ``H``:
  mean sampling entropy at split tokens vs at all tokens (``--record-entropy`` rollouts).

    python examples/credit.py runs/compare-countdown [--methods tempo,treerpo] [--every 5]
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import sys
from collections import defaultdict

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from tcli.algos.estimators import Group, compute_advantages  # noqa: E402
from tcli.config.stages import AdvantageOptions  # noqa: E402
from tcli.io import RecordReader  # noqa: E402

FIRST = 3  # "the first move": countdown's decision is its first three response tokens
SUMS = ("tokens", "branch", "grpo_abs", "d_abs", "d_branch", "d_first", "a_abs", "a_first",
        "both", "flipped", "splits", "split_at", "h_n", "h_sum", "hs_n", "hs_sum")


def group_sums(recs: list[dict], opt: AdvantageOptions) -> dict[str, float]:
    """The SUMS of one group: its stored advantages against GRPO's on the same rewards."""
    g = Group.from_records(recs)
    grpo = compute_advantages(g, "grpo", opt).per_token
    s = dict.fromkeys(SUMS, 0.0)
    for i, rec in enumerate(recs):
        a = np.asarray(rec.get("advantages", []), dtype=np.float64)
        if len(a) != len(grpo[i]):
            continue
        b, pos = g.tree.branch_of(i), np.arange(len(a))
        d, first = np.abs(a - grpo[i]), pos < FIRST
        both = (a != 0) & (grpo[i] != 0)
        s["tokens"] += len(a)
        s["branch"] += b.sum()
        s["grpo_abs"] += np.abs(grpo[i]).sum()
        s["d_abs"] += d.sum()
        s["d_branch"] += d[b].sum()
        s["d_first"] += d[first].sum()
        s["a_abs"] += np.abs(a).sum()
        s["a_first"] += np.abs(a[first]).sum()
        s["both"] += both.sum()
        s["flipped"] += (both & (np.sign(a) != np.sign(grpo[i]))).sum()
        _split_sums(rec, s)
    return s


def _split_sums(rec: dict, s: dict) -> None:
    """First split position and entropies at splits vs everywhere (tree / entropy rollouts)."""
    ends = [int(e) for e in rec.get("segment_ends") or [] if 0 < int(e) < len(rec["token_ids"])]
    if ends:
        s["splits"] += 1
        s["split_at"] += ends[0]
    h = rec.get("entropies")
    if h:
        h = np.asarray(h, dtype=np.float64)
        s["h_n"] += len(h)
        s["h_sum"] += h.sum()
        at = [e for e in ends if e < len(h)]
        s["hs_n"] += len(at)
        s["hs_sum"] += h[at].sum()


def run_sums(run_dir: str, every: int, opt: AdvantageOptions) -> dict[str, float]:
    """SUMS over the run's rollouts (every ``every``-th step)."""
    total = dict.fromkeys(SUMS, 0.0)
    files = sorted(glob.glob(os.path.join(run_dir, "rollouts", "step_*")),
                   key=lambda p: int(re.search(r"step_(\d+)", p).group(1)))
    for path in files[::every]:
        groups: dict[str, list[dict]] = defaultdict(list)
        for _, rec in RecordReader(path):
            groups[rec["prompt_id"]].append(rec)
        for recs in groups.values():
            for k, v in group_sums(recs, opt).items():
                total[k] += float(v)
    return total


def ratios(s: dict[str, float]) -> dict[str, float | None]:
    """The reported shares (None where the denominator is empty)."""
    def r(a: str, b: str):
        return s[a] / s[b] if s[b] else None
    return {"branch": r("branch", "tokens"), "moved": r("d_abs", "grpo_abs"),
            "D@branch": r("d_branch", "d_abs"), "D@first3": r("d_first", "d_abs"),
            "A@first3": r("a_first", "a_abs"), "flipped": r("flipped", "both"),
            "split_at": r("split_at", "splits"), "H@split": r("hs_sum", "hs_n"),
            "H": r("h_sum", "h_n")}


def method_runs(out: str, methods: list[str] | None) -> dict[str, list[str]]:
    """{method: [run dirs]} from a comparison directory's ``<method>-s<seed>`` runs."""
    found: dict[str, list[str]] = defaultdict(list)
    for d in sorted(glob.glob(os.path.join(out, "*-s[0-9]*"))):
        m = re.fullmatch(r"(.+)-s(\d+)", os.path.basename(d))
        if m and os.path.isdir(d) and (methods is None or m.group(1) in methods):
            found[m.group(1)].append(d)
    return dict(found)


def table(rows: dict[str, dict]) -> str:
    cols = ("branch", "moved", "D@branch", "D@first3", "A@first3", "flipped", "split_at",
            "H@split", "H")
    out = ["| method | runs | " + " | ".join(cols) + " |", "|---" * (len(cols) + 2) + "|"]
    for m, row in rows.items():
        cells = ["—" if row[c] is None else f"{row[c]:.3f}" for c in cols]
        out.append(f"| {m} | {row['runs']} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", help="A comparison directory (examples/compare.py --out).")
    ap.add_argument("--methods", help="Comma-separated methods (default: every one found).")
    ap.add_argument("--every", type=int, default=1, help="Read every k-th step's rollouts.")
    a = ap.parse_args(argv)
    runs = method_runs(a.out, a.methods.split(",") if a.methods else None)
    if not runs or a.every < 1:
        ap.error(f"no <method>-s<seed> runs in {a.out}" if not runs else "--every must be >= 1")
    opt, rows = AdvantageOptions(), {}
    for method, dirs in runs.items():
        total = dict.fromkeys(SUMS, 0.0)
        for d in dirs:
            for k, v in run_sums(d, a.every, opt).items():
                total[k] += v
        rows[method] = {"runs": len(dirs), **ratios(total)}
    print(table(rows))
    with open(os.path.join(a.out, "credit.json"), "w") as f:
        json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
