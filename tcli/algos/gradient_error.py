"""How far a policy-gradient estimate is from a reference gradient (docs/design.md §10).

Estimators differ in scale as well as direction: GRPO divides each group by its reward std, a
loss aggregation divides by the batch's token count. The learning rate (and Adam) absorb any
positive scale, so an estimate is judged after the best scale factor:
``rel_mse = min_c ||c g - r||^2 / ||r||^2 = 1 - cos^2(g, r)`` for c free, and the cosine itself.
A negative best scale (an estimate pointing away from the reference) is not forgiven: c >= 0.
"""

from __future__ import annotations

import numpy as np


def ls_scale(g: np.ndarray, ref: np.ndarray) -> float:
    """The c >= 0 that minimises ||c g - ref||^2 (0 for a zero estimate)."""
    gg = float(np.dot(g, g))
    return max(0.0, float(np.dot(g, ref)) / gg) if gg > 0 else 0.0


def rel_mse(g: np.ndarray, ref: np.ndarray) -> float:
    """min over c >= 0 of ||c g - ref||^2 / ||ref||^2: 0 when g is a positive multiple of ref,
    1 when orthogonal to it (or pointing away, or zero)."""
    rr = float(np.dot(ref, ref))
    if rr == 0.0:
        raise ValueError("the reference gradient is zero")
    err = ls_scale(g, ref) * g - ref
    return float(np.dot(err, err)) / rr


def cosine(g: np.ndarray, ref: np.ndarray) -> float:
    """cos(g, ref); 0 when either is zero."""
    n = float(np.linalg.norm(g)) * float(np.linalg.norm(ref))
    return float(np.dot(g, ref)) / n if n > 0 else 0.0


def bootstrap_ci(values, level: float = 0.95, n_boot: int = 10000,
                 seed: int = 0) -> tuple[float, float, float]:
    """(mean, lo, hi): percentile bootstrap interval of the mean of ``values`` (independent
    repeats), resampled with a fixed seed so a report is reproducible."""
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        return float("nan"), float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(n_boot, x.size))].mean(axis=1)
    alpha = (1.0 - level) / 2
    lo, hi = np.quantile(means, [alpha, 1.0 - alpha])
    return float(x.mean()), float(lo), float(hi)


MIN_MARKED = 5  # pairs below which a bootstrap interval is too coarse to call a difference


def excludes_zero(lo: float, hi: float, n: int) -> bool:
    """Whether a reported difference gets its ``*``: the interval excludes 0, from ``MIN_MARKED``
    pairs on (one pair's interval is a point, two of one sign always exclude 0)."""
    return n >= MIN_MARKED and (lo > 0 or hi < 0)
