"""`tcli eval`: sample, verify, and summarise accuracy, unbiased pass@k and a bootstrap interval."""

from __future__ import annotations

from collections import defaultdict
from typing import Iterable, Sequence

import numpy as np

from tcli.errors import DataError
from tcli.stages.sample import sample_records
from tcli.stages.verify import verify_records
from tcli.verifiers.weighted import first_reward


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k (Chen et al. 2021): 1 - C(n-c, k) / C(n, k), computed as a stable product."""
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples per prompt, got {n}")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def bootstrap_ci(values: Sequence[float], seed: int = 0, iters: int = 2000,
                 level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap over prompts of the mean of ``values``."""
    v = np.asarray(values, dtype=np.float64)
    if len(v) == 0:
        return (float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, len(v), size=(iters, len(v)))].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(lo), float(hi)


def summarise(records: Iterable[dict], ks: Sequence[int] = (1,), seed: int = 0) -> dict:
    """Accuracy over samples, pass@k over prompts, mean response length, 95% bootstrap CI."""
    by_prompt: dict = defaultdict(list)
    lengths = []
    for r in records:
        by_prompt[r["prompt_id"]].append(first_reward(r) > 0.5)  # several tasks: the first
        lengths.append(len(r.get("token_ids", ())))
    if not by_prompt:
        return {"prompts": 0, "samples": 0, "accuracy": 0.0}
    per_prompt_acc = [float(np.mean(v)) for v in by_prompt.values()]
    n_min = min(len(v) for v in by_prompt.values())
    out = {
        "prompts": len(by_prompt),
        "samples": len(lengths),
        "accuracy": float(np.mean(per_prompt_acc)),
        "mean_response_tokens": float(np.mean(lengths)),
    }
    lo, hi = bootstrap_ci(per_prompt_acc, seed=seed)
    out["accuracy_ci95"] = [lo, hi]
    for k in ks:
        if k <= n_min:
            out[f"pass@{k}"] = float(np.mean([pass_at_k(len(v), sum(v), k) for v in by_prompt.values()]))
    return out


def eval_sampling(sample, ev):
    """Evaluation samples ``ev.n`` independent answers at ``ev.temperature`` (greedy by default)."""
    return sample.replace(mode="independent", n=ev.n, temperature=ev.temperature, min_new_tokens=0)


def evaluate(engine, prompts: list[dict], sample, verify, ev, *, seed: int = 0, pool=None,
             on_group=None, origin: dict | None = None) -> tuple[list[dict], dict]:
    """Per-sample records (with reward and verdict) and the summary.

    ``sample``/``verify``/``ev``: the stage's SampleOptions, VerifyOptions and EvalOptions;
    ``pool``: running verifier workers to reuse (the loop's); ``on_group``: called with each
    prompt's samples as they are drawn (progress); ``origin``: ``id(prompt)`` -> (file, line)
    where each prompt was read (``read_prompts``), so that a bad record is named there."""
    where = [(origin or {}).get(id(p), (None, None)) for p in prompts]
    rollouts = sample_records(engine, prompts, eval_sampling(sample, ev), seed=seed,
                              on_group=on_group)
    source, numbered = _numbered(rollouts, prompts, where)
    try:
        verified = list(verify_records(numbered, source, task=verify.task,
                                       timeout=verify.timeout, workers=verify.workers, pool=pool,
                                       weights=verify.weights,
                                       max_verifier_errors=verify.max_verifier_errors))
    except DataError as e:  # a prompt the sampler refused: index = its place in ``prompts``
        i = getattr(e, "index", None)
        if e.file is None and isinstance(i, int) and 0 <= i < len(where):
            e.located(*where[i])
        raise
    return verified, summarise(verified, ks=ev.ks, seed=seed)


def _numbered(rollouts: Iterable[dict], prompts: list[dict], where: list[tuple]):
    """(source name, (line, rollout) pairs) for the verifier: the file the prompts came from and
    each rollout's prompt line there; else ``<eval>`` and the rollout's position."""
    files = {f for f, _ in where}
    if len(files) != 1 or None in files:
        return "<eval>", enumerate(rollouts, 1)
    line = {p.get("id"): n for p, (_, n) in zip(prompts, where)}
    return files.pop(), ((line[r["prompt_id"]], r) for r in rollouts)
