"""Credit assignment at the mechanism: how far each method's policy-gradient estimate lies from
the true gradient of the expected reward, at the same number of sampled tokens.

For one checkpoint and a fixed set of prompts, a reference gradient comes from a large sample
(``--ref-samples`` independent responses per prompt, RLOO advantages, two halves averaged; their
disagreement gives the reference's own noise). Then, per budget B and repeat, every sampling mode
(independent, fixed-segment trees, entropy trees) draws groups on the prompts in a fresh random
order until B unique sampled tokens are spent; every method on that mode takes its advantages on
those very groups (tcli's estimators) and the trainer's loss gradient (``Trainer.loss_gradient``,
the step's loss machinery, no step). Reported per (method, budget), mean over repeats with a
bootstrap 95 % CI: ``rel_mse`` = min_{c>=0} ||c g - g_ref||^2 / ||g_ref||^2 and the cosine
(docs/design.md §10). ``--n`` and ``--temperature`` reshape every method (group size, sampling
temperature; examples/gradient_error_methods.py), the expand methods add expand-tree's children.

    python examples/gradient_error.py --task arith --budgets 2048,4096 --repeats 32 --seed 0
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import sys
import time
from dataclasses import dataclass, field

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from examples.gradient_error_methods import (METHODS, SAMPLE_KEYS, check_n,  # noqa: E402
                                             reference_row, regime, sample_groups)
from tcli.algos.gradient_error import (bootstrap_ci, cosine, excludes_zero, ls_scale,  # noqa: E402
                                       rel_mse)
from tcli.config.loop import load_config  # noqa: E402
from tcli.errors import TcliError, UsageError  # noqa: E402

# the task's loop config (built by examples/prepare_task.sh) and its default parameter subset
TASKS = {"arith": ("examples/arith/demo.toml", "all"),
         "countdown": ("examples/countdown/countdown.toml", "all"),
         "real": ("examples/real/demo.toml", "last:2")}
CHUNK = 4  # prompts per engine call while drawing: the budget's last call wastes little


def seed_of(*parts) -> int:
    """A seed for one draw, a function of its coordinates only (reruns and orders agree)."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:4], "little") >> 1


@dataclass
class Setup:
    """Everything the draws share: configs per method, the prompts, trainer, engine, subset."""

    cfgs: dict
    ref_cfg: object
    prompts: list
    trainer: object
    engine: object
    params: list
    pool: object = None
    spec: str = "all"
    n_params: int = 0
    log: object = field(default=lambda s: None)


def open_setup(a: argparse.Namespace) -> Setup:
    """Configs (the task's plus each method's row), the fixed prompt set, one trainer whose module
    the engine samples from, and the parameter subset."""
    from tcli.config.threads import ThreadOptions
    from tcli.engines import open_engine
    from tcli.loop.inputs import loop_prompts
    from tcli.stages.verify import start_pool
    from tcli.train.gradient import select_parameters
    from tcli.train.trainer import Trainer

    base = {"seed": a.seed, **({"model": a.model} if a.model else {})}
    cfgs = {m: load_config(a.config, {**base, **regime(METHODS[m], a.n, a.temperature)})
            for m in a.methods}
    ref_cfg = load_config(a.config, {**base, **reference_row(a.ref_samples, a.temperature)})
    prompts = loop_prompts(ref_cfg, "train_data")
    if len(prompts) < a.prompts:
        raise UsageError(f"{ref_cfg.run.train_data}: {len(prompts)} prompts, --prompts asks for "
                         f"{a.prompts}")
    prompts = random.Random(seed_of(a.seed, "prompts")).sample(prompts, a.prompts)
    v = ref_cfg.verify
    pool = start_pool(v.task, v.timeout, v.workers)  # before the model (workers fork)
    ThreadOptions(ref_cfg.run.threads).apply()
    trainer = Trainer(ref_cfg.run.model, ref_cfg.train, seed=a.seed)
    engine = open_engine(ref_cfg.run.model, ref_cfg.sample, seed=a.seed, trainer=trainer)
    named = select_parameters(trainer.model, a.params)
    params = [p for _, p in named]
    return Setup(cfgs, ref_cfg, prompts, trainer, engine, params, pool, a.params,
                 sum(p.numel() for p in params), a.log)


