"""Generalised advantage estimation (GAE) over a learned critic's values, for PPO
(docs/design.md §4.7).

A response of T tokens gets its verifiable reward r at the last token; ``critic_values`` holds
T + 1 critic values: V_t before response token t, and V_T after the last token. A finished
response is a terminal state, so the value after it is 0 in the recursion (as in verl and TRL;
V_T is kept for analysis):

    delta_t = r_t + gamma * V_{t+1} - V_t        (r_t = r at t = T - 1, else 0; V_T -> 0)
    A_t     = sum_k (gamma * lam)^k * delta_{t+k}
    returns_t = A_t + V_t

Both sums are reverse discounted cumulative sums, computed with numpy over whole arrays (no loop
over tokens): see :func:`discounted_suffix_sum`.
"""

from __future__ import annotations

import math

import numpy as np

from tcli.algos.masks import compress, expand

# c**k stays a normal float64 for k below this many steps when c >= this; blocks keep every
# power of c inside (1e-280, 1]: exact enough, never subnormal, never overflowing.
_TINY_LOG = math.log(1e-280)


def discounted_suffix_sum(x: np.ndarray, c: float) -> np.ndarray:
    """``y_t = sum_{k >= t} c**(k - t) * x_k`` for 0 <= c <= 1, vectorised.

    Within a block of length B, ``y_t = c**-t * sum_{k >= t} c**k x_k`` is a reversed cumsum; B is
    chosen so that c**B does not underflow, and blocks are chained from the end through their first
    element (one Python step per block: one block for c = 1 or c >= 0.5 at T < 900)."""
    x = np.asarray(x, dtype=np.float64)
    n = len(x)
    if n == 0 or c == 0.0:
        return x.copy()
    if c == 1.0:
        return np.cumsum(x[::-1])[::-1]
    block = max(1, min(n, int(_TINY_LOG / math.log(c))))
    out = np.empty(n, dtype=np.float64)
    carry = 0.0  # y at the first index after the current block
    for end in range(n, 0, -block):
        start = max(0, end - block)
        k = np.arange(end - start, dtype=np.float64)
        pw = c ** k                                   # c**(t - start) for t in the block
        s = np.cumsum((x[start:end] * pw)[::-1])[::-1] / pw
        out[start:end] = s + carry * c ** (end - start - k)
        carry = float(out[start])
    return out


def gae(reward: float, values: np.ndarray, gamma: float, lam: float,
        mask: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Advantages and returns of one response from its reward and its T + 1 critic values.

    ``mask`` (the record's ``loss_mask``, False = environment token): the recursion runs over the
    policy tokens alone, each one's next value being V before the next policy token (environment
    spans are part of the transition, and γ, λ count policy steps); the reward sits on the last
    policy token. Environment tokens get advantage 0 and return V_t, so the critic, which trains
    on policy tokens only, has no target there (docs/design.md §3.6)."""
    if mask is not None and not mask.all():
        v = np.asarray(values, dtype=np.float64)
        pos, policy_v = compress(v, mask)
        adv, ret = gae(reward, policy_v, gamma, lam)
        return expand(pos, adv, np.zeros(len(mask))), expand(pos, ret, v[:len(mask)])
    v = np.asarray(values, dtype=np.float64)
    T = len(v) - 1
    nxt = np.empty(T, dtype=np.float64)
    nxt[:-1] = v[1:T]
    if T:
        nxt[-1] = 0.0  # terminal: the episode ends with the reward
    delta = gamma * nxt - v[:T]
    if T:
        delta[-1] += reward
    adv = discounted_suffix_sum(delta, gamma * lam)
    return adv, adv + v[:T]
