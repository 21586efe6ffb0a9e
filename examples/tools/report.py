"""The tools demo's before/after table: greedy accuracy with its 95 % CI, tool-call rate and
tool-error rate of the warm start and of the RL policy, from ``tcli eval --tools`` records
(each holds ``reward`` and the ``turns`` of its tool calls), and the loop's own eval curve.

    python -m examples.tools.report --run runs/tools/tempo \\
        --eval initial=runs/tools/eval-initial.jsonl --eval final=runs/tools/eval-final.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import sys

if __package__ in (None, ""):  # run as a script: make `examples.tools` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def tool_figures(records: list[dict]) -> dict:
    """Accuracy (mean reward > 0.5 over prompts, with the bootstrap CI tcli eval reports),
    tool-call rate (responses with at least one call), tool-error rate (calls with ``error``
    set), and the accuracy of responses with and without a call."""
    from tcli.stages.evaluate import summarise
    from tcli.verifiers.weighted import first_reward

    out = summarise(records)
    turns = [r.get("turns") or [] for r in records]
    calls = [t for ts in turns for t in ts]
    hits = [first_reward(r) > 0.5 for r in records]
    with_call = [h for h, ts in zip(hits, turns) if ts]
    without = [h for h, ts in zip(hits, turns) if not ts]
    out.update(tool_call_rate=len(with_call) / max(len(records), 1),
               tool_error_rate=sum(t.get("error") is not None for t in calls) / max(len(calls), 1),
               calls=len(calls),
               acc_with_call=sum(with_call) / len(with_call) if with_call else None,
               acc_without_call=sum(without) / len(without) if without else None)
    return out


def read_jsonl(path: str) -> list[dict]:
    with open(path, "rb") as f:
        return [json.loads(line) for line in f if line.strip()]


def _pct(x) -> str:
    return "   -" if x is None else f"{100 * x:5.1f}"


def table(rows: dict[str, dict]) -> str:
    lines = [f"{'':10}{'accuracy':>9}{'95% CI':>16}{'calls %':>9}{'errors %':>10}"
             f"{'acc|call':>10}{'acc|none':>10}"]
    for name, m in rows.items():
        lo, hi = m["accuracy_ci95"]
        lines.append(f"{name:10}{m['accuracy']:>9.3f}{f'[{lo:.3f}, {hi:.3f}]':>16}"
                     f"{_pct(m['tool_call_rate']):>9}{_pct(m['tool_error_rate']):>10}"
                     f"{_pct(m['acc_with_call']):>10}{_pct(m['acc_without_call']):>10}")
    return "\n".join(lines)


def run_summary(metrics: list[dict]) -> str:
    """The loop's greedy eval curve and its sampled tool use (``tool_calls_mean``: calls per
    response at temperature 1; ``tool_error_share``: failed calls) at the first and last step."""
    evs = [m for m in metrics if m["kind"] == "eval"]
    steps = [m for m in metrics if m["kind"] != "eval" and "tool_calls_mean" in m]
    lines = ["loop eval (greedy, with the tool): " + ", ".join(
        f"step {m['step']} {m['accuracy']:.3f}" for m in evs)]
    if len(evs) > 1:
        lines.append(f"gain: {100 * (evs[-1]['accuracy'] - evs[0]['accuracy']):+.1f} points on "
                     f"{evs[-1]['prompts']} held-out prompts; loop wall time "
                     f"{evs[-1]['wall_time']:.0f}s")
    if steps:
        lines.append("sampled (temperature 1): tool calls per response " + " -> ".join(
            f"{m['tool_calls_mean']:.2f} (step {m['step']})" for m in (steps[0], steps[-1]))
            + ", failed calls " + " -> ".join(
            f"{100 * m['tool_error_share']:.1f} %" for m in (steps[0], steps[-1])))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", help="The loop's run directory (its eval curve is printed too).")
    ap.add_argument("--eval", action="append", default=[], metavar="NAME=RECORDS",
                    help="tcli eval --tools records to summarise (repeatable).")
    ap.add_argument("--json", help="Also write the figures here as JSON.")
    a = ap.parse_args(argv)
    rows = {}
    for item in a.eval:
        name, sep, path = item.partition("=")
        if not sep:
            ap.error(f"--eval wants NAME=RECORDS, got {item!r}")
        rows[name] = tool_figures(read_jsonl(path))
    if a.run:
        print(run_summary(read_jsonl(os.path.join(a.run, "metrics.jsonl"))))
    if rows:
        print(table(rows))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
