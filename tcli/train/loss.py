"""Clipped policy loss, KL estimators and loss aggregations (DESIGN §4) as pure tensor functions.

Everything here works on [B, T] tensors with a boolean ``mask`` of real response tokens, so the
trainer can call it per micro-batch and the tests can check it on hand-computed numbers.

Aggregations are split into a numerator (summed over micro-batches and ranks) and a denominator
(counted over the whole mini-batch on all ranks *before* the first backward), which is what makes
gradient accumulation and data parallelism give the same gradient as one big batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from tcli.registry import Registry

KL_ESTIMATORS: Registry[Callable] = Registry("KL estimator")
LOSS_AGGREGATIONS: Registry["Aggregation"] = Registry("loss aggregation")

LOG_RATIO_CLAMP = 20.0  # exp(20) ~ 5e8: keeps a wildly off-policy token from producing inf


@dataclass
class PolicyLossOut:
    loss: "object"        # [B, T] per-token loss (0 outside mask)
    ratio: "object"       # [B, T] importance ratio rho
    clipped: "object"     # [B, T] bool: the clipped branch was taken (PPO clip active)
    dual_clipped: "object"  # [B, T] bool: the dual-clip bound was taken (A < 0)


def policy_loss(logp, old_logp, advantages, mask, *, clip_low: float = 0.2,
                clip_high: float = 0.28, dual_clip: float | None = 3.0) -> PolicyLossOut:
    """Per token  -min(rho*A, clip(rho, 1-clip_low, 1+clip_high)*A); for A < 0 additionally
    bounded by -c*A (dual clip, Ye et al. 2020) so a huge ratio on a bad token cannot blow up.
    ``dual_clip`` None or 0 disables the bound; otherwise it must be > 1."""
    import torch

    log_ratio = (logp - old_logp).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
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


# ----------------------------------------------------------------------------- KL estimators
# Schulman's estimators of KL(pi_theta || pi_ref) from samples of pi_theta, with
# log r = log pi_ref - log pi_theta (http://joschu.net/blog/kl-approx.html).

@KL_ESTIMATORS.register("k1")
def kl_k1(logp, ref_logp):
    """log pi - log pi_ref: unbiased, high variance, can be negative per token."""
    return logp - ref_logp


@KL_ESTIMATORS.register("k2")
def kl_k2(logp, ref_logp):
    """0.5 (log pi - log pi_ref)^2: biased, low variance, always >= 0."""
    return 0.5 * (logp - ref_logp) ** 2


@KL_ESTIMATORS.register("k3")
def kl_k3(logp, ref_logp):
    """r - 1 - log r with r = pi_ref / pi: unbiased and always >= 0 (GRPO's choice)."""
    import torch

    d = (ref_logp - logp).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    return torch.exp(d) - d - 1.0


def kl_penalty(logp, ref_logp, estimator: str = "k3"):
    return KL_ESTIMATORS.get(estimator)(logp, ref_logp)


# ----------------------------------------------------------------------------- aggregations

@dataclass(frozen=True)
class Aggregation:
    """loss = sum_b w_b * sum_t loss[b,t] / D. ``per_seq_mean`` sets w_b = 1/len_b (else 1);
    ``by_tokens`` sets D = number of tokens (else number of sequences)."""

    name: str
    per_seq_mean: bool
    by_tokens: bool

    def numerator(self, values, mask):
        v = values.masked_fill(~mask, 0.0)
        row = v.sum(-1)
        if self.per_seq_mean:
            row = row / mask.sum(-1).clamp(min=1)
        return row.sum()

    def denominator(self, mask) -> float:
        """Local count; the trainer all-reduces it across ranks and micro-batches."""
        if self.by_tokens:
            return float(mask.sum())
        return float((mask.sum(-1) > 0).sum())


for _agg in (Aggregation("token-mean", per_seq_mean=False, by_tokens=True),
             Aggregation("seq-mean-token-mean", per_seq_mean=True, by_tokens=False),
             Aggregation("seq-mean-token-sum", per_seq_mean=False, by_tokens=False)):
    LOSS_AGGREGATIONS.register(_agg.name)(_agg)


def aggregate(values, mask, mode: str = "token-mean"):
    """One-batch aggregation (numerator / denominator); 0 for an empty batch."""
    agg = LOSS_AGGREGATIONS.get(mode)
    d = agg.denominator(mask)
    return agg.numerator(values, mask) / max(d, 1.0)
