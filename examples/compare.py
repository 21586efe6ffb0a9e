"""Paired comparison of RL methods on any task config: same warm start, same seeds, same budget.

Every (method, seed) run is ``tcli loop`` on ``--config`` with the method's overrides (the
METHODS table: adding a method is one line) and the same sampled-token budget. Seeds are paired:
seed s of every method starts from the same checkpoint, draws the same prompts per step and is
compared with seed s of the baseline (GRPO). Reported per method: greedy eval accuracy at equal
sampled tokens (the smallest final count over all runs) and at equal wall time (the shortest run
of each seed: a seed's methods run back to back under about the same load), linear between
evaluations; the mean paired difference to the baseline with a paired bootstrap 95 % CI over
seeds, and the branch-token share (tcli's ``branch_token_share``: response tokens at branch
points of each group's prefix tree, where TEMPO's correction can be non-zero). Writes ``compare.md``, ``compare.json`` and ``compare.png`` in ``--out``.

A finished run (``<method>-s<seed>.done`` beside its run directory) is never rerun; an
interrupted one resumes from its last checkpoint. A method whose settings do not fit the task's
config (a -tool method named for a task without tools) is skipped with a note. ``--set KEY=VALUE``
sets a loop setting for every method, ``--set METHOD.KEY=VALUE`` for one; a setting of one
sampling mode set for every method reaches the methods of that mode only (the loop refuses it in
the other): a tree's shape (``width``, ``depth``, ``segment_tokens``, ...) the methods that sample
trees, ``n`` the others.

    python examples/compare.py --config examples/countdown/countdown.toml --out runs/compare-cd \\
        --methods grpo,tempo,treerpo --seeds 0,1,2,3,4 --token-budget 150000
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from tcli.algos.gradient_error import MIN_MARKED, excludes_zero  # noqa: E402
from tcli.config.loop import load_config, read_toml  # noqa: E402
from tcli.config.stages import SampleOptions  # noqa: E402
from tcli.errors import UsageError  # noqa: E402
from tcli.plot import read_metrics  # noqa: E402

TREE = {"mode": "tree", "width": 2, "depth": 3, "segment_tokens": 8}   # 8 leaves per prompt
# entropy branching: split where the policy hesitates, same leaf budget; its
# threshold and minimum segment are tcli's defaults (--set tempo-entropy.branch_entropy=0.8 ...)
ENTROPY_TREE = {"mode": "tree", "width": 2, "depth": 3, "branch": "entropy"}
METHODS: dict[str, dict] = {
    "grpo": {"estimator": "grpo"},
    "tempo": {"estimator": "tempo"},                  # the config's sampling (prefix tree built)
    "treerpo": {"estimator": "treerpo", **TREE},
    # PPO as usually run: GAE over a critic made from the warm start, whitened advantages, the
    # critic's lr 5x the policy's default (its value head starts at zero)
    "ppo": {"estimator": "ppo", "whiten": True, "critic_lr": 1e-3},
    "tempo-entropy": {"estimator": "tempo", **ENTROPY_TREE},
    "treerpo-entropy": {"estimator": "treerpo", **ENTROPY_TREE},
    # an entropy tree of 4 leaves + 120 tokens per prompt for expand-tree's children (§4.17)
    "tempo-entropy-expand": {"estimator": "tempo", **ENTROPY_TREE, "depth": 2,
                             "expand_tokens": 120},
    # tool-aware trees (tools in the config): 2 children at the root and after each tool result
    "tempo-tool": {"estimator": "tempo", "mode": "tree", "width": 2, "depth": 3, "branch": "tool"},
    "treerpo-tool": {"estimator": "treerpo", "mode": "tree", "width": 2, "depth": 3,
                     "branch": "tool"},
}
BASELINE = "grpo"


# ----------------------------------------------------------------------------- statistics

def paired_bootstrap(a, b, level: float = 0.95, n_boot: int = 20000, seed: int = 0
                     ) -> tuple[float, float, float]:
    """(mean of a - b, lo, hi): percentile CI of the mean paired difference, resampling pairs.

    Up to 8 pairs the bootstrap distribution is enumerated exactly (every multiset of pair
    indices with its multinomial weight); beyond, ``n_boot`` resamples. The bounds are values the
    distribution takes (inverted CDF), so tiny samples give honest, coarse intervals."""
    d = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    n = len(d)
    if n == 0:
        return math.nan, math.nan, math.nan
    if n <= 8:
        means, weights = [], []
        for combo in itertools.combinations_with_replacement(range(n), n):
            counts = np.bincount(combo, minlength=n)
            weights.append(math.factorial(n) / np.prod([math.factorial(c) for c in counts]))
            means.append(float(d[list(combo)].mean()))
        means, weights = np.asarray(means), np.asarray(weights) / n ** n
    else:
        rng = np.random.default_rng(seed)
        means = d[rng.integers(0, n, size=(n_boot, n))].mean(axis=1)
        weights = np.full(n_boot, 1.0 / n_boot)
    order = np.argsort(means, kind="stable")
    means, cdf = means[order], np.cumsum(weights[order])
    alpha = (1.0 - level) / 2

    def quantile(q: float) -> float:  # smallest value whose CDF reaches q (float slack 1e-12)
        return float(means[min(np.searchsorted(cdf, q - 1e-12), len(means) - 1)])

    return float(d.mean()), quantile(alpha), quantile(1.0 - alpha)


def at(xs, ys, x: float) -> float:
    """y at ``x``, linear between points (the last value past the end)."""
    return float(np.interp(x, xs, ys))


# ----------------------------------------------------------------------------- runs

def overrides(method: str | None, seed: int, a: argparse.Namespace) -> dict:
    """The loop settings of one run: budget and bookkeeping, the method's row, then --set
    (``method`` None: without the method's row and method-scoped --set)."""
    over = {"seed": seed, "run_dir": os.path.join(a.out, f"{method}-s{seed}"), "steps": 100_000,
            "max_wall_seconds": 0.0, "max_sampled_tokens": a.token_budget,
            "eval_every": a.eval_every, **METHODS.get(method, {})}
    if a.model:
        over["model"] = a.model
    sets = []
    for item in a.set:
        key, value = item.split("=", 1)
        scope, _, name = key.rpartition(".")
        sets.append((scope, name, _value(value)))
    mode = _mode({**over, **{n: v for s, n, v in sets if s in ("", method)}}, a.config)
    other = {k for m, keys in SampleOptions.MODE_ONLY.items() if m != mode for k in keys}
    for scope, name, value in sets:  # a setting of one mode set for all: the methods of that mode
        if scope == method or (scope == "" and name not in other):
            over[name] = value
    _reset_other_mode(over, a.config, other)
    return over


def _reset_other_mode(over: dict, config: str, other: set[str]) -> None:
    """The task config's settings of the other sampling mode back at their defaults for this run
    (a tree method on a task of n independent responses: that n is not the tree's), which the
    loop would otherwise refuse as ignored."""
    sample = read_toml(config).get("sample", {})
    default = SampleOptions()
    for k in sorted(other):
        if isinstance(sample, dict) and k in sample and k not in over:
            over[k] = getattr(default, k)


def _mode(over: dict, config: str) -> str:
    """The sampling mode of a run with these overrides: theirs, else the task config's."""
    if "mode" in over:
        return over["mode"]
    sample = read_toml(config).get("sample", {})
    return sample.get("mode", SampleOptions().mode) if isinstance(sample, dict) else ""


def _value(s: str):
    """A --set value as TOML would read it (number, bool or string)."""
    import tomllib

    try:
        return tomllib.loads(f"v = {s}")["v"]
    except tomllib.TOMLDecodeError:
        return s


def run_one(method: str, seed: int, a: argparse.Namespace, log) -> tuple[str | None, str]:
    """Run (or resume, or skip when done) one (method, seed): (its run directory, "") or
    (None, why) when the method's settings do not fit the task's config."""
    from tcli.loop.loop import run_loop
    from tcli.loop.rundir import RunDir

    over = overrides(method, seed, a)
    run_dir, done = over["run_dir"], over["run_dir"] + ".done"
    if os.path.exists(done):
        with open(done) as f:
            if json.load(f) != over:
                raise UsageError(f"{done}: finished with other settings; delete it and "
                                 f"{run_dir} to rerun")
        return run_dir, ""
    try:
        cfg = load_config(a.config, over)
    except UsageError as e:
        log(f"skipping {method}: its settings do not fit this task ({e})")
        return None, str(e)
    resume = os.path.isdir(run_dir) and bool(RunDir(run_dir).complete_steps())
    # started, nothing complete: the loop's --overwrite removes what that run wrote (and refuses,
    # exit 2, a directory holding anything else, or one a live loop holds)
    overwrite = os.path.isdir(run_dir) and not resume
    log(f"== {method} seed {seed} -> {run_dir}" + (" (resuming)" if resume else ""))
    run_loop(cfg, resume=resume, log=lambda s: None, overwrite=overwrite)
    with open(done + ".tmp", "w") as f:
        json.dump(over, f)
    os.replace(done + ".tmp", done)
    return run_dir, ""


# ----------------------------------------------------------------------------- summary

def curves(run_dir: str) -> dict:
    """A run's eval curve (tokens, wall time, accuracy) and its mean branch-token share."""
    ms = read_metrics(run_dir)
    ev = [m for m in ms if m.get("kind") == "eval"]
    if not ev:
        raise UsageError(f"{run_dir}: no eval records (the config needs eval_data and "
                         "[eval] every > 0)")
    shares = [m["branch_token_share"] for m in ms
              if m.get("kind") == "train" and "branch_token_share" in m]
    return {"tokens": np.array([m["sampled_tokens_total"] for m in ev], dtype=float),
            "wall": np.array([m["wall_time"] for m in ev], dtype=float),
            "acc": np.array([m["accuracy"] for m in ev], dtype=float),
            "steps": max(m.get("step", 0) for m in ms),
            "branch_share": float(np.mean(shares)) if shares else math.nan}


def summarise(runs: dict[str, dict[int, str]], baseline: str = BASELINE) -> dict:
    """Per method: accuracies at the common token count and at each seed's common wall time,
    paired differences to the baseline over the seeds both have, branch share, steps.

    Equal wall time is per seed (the shortest run of that seed): a seed's methods run one after
    the other under about the same machine load, different seeds may not."""
    cs = {m: {s: curves(d) for s, d in by_seed.items()} for m, by_seed in runs.items()}
    tok = min(c["tokens"][-1] for by_seed in cs.values() for c in by_seed.values())
    wall: dict[int, float] = {}
    for by_seed in cs.values():
        for s, c in by_seed.items():
            wall[s] = min(wall.get(s, math.inf), float(c["wall"][-1]))
    out = {"equal_tokens": tok, "equal_wall_s": wall, "baseline": baseline, "methods": {}}
    base = cs.get(baseline, {})
    for m, by_seed in cs.items():
        row = {"seeds": sorted(by_seed)}
        for key, x in (("tokens", lambda s: tok), ("wall", lambda s: wall[s])):
            acc = {s: at(c[key], c["acc"], x(s)) for s, c in by_seed.items()}
            row[f"acc_{key}"] = acc
            paired = sorted(set(acc) & set(base))
            if m != baseline and paired:
                row["paired"] = len(paired)
                ref = [at(base[s][key], base[s]["acc"], x(s)) for s in paired]
                row[f"diff_{key}"] = paired_bootstrap([acc[s] for s in paired], ref)
        for k, f in (("initial", lambda c: c["acc"][0]), ("branch_share", lambda c: c["branch_share"]),
                     ("steps", lambda c: c["steps"]), ("wall_s", lambda c: c["wall"][-1])):
            row[k] = float(np.mean([f(c) for c in by_seed.values()]))
        out["methods"][m] = row
    return out


def _ms(v: dict) -> str:
    x = list(v.values())
    return f"{np.mean(x):.3f} ± {np.std(x):.3f}" if len(x) > 1 else f"{x[0]:.3f}"


def _ci(d, n: int) -> str:
    if d is None:
        return "—"
    mean, lo, hi = d
    mark = " *" if excludes_zero(lo, hi, n) else ""
    return f"{mean:+.3f} [{lo:+.3f}, {hi:+.3f}]{mark}"


def _span(by_seed: dict) -> str:
    lo, hi = min(by_seed.values()), max(by_seed.values())
    return f"{lo:.0f}" if round(lo) == round(hi) else f"{lo:.0f}–{hi:.0f}"


def table(s: dict) -> str:
    """The markdown table of :func:`summarise`."""
    head = (f"| method | seeds | initial | acc @ {s['equal_tokens']:.0f} tokens | Δ vs "
            f"{s['baseline']} (95 % CI) | acc @ equal wall time ({_span(s['equal_wall_s'])} s) "
            f"| Δ vs "
            f"{s['baseline']} (95 % CI) | branch-token share | steps | wall s |")
    rows = [head, "|---|---|---|---|---|---|---|---|---|---|"]
    for m, r in s["methods"].items():
        share = "—" if math.isnan(r["branch_share"]) else f"{r['branch_share']:.3f}"
        rows.append(f"| {m} | {len(r['seeds'])} | {r['initial']:.3f} | {_ms(r['acc_tokens'])} "
                    f"| {_ci(r.get('diff_tokens'), r.get('paired', 0))} | {_ms(r['acc_wall'])} "
                    f"| {_ci(r.get('diff_wall'), r.get('paired', 0))} | {share} | {r['steps']:.0f} "
                    f"| {r['wall_s']:.0f} |")
    return "\n".join(rows)


def plot(runs: dict[str, dict[int, str]], s: dict, out_png: str) -> str:
    """Accuracy vs sampled tokens and vs wall time (mean over seeds, min-max band), and the
    paired differences to the baseline with their CIs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for m, by_seed in runs.items():
        cs = [curves(d) for d in by_seed.values()]
        for ax, axis in zip(axes, ("tokens", "wall")):
            hi = min(c[axis][-1] for c in cs)
            grid = np.linspace(0.0, hi, 60)
            ys = np.array([np.interp(grid, c[axis], c["acc"]) for c in cs])
            line, = ax.plot(grid, ys.mean(0), label=f"{m} (n={len(cs)})")
            ax.fill_between(grid, ys.min(0), ys.max(0), alpha=0.15, color=line.get_color())
    for ax, xl in zip(axes, ("sampled tokens", "wall time (s)")):
        ax.set_xlabel(xl)
        ax.set_ylabel("greedy eval accuracy")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    others = [m for m in s["methods"] if "diff_tokens" in s["methods"][m]]
    for k, (key, off) in enumerate((("diff_tokens", -0.12), ("diff_wall", 0.12))):
        d = [s["methods"][m].get(key) for m in others]
        ys = [i + off for i in range(len(others))]
        axes[2].errorbar([x[0] for x in d], ys, fmt="o",
                         xerr=[[x[0] - x[1] for x in d], [x[2] - x[0] for x in d]],
                         label="equal tokens" if k == 0 else "equal wall time")
    axes[2].axvline(0.0, color="grey", lw=1)
    axes[2].set_yticks(range(len(others)), others)
    axes[2].set_xlabel(f"accuracy − {s['baseline']} (paired, 95 % CI)")
    if others:
        axes[2].legend(fontsize=8)
    fig.tight_layout()
    tmp = out_png + ".tmp.png"
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    os.replace(tmp, out_png)
    return out_png


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="The task's loop config (TOML).")
    ap.add_argument("--out", default="runs/compare", help="Directory for runs and reports.")
    ap.add_argument("--methods", default=None,
                    help=f"Comma-separated, from: {', '.join(METHODS)} (default: all that fit "
                    "the task; the -tool methods need tools in the config).")
    ap.add_argument("--seeds", default="0,1,2,3,4", help="Comma-separated seeds (default 0,1,2,3,4).")
    ap.add_argument("--token-budget", type=int, default=150_000, help="Sampled tokens per run (default 150000).")
    ap.add_argument("--eval-every", type=int, default=10, help="Steps between evaluations (default 10).")
    ap.add_argument("--model", default=None, help="Warm start (default: the config's model).")
    ap.add_argument("--set", action="append", default=[], metavar="[METHOD.]KEY=VALUE",
                    help="Loop setting for every method (or one), e.g. eval_limit=100, "
                    "treerpo.segment_tokens=16; repeatable. A tree's shape (width, depth, "
                    "segment_tokens, branch, branch_entropy, min_segment_tokens) without METHOD. "
                    "goes to the methods that sample trees only.")
    a = ap.parse_args(argv)
    a.all_methods = a.methods is None
    a.methods = list(METHODS) if a.all_methods else [m for m in a.methods.split(",") if m]
    bad = [m for m in a.methods if m not in METHODS]
    if bad:
        ap.error(f"unknown method(s) {', '.join(bad)}; valid: {', '.join(METHODS)}")
    try:
        a.seeds = [int(s) for s in a.seeds.split(",") if s]
    except ValueError:
        ap.error(f"--seeds must be comma-separated integers, got {a.seeds!r}")
    if not a.seeds or a.token_budget < 1 or a.eval_every < 1:
        ap.error("need at least one seed, --token-budget >= 1 and --eval-every >= 1")
    if any("=" not in x for x in a.set):
        ap.error("--set takes KEY=VALUE or METHOD.KEY=VALUE")
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    try:
        return compare(a)
    except UsageError as e:  # a bad config, model path or leftover: one line, exit 2
        print(f"compare: error: {e}", file=sys.stderr)
        return 2


def fitting_methods(task) -> list[str]:
    """The default: every method, less the tool-aware trees when the task has no tools."""
    return [m for m in METHODS if task.sample.tools or METHODS[m].get("branch") != "tool"]


def compare(a: argparse.Namespace) -> int:
    """Run every (seed, method), then write the table, the JSON summary and the plot."""
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    task = load_config(a.config, overrides(None, a.seeds[0], a))  # the task's config must
    #                                                     load: only a method's own is skipped
    if a.all_methods:
        a.methods = fitting_methods(task)
    os.makedirs(a.out, exist_ok=True)
    runs: dict[str, dict[int, str]] = {}
    skipped: dict[str, str] = {}
    for seed in a.seeds:  # seeds outer: a load change on the shared machine hits every method
        for m in a.methods:
            if m in skipped:
                continue
            d, why = run_one(m, seed, a, log)
            if d is None:
                skipped[m] = why
            else:
                runs.setdefault(m, {})[seed] = d
    if not runs:
        log("no method ran")
        return 1
    s = summarise(runs)
    md = table(s)
    notes = [f"skipped {m}: its settings do not fit this task ({why})"
             for m, why in sorted(skipped.items())]
    with open(os.path.join(a.out, "compare.md"), "w") as f:
        f.write(f"config {a.config}, seeds {a.seeds}, token budget {a.token_budget} per run; "
                f"Δ: paired bootstrap over seeds, * = CI excludes 0 (from {MIN_MARKED} seeds "
                f"on)\n\n{md}\n"
                + "".join(f"\n{n}" for n in notes) + "\n")
    with open(os.path.join(a.out, "compare.json"), "w") as f:
        json.dump({**s, "skipped": sorted(skipped)}, f, indent=1)
    print(md)
    for n in notes:
        print(n)
    print(f"plot: {plot(runs, s, os.path.join(a.out, 'compare.png'))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
