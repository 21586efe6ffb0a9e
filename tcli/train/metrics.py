"""The metrics record of one train step: local sums per micro-batch, all-reduced once at the end."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

SUMS = ("loss", "pg_loss", "kl", "clipped", "dual_clipped", "entropy", "approx_kl", "tokens",
        "seqs", "model_tokens", "real_tokens")


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

    def reduced(self, allreduce: Callable[[list[float]], list[float]]) -> "StepStats":
        """The same stats with every sum taken over all ranks (one collective call)."""
        return dataclasses.replace(self, **dict(zip(SUMS, allreduce([getattr(self, k)
                                                                     for k in SUMS]))))

    def to_metrics(self, *, step: int, policy_version: int, lr: float, epochs: int,
                   elapsed: float, world_size: int, with_kl: bool) -> dict:
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
        }
        if with_kl:
            m["kl"] = self.kl / ntok
        return m
