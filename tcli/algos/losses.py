"""Importance-ratio levels, KL estimators and loss aggregations (docs/design.md §4), registered by
name.

Configuration checks ``--ratio-level``, ``--kl-estimator`` and ``--loss-agg`` against these
registries at start-up, so this module imports no torch: its functions use only the methods of
the tensors they get. They work on [B, T] tensors with a boolean ``mask`` of real response
tokens; the clipped policy loss itself is ``tcli.train.loss``.

Aggregations are split into a numerator (summed over micro-batches and ranks) and a denominator
(counted over the whole mini-batch on all ranks *before* the first backward), which is what makes
gradient accumulation and data parallelism give the same gradient as one big batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from tcli.registry import Registry

RATIO_LEVELS: Registry["RatioLevel"] = Registry("ratio level")
KL_ESTIMATORS: Registry[Callable] = Registry("KL estimator")
LOSS_AGGREGATIONS: Registry["Aggregation"] = Registry("loss aggregation")

LOG_RATIO_CLAMP = 20.0  # exp(20) ~ 5e8: keeps a wildly off-policy token from producing inf


# ----------------------------------------------------------------------------- ratio levels

@dataclass(frozen=True)
class RatioLevel:
    """How the importance ratio of a token is formed, and the clip range that suits its scale: a
    sequence ratio is a geometric mean of token ratios, far closer to 1, so its clip range is
    three orders of magnitude narrower (docs/design.md §4.13)."""

    name: str
    log_ratio: Callable  # (logp, old_logp, mask) -> [B, T] log ratio
    clip_low: float      # default eps_low
    clip_high: float     # default eps_high


def token_log_ratio(logp, old_logp, mask):
    """PPO: log rho_t = log pi_theta - log pi_old of each token."""
    return (logp - old_logp).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)


def sequence_log_ratio(logp, old_logp, mask):
    """GSPO: log s_i = mean over response i's tokens of (log pi_theta - log pi_old), given to every
    token of the row; the gradient reaches each token's log-prob through the mean."""
    d = (logp - old_logp).masked_fill(~mask, 0.0)
    mean = d.sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1)
    return mean.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP).expand_as(logp)


for _level in (RatioLevel("token", token_log_ratio, 0.2, 0.28),       # DAPO's clip-higher
               RatioLevel("sequence", sequence_log_ratio, 3e-4, 4e-4)):  # the GSPO paper's
    RATIO_LEVELS.register(_level.name)(_level)


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