# ----------------------------------------------------------------------------- draws

def draw(s: Setup, cfg, order: list[dict], budget: int, seed: int) -> tuple[list, int]:
    """Groups on ``order`` (cycled; each pass a new prompt id) until ``budget`` unique sampled
    tokens are spent: (groups, tokens). The group that crosses the budget is kept."""
    from tcli.stages.sample import token_counts

    groups, used, k = [], 0, 0
    while used < budget:
        chunk = [order[(k + j) % len(order)] for j in range(CHUNK)]
        chunk = [{**p, "id": f"{p['id']}#{(k + j) // len(order)}"} for j, p in enumerate(chunk)]
        for g in sample_groups(s, cfg, chunk, seed_of(seed, k)):
            if used >= budget:
                break
            groups.append(g)
            used += token_counts(g)[0]
        k += CHUNK
    return groups, used


def gradient(s: Setup, cfg, groups: list[list[dict]]) -> np.ndarray:
    """The method's loss gradient on ``groups``: its advantages (copies of the records), then the
    trainer's loss over all of them."""
    from tcli.stages.advantages import stage_end, stage_group

    recs = []
    for g in groups:
        g = [dict(r) for r in g]
        stage_group(g, cfg.advantages)
        recs.extend(g)
    return loss_gradient(s, cfg, stage_end(recs, cfg.advantages))


def loss_gradient(s: Setup, cfg, recs: list[dict]) -> np.ndarray:
    """The trainer's loss gradient. A response whose advantages are all 0 adds exactly nothing
    to the policy loss's gradient, only tokens to its denominator (a positive factor the LS scale
    absorbs): without a KL term it is left out of the backward (most groups of a real model)."""
    if not cfg.train.kl_coef:
        recs = [r for r in recs if any(r["advantages"])]
    if not recs:
        return np.zeros(s.n_params)
    return s.trainer.loss_gradient(recs, s.params)


def reference(s: Setup, seed: int) -> dict:
    """The reference: ``--ref-samples`` per prompt, RLOO, the mean of two halves' gradients;
    ``noise`` = ||g_a - g_b||^2 / 4 / ||g_ref||^2, the reference's own expected rel. error."""
    from tcli.stages.advantages import stage_group
    from tcli.stages.sample import token_counts

    halves: list[list[list[dict]]] = [[], []]
    tokens = 0
    for i in range(0, len(s.prompts), CHUNK):
        for g in sample_groups(s, s.ref_cfg, s.prompts[i:i + CHUNK], seed_of(seed, "ref", i)):
            tokens += token_counts(g)[0]
            stage_group(g, s.ref_cfg.advantages)
            halves[0].append(g[0::2])
            halves[1].append(g[1::2])
    ga, gb = (loss_gradient(s, s.ref_cfg, [r for g in h for r in g]) for h in halves)
    ref = (ga + gb) / 2
    rr = float(np.dot(ref, ref))
    if rr == 0.0:
        raise TcliError("the reference gradient is zero: every group had one reward")
    d = ga - gb
    return {"g": ref, "noise": float(np.dot(d, d)) / 4 / rr, "tokens": tokens,
            "norm": rr ** 0.5}


# ----------------------------------------------------------------------------- measurement

def sample_key(cfg) -> tuple:
    """Methods whose sampling settings agree share their draws (a paired comparison)."""
    return tuple(getattr(cfg.sample, k) for k in SAMPLE_KEYS)


def measure(s: Setup, a: argparse.Namespace, ref: np.ndarray) -> dict:
    """{(method, budget): [per-repeat {rel_mse, cosine, scale, tokens}]}: every repeat draws once
    per sampling mode, in a prompt order of its own shared by the modes."""
    out: dict = {(m, b): [] for m in a.methods for b in a.budgets}
    t0 = time.perf_counter()
    for b in a.budgets:
        for r in range(a.repeats):
            order = random.Random(seed_of(a.seed, "order", b, r)).sample(s.prompts, len(s.prompts))
            drawn: dict = {}
            for m in a.methods:
                cfg = s.cfgs[m]
                key = sample_key(cfg)
                if key not in drawn:
                    drawn[key] = draw(s, cfg, order, b, seed_of(a.seed, key, b, r))
                groups, used = drawn[key]
                g = gradient(s, cfg, groups)
                out[m, b].append({"rel_mse": rel_mse(g, ref), "cosine": cosine(g, ref),
                                  "scale": ls_scale(g, ref), "tokens": used,
                                  "responses": sum(len(x) for x in groups)})
            s.log(f"budget {b} repeat {r + 1}/{a.repeats} ({time.perf_counter() - t0:.0f}s)")
    return out


