"""The metrics record of one train step: local sums per micro-batch, all-reduced once at the end."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

MISMATCH_WARN = 1.0  # nats per token; a sampler's own kernels or bf16 stay far below 0.1


def off_policy_note(m: dict) -> str:
    """'' unless the step's records' log-probs are far from the trainer's own: rollouts of another
    policy (a wrong --model, an engine that did not get the new weights). Nothing fails then."""
    gap = m.get("mismatch_abs_logp", 0.0)
    if not gap > MISMATCH_WARN:
        return ""
    return (f"the sampled log-probs differ from the trained model's by {gap:.3g} nats per token "
            "(mismatch_abs_logp): were they sampled by another model?")


SUMS = ("loss", "pg_loss", "kl", "clipped", "dual_clipped", "entropy", "approx_kl", "tokens",
        "seqs", "model_tokens", "real_tokens", "mismatch_abs", "mismatch_tokens", "tis_capped")


@dataclass
class StepStats:
    """Sums over this rank's micro-batches. ``loss`` and ``pg_loss`` are numerators already
    divided by the global denominator of their mini-batch, so their all-reduced sum is the global
    loss summed over optimizer steps."""

    loss: float = 0.0
    pg_loss: float = 0.0
    kl: float = 0.0
    clipped: float = 0.0
    dual_clipped: float = 0.0
    entropy: float = 0.0
    approx_kl: float = 0.0
    tokens: float = 0.0
    seqs: float = 0.0
    model_tokens: float = 0.0     # positions the model ran over (padding included)
    real_tokens: float = 0.0      # of those, real (unique, when prefix-shared) tokens
    # sampler/trainer mismatch over the tokens seen before the first update (docs/design.md §4.16)
    mismatch_abs: float = 0.0     # sum |log pi_train_old - log pi_sampler|
    mismatch_tokens: float = 0.0
    tis_capped: float = 0.0       # tokens whose ratio exceeded the TIS cap
    mismatch_max: float = float("-inf")  # the largest log ratio (max over ranks, not a sum)
    responses: int = 0            # the step's responses (the same on every rank)
    truncated: int = 0            # of those, finish_reason "length"
    grad_norms: list[float] = field(default_factory=list)
    optimizer_steps: int = 0      # optimizer steps attempted (one per non-empty mini-batch)
    skipped: int = 0              # of those, skipped for a non-finite gradient norm

    def add_grad_norm(self, norm: float) -> bool:
        """Record a mini-batch's gradient norm; False when it is not finite (skip the step)."""
        self.grad_norms.append(norm)
        self.optimizer_steps += 1
        if not math.isfinite(norm):
            self.skipped += 1
            return False
        return True

    def add_mismatch(self, sums: tuple[float, float, float, float]) -> None:
        """Add one micro-batch's ``tcli.train.loss.mismatch_sums``."""
        abs_sum, top, capped, n = sums
        self.mismatch_abs += abs_sum
        self.mismatch_max = max(self.mismatch_max, top)
        self.tis_capped += capped
        self.mismatch_tokens += n

    def reduced(self, allreduce: Callable[..., list[float]]) -> "StepStats":
        """The same stats with every sum taken over all ranks (one collective call), and the
        largest mismatch over all ranks (``allreduce(values, "max")``)."""
        top = allreduce([self.mismatch_max], "max")[0]
        return dataclasses.replace(self, mismatch_max=top, **dict(zip(SUMS, allreduce(
            [getattr(self, k) for k in SUMS]))))

    def to_metrics(self, *, step: int, policy_version: int, lr: float, epochs: int,
                   elapsed: float, world_size: int, with_kl: bool, tis: bool = False) -> dict:
        n = max(self.optimizer_steps, 1)
        ntok = max(self.tokens, 1.0)
        norms = self.grad_norms
        m = {
            "step": step,
            "policy_version": policy_version,
            "loss": self.loss / n,
            "pg_loss": self.pg_loss / n,
            "clip_frac": self.clipped / ntok,
            "dual_clip_frac": self.dual_clipped / ntok,
            "entropy": self.entropy / ntok,
            "approx_kl": self.approx_kl / ntok,
            "grad_norm": float(np.mean(norms)) if norms else 0.0,
            "grad_norm_max": float(np.max(norms)) if norms else 0.0,
            "lr": lr,
            "num_tokens": int(round(self.tokens / epochs)),
            "num_sequences": int(round(self.seqs / epochs)),
            "model_tokens": int(round(self.model_tokens / epochs)),
            "padding_share": 1.0 - self.real_tokens / self.model_tokens if self.model_tokens
            else 0.0,
            "optimizer_steps": self.optimizer_steps - self.skipped,
            "skipped_steps": self.skipped,
            "tokens_per_s": self.tokens / elapsed if elapsed > 0 else 0.0,
            "time_s": elapsed,
            "world_size": world_size,
            "truncated_share": self.truncated / max(self.responses, 1),
            **self._mismatch(tis),
        }
        if with_kl:
            m["kl"] = self.kl / ntok
        return m

    def _mismatch(self, tis: bool) -> dict:
        """Mean |log pi_train_old - log pi_sampler|, the largest ratio, and (TIS) the capped share."""
        n = max(self.mismatch_tokens, 1.0)
        m = {"mismatch_abs_logp": self.mismatch_abs / n,
             "mismatch_ratio_max": math.exp(self.mismatch_max) if self.mismatch_tokens else 1.0}
        if tis:
            m["tis_capped_frac"] = self.tis_capped / n
        return m
