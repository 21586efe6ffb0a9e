"""KL estimators and loss aggregations (docs/design.md §4), registered by name.

Configuration checks ``--kl-estimator`` and ``--loss-agg`` against these registries at start-up,
so this module imports no torch: its functions use only the methods of the tensors they get.
They work on [B, T] tensors with a boolean ``mask`` of real response tokens; the clipped policy
loss itself is ``tcli.train.loss``.

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
    d = (ref_logp - logp).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    return d.exp() - d - 1.0


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
