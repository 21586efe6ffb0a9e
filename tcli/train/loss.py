"""The clipped policy loss (docs/design.md §4.8) as a pure tensor function, with the KL
estimators and loss aggregations the trainer combines it with (registered in ``tcli.algos.losses``).

Everything here works on [B, T] tensors with a boolean ``mask`` of real response tokens, so the
trainer can call it per micro-batch and the tests can check it on hand-computed numbers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tcli.algos.losses import (KL_ESTIMATORS, LOG_RATIO_CLAMP, LOSS_AGGREGATIONS,  # noqa: F401
                               RATIO_LEVELS, Aggregation, aggregate, kl_k1, kl_k2, kl_k3,
                               kl_penalty)


@dataclass
class PolicyLossOut:
    loss: "object"        # [B, T] per-token loss (0 outside mask)
    ratio: "object"       # [B, T] importance ratio rho (sequence level: s_i on every token of i)
    clipped: "object"     # [B, T] bool: the clipped branch was taken (PPO clip active)
    dual_clipped: "object"  # [B, T] bool: the dual-clip bound was taken (A < 0)


def policy_loss(logp, old_logp, advantages, mask, *, clip_low: float = 0.2,
                clip_high: float = 0.28, dual_clip: float | None = 3.0,
                ratio_level: str = "token") -> PolicyLossOut:
    """Per token  -min(rho*A, clip(rho, 1-clip_low, 1+clip_high)*A); for A < 0 additionally
    bounded by -c*A (dual clip, Ye et al. 2020) so a huge ratio on a bad token cannot blow up.
    ``dual_clip`` None or 0 disables the bound; otherwise it must be > 1. ``ratio_level``
    (``RATIO_LEVELS``): rho per token, or GSPO's sequence ratio s_i on every token of row i."""
    log_ratio = RATIO_LEVELS.get(ratio_level).log_ratio(logp, old_logp, mask)
    ratio = torch.exp(log_ratio)
    A = advantages
    unclipped = -A * ratio
    clipped_l = -A * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    loss = torch.maximum(unclipped, clipped_l)
    clipped = (clipped_l > unclipped) & mask
    if dual_clip:
        bound = -A * dual_clip
        dual = (A < 0) & (loss > bound)
        loss = torch.where(dual, bound, loss)
        dual = dual & mask
    else:
        dual = torch.zeros_like(mask)
    loss = loss.masked_fill(~mask, 0.0)
    return PolicyLossOut(loss, ratio, clipped, dual)


def tis_weights(train_old, sampler_logp, mask, cap: float):
    """Truncated importance sampling: min(pi_train_old / pi_sampler, C) per token (0 outside
    ``mask``), a constant factor on each token's loss that corrects for the sampler's numerics
    (another engine or precision) without letting one token's ratio blow up
    (docs/design.md §4.16)."""
    log_w = (train_old - sampler_logp).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    return log_w.exp().clamp(max=cap).masked_fill(~mask, 0.0)


def mismatch_sums(train_logp, sampler_logp, mask, cap: float = 0.0) -> tuple[float, float, float,
                                                                            float]:
    """(sum |log pi_train - log pi_sampler|, the largest log ratio, tokens whose ratio exceeds
    ``cap`` (0 when cap is 0), tokens) over the real tokens: the sampler/trainer mismatch."""
    d = (train_logp.detach() - sampler_logp).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    n = float(mask.sum())
    if not n:
        return 0.0, float("-inf"), 0.0, 0.0
    top = float(d.masked_fill(~mask, float("-inf")).max())
    capped = float(((d.exp() > cap) & mask).sum()) if cap > 0 else 0.0
    return float(d.abs().masked_fill(~mask, 0.0).sum()), top, capped, n
