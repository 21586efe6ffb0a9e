"""Environment tokens in the advantage estimators (docs/design.md §3.6).

A record's ``loss_mask`` marks which response tokens the policy sampled (True) and which a tool
wrote (False). Environment tokens are part of the transition between two policy decisions: they
get advantage 0, and a temporal-difference chain (TEMPO's δ, GAE's recursion) runs over the policy
tokens only, each one's successor state being the prefix before the *next policy token*, after
the environment span. Numbers only, no torch; ``None`` for a mask means all policy tokens and
leaves every array untouched.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def any_masked(masks: Sequence[np.ndarray | None]) -> bool:
    """Does any response hold an environment token?"""
    return any(m is not None and not m.all() for m in masks)


def zero_environment(per_token: list[np.ndarray], masks: Sequence[np.ndarray | None]) -> None:
    """Advantage 0 on every environment token, in place (policy tokens keep theirs)."""
    for a, m in zip(per_token, masks):
        if m is not None:
            a[~m] = 0.0


def policy_td(values: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """TEMPO's δ for one response over its T + 1 prefix values (``values[T]`` = its own leaf),
    with environment tokens jumped over: for policy token t, δ_t = V(s_n) − V(s_t) where n is the
    next policy token after t (T after the last one), so the value of an environment span's
    outcome lands on the policy token that led into it, and a policy token right after the span
    starts from V of the prefix that ends with the span. δ is 0 on environment tokens; the δ of
    the policy tokens sum to V(leaf) − V(before the first policy token)."""
    T = len(mask)
    pos = np.flatnonzero(mask)
    out = np.zeros(T, dtype=np.float64)
    if len(pos):
        nxt = np.append(pos[1:], T)
        out[pos] = values[nxt] - values[pos]
    return out


def compress(values: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(policy positions, the T + 1 critic values seen by the policy tokens only: V before each
    policy token and the value after the last token), for a GAE chain that skips environment
    tokens."""
    pos = np.flatnonzero(mask)
    return pos, np.append(values[pos], values[len(mask)])


def expand(pos: np.ndarray, policy: np.ndarray, fill: np.ndarray) -> np.ndarray:
    """``fill`` with the policy tokens' entries replaced by ``policy`` (a copy)."""
    out = np.array(fill, dtype=np.float64, copy=True)
    out[pos] = policy
    return out


def policy_count(masks: Sequence[np.ndarray | None], lens: Sequence[int]) -> int:
    """Policy tokens of responses of ``lens`` tokens with these masks (None: all of them)."""
    return int(sum(n if m is None else int(m.sum()) for m, n in zip(masks, lens)))