def summarise(runs: dict, a: argparse.Namespace) -> list[dict]:
    """Per (method, budget): mean and bootstrap 95 % CI over repeats of rel_mse and cosine."""
    rows = []
    for (m, b), reps in runs.items():
        row = {"method": m, "budget": b, "repeats": len(reps)}
        for k in ("rel_mse", "cosine"):
            row[k] = bootstrap_ci([x[k] for x in reps], seed=a.seed)
        for k in ("tokens", "responses", "scale"):
            row[f"{k}_mean"] = float(np.mean([x[k] for x in reps]))
        row["per_repeat"] = reps
        rows.append(row)
    return paired(rows, a.seed)


def paired(rows: list[dict], seed: int = 0, baseline: str = "rloo") -> list[dict]:
    """Each row's rel_mse minus the baseline's at the same budget, repeat by repeat, with its
    bootstrap CI (``d_rel_mse``): repeat r of every method saw the same prompt order, and the
    methods of one sampling mode the very same groups, so the differences are tighter than the
    separate CIs suggest."""
    base = {r["budget"]: r for r in rows if r["method"] == baseline}
    for r in rows:
        b = base.get(r["budget"])
        if b is not None and r is not b:
            d = [x["rel_mse"] - y["rel_mse"] for x, y in zip(r["per_repeat"], b["per_repeat"])]
            r[f"d_rel_mse_vs_{baseline}"] = bootstrap_ci(d, seed=seed)
    return rows


NOISE_WARN = 0.1  # the reference's own expected rel_mse above which the figures mean little


def noisy_reference(noise: float) -> str:
    """A warning when the reference gradient is too noisy to measure errors against, else ''."""
    if noise <= NOISE_WARN:
        return ""
    return (f"warning: the reference's own relative error is {noise:.3f} (> {NOISE_WARN}): "
            "rel_mse below about that is noise; raise --ref-samples")


def markdown(out: dict, baseline: str = "rloo") -> str:
    """The summary as a markdown table, one row per (budget, method), after the warning of a
    noisy reference."""
    def ci(x) -> str:
        return f"{x[0]:.3f} [{x[1]:.3f}, {x[2]:.3f}]"

    key = f"d_rel_mse_vs_{baseline}"
    lines = [f"| budget | method | tokens | rel_mse (95 % CI) | Δ rel_mse vs {baseline} (paired) "
             "| cosine (95 % CI) |", "|---|---|---|---|---|---|"]
    for r in sorted(out["rows"], key=lambda r: r["budget"]):
        d = r.get(key)
        mark = " *" if d and excludes_zero(d[1], d[2], r["repeats"]) else ""
        dd = f"{d[0]:+.3f} [{d[1]:+.3f}, {d[2]:+.3f}]{mark}" if d else "—"
        lines.append(f"| {r['budget']} | {r['method']} | {r['tokens_mean']:.0f} | "
                     f"{ci(r['rel_mse'])} | {dd} | {ci(r['cosine'])} |")
    warning = noisy_reference(out.get("ref_noise", 0.0))
    return "\n".join(([warning, ""] if warning else []) + lines)


