"""Compare advantage estimators on the arith task: same warm start, same seeds, same budget.

Each (estimator, seed) run gets the same sampled-token budget; accuracy is then reported both at
equal sampled tokens and at equal wall-clock time (the shortest run's wall time), with the spread
across seeds, as a table (stdout + compare.md) and a plot (compare.png).

    python examples/arith/compare.py --out runs/compare --estimators grpo,tempo,treerpo,ppo --seeds 0,1,2
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

from tcli.config.loop import load_config  # noqa: E402
from tcli.loop import run_loop  # noqa: E402
from tcli.plot import plot_runs, read_metrics  # noqa: E402

TREE = {"mode": "tree", "width": 2, "depth": 3, "segment_tokens": 8}  # 8 leaves per prompt
# PPO as usually run: GAE(gamma 1, lambda 0.95) over a critic made from the warm start, advantages
# whitened over the step; the critic's lr is 5x the policy's (its value head starts at zero).
PPO = {"whiten": True, "critic_lr": 1e-3}
METHOD = {"treerpo": TREE, "ppo": PPO}




def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=os.path.join(ROOT, "examples/arith/demo.toml"))
    ap.add_argument("--out", default="runs/compare")
    ap.add_argument("--estimators", default="grpo,tempo,treerpo,ppo")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--token-budget", type=int, default=250_000, help="sampled tokens per run")
    ap.add_argument("--eval-every", type=int, default=10)
    ap.add_argument("--model", default=None)
    a = ap.parse_args()
    ests = [e for e in a.estimators.split(",") if e]
    seeds = [int(s) for s in a.seeds.split(",") if s]
    runs: dict[str, list[str]] = {}
    for est in ests:
        for seed in seeds:
            run_dir = os.path.join(a.out, f"{est}-s{seed}")
            over = {"estimator": est, "seed": seed, "run_dir": run_dir, "steps": 10_000,
                    "max_wall_seconds": 0.0, "max_sampled_tokens": a.token_budget,
                    "eval_every": a.eval_every, **METHOD.get(est, {})}
            if a.model:
                over["model"] = a.model
            cfg = load_config(a.config, over)
            done = os.path.exists(os.path.join(run_dir, "metrics.jsonl"))
            print(f"== {est} seed {seed} -> {run_dir}", file=sys.stderr)
            run_loop(cfg, resume=done, log=lambda s: None)
            runs.setdefault(est, []).append(run_dir)
    # equal wall clock: the shortest run's total wall time
    evals = {d: [m for m in read_metrics(d) if m.get("kind") == "eval"] for ds in runs.values() for d in ds}
    t_common = min(e[-1]["wall_time"] for e in evals.values())
    rows = ["| estimator | initial acc | final acc (equal token budget) | acc @ equal wall time (%.0f s) "
            "| wall s | sampled tokens | steps |" % t_common, "|---|---|---|---|---|---|---|"]
    for est, dirs in runs.items():
        init, final, at_t, walls, toks, steps = [], [], [], [], [], []
        for d in dirs:
            e = evals[d]
            xs_t = np.array([m["wall_time"] for m in e])
            ys = np.array([m["accuracy"] for m in e])
            init.append(ys[0])
            final.append(ys[-1])
            at_t.append(float(np.interp(t_common, xs_t, ys)))  # linear between evaluations
            walls.append(xs_t[-1])
            toks.append(e[-1]["sampled_tokens_total"])
            steps.append(e[-1]["step"])

        def ms(v):
            return f"{np.mean(v):.3f} ± {np.std(v):.3f}"

        rows.append(f"| {est} | {ms(init)} | {ms(final)} | {ms(at_t)} | {np.mean(walls):.0f} "
                    f"| {np.mean(toks):.0f} | {np.mean(steps):.0f} |")
    table = "\n".join(rows)
    print(table)
    with open(os.path.join(a.out, "compare.md"), "w") as f:
        f.write(f"seeds {seeds}, token budget {a.token_budget} per run\n\n{table}\n")
    plot_runs([], os.path.join(a.out, "compare.png"), groups=runs)
    print(f"plot: {os.path.join(a.out, 'compare.png')}")


if __name__ == "__main__":
    main()