def line(row: dict) -> str:
    x, c = row["rel_mse"], row["cosine"]
    return (f"method {row['method']} budget {row['budget']} rel_mse {x[0]:.4f} "
            f"[{x[1]:.4f}, {x[2]:.4f}] cosine {c[0]:.4f} [{c[1]:.4f}, {c[2]:.4f}]")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", choices=sorted(TASKS), help="A task of examples/prepare_task.sh.")
    ap.add_argument("--config", help="A loop config instead of --task's.")
    ap.add_argument("--model", help="Checkpoint (default: the config's model).")
    ap.add_argument("--methods", default=",".join(METHODS),
                    help=f"Comma-separated, from: {', '.join(METHODS)} (default all).")
    ap.add_argument("--budgets", default="2048,4096", help="Sampled tokens per batch, comma-separated (default 2048,4096).")
    ap.add_argument("--repeats", type=int, default=16, help="Independent batches per budget (default 16).")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--prompts", type=int, default=16, help="Size of the fixed prompt set (default 16).")
    ap.add_argument("--ref-samples", type=int, default=256, help="Reference responses per prompt (default 256).")
    ap.add_argument("--params", help="Gradient subset: all or last:K (blocks, final norm, head "
                    "unless tied); default per task (all; real: last:2).")
    ap.add_argument("--n", type=int, help="Leaves per prompt for every method: n independent "
                    "samples or binary trees of depth log2(n) (default: each method's, 8).")
    ap.add_argument("--temperature", type=float, help="Sampling temperature of every method and "
                    "of the reference (default: the config's).")
    ap.add_argument("--json", help="Write the summary (with every repeat) here.")
    ap.add_argument("--markdown", help="Write the summary as a markdown table here.")
    a = ap.parse_args(argv)
    if bool(a.task) == bool(a.config):
        ap.error("give --task or --config (one of them)")
    if a.task:
        a.config = os.path.join(ROOT, TASKS[a.task][0])
    a.params = a.params or (TASKS[a.task][1] if a.task else "all")
    from tcli.train.gradient import parse_selection  # no torch: fails before any model loads

    try:
        parse_selection(a.params)
    except UsageError as e:
        ap.error(str(e))
    a.methods = [m for m in a.methods.split(",") if m]
    bad = [m for m in a.methods if m not in METHODS]
    if bad or not a.methods:
        ap.error(f"unknown method(s) {', '.join(bad)}; valid: {', '.join(METHODS)}")
    try:
        a.budgets = [int(b) for b in a.budgets.split(",") if b]
    except ValueError:
        ap.error(f"--budgets must be comma-separated integers, got {a.budgets!r}")
    if not a.budgets or min(a.budgets) < 1 or a.repeats < 2 or a.prompts < 1 \
            or a.ref_samples < 4:
        ap.error("need budgets >= 1, --repeats >= 2, --prompts >= 1 and --ref-samples >= 4")
    if check_n(a.n):
        ap.error(check_n(a.n))
    if a.temperature is not None and a.temperature <= 0:
        ap.error(f"--temperature must be > 0 (sampling), got {a.temperature}")
    return a


def run(a: argparse.Namespace) -> dict:
    """Reference, repeats, summary (printed, and written to --json)."""
    a.log = lambda s: print(s, file=sys.stderr, flush=True)
    s = open_setup(a)
    try:
        t0 = time.perf_counter()
        ref = reference(s, seed_of(a.seed, "reference"))
        a.log(f"reference: {ref['tokens']} tokens, noise {ref['noise']:.4f}, {s.n_params} "
              f"parameters ({s.spec}), {time.perf_counter() - t0:.0f}s")
        if noisy_reference(ref["noise"]):
            a.log(noisy_reference(ref["noise"]))
        rows = summarise(measure(s, a, ref["g"]), a)
    finally:
        if s.pool is not None:
            s.pool.close()
    for row in rows:
        print(line(row), flush=True)
    out = {"config": a.config, "model": s.ref_cfg.run.model, "seed": a.seed,
           "prompts": len(s.prompts), "ref_samples": a.ref_samples, "ref_tokens": ref["tokens"],
           "ref_noise": ref["noise"], "params": s.spec, "n_params": s.n_params,
           "n": a.n, "temperature": s.ref_cfg.sample.temperature,
           "loss_agg": s.ref_cfg.train.loss_agg, "rows": rows}
    for path, text in ((a.json, lambda: json.dumps(out, indent=1)),
                       (a.markdown, lambda: markdown(out) + "\n")):
        if path:
            with open(path + ".tmp", "w") as f:
                f.write(text())
            os.replace(path + ".tmp", path)
    return out


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    try:
        run(a)
    except UsageError as e:
        print(f"gradient_error: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
