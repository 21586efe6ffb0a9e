"""The advantages stage: per-token advantages for a group of records, and their running summary."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from tcli import SCHEMA
from tcli.algos.estimators import EstimatorOptions, Group, compute_advantages


@dataclass
class AdvantageStats:
    """Running summary for ``advantages --stats`` and the loop's metrics."""

    groups: int = 0
    zero_variance_groups: int = 0
    tokens: int = 0
    branch_tokens: int = 0
    abs_adv_sum: float = 0.0
    responses: int = 0
    reward_sum: float = 0.0
    per_group: list = field(default_factory=list, repr=False)

    def add(self, group: Group, adv: list[np.ndarray]) -> None:
        self.groups += 1
        self.zero_variance_groups += bool(group.stats.get("zero_variance"))
        n = int(sum(len(a) for a in adv))
        self.tokens += n
        self.branch_tokens += int(group.stats.get("branch_tokens", _count_branch(group)))
        self.abs_adv_sum += float(sum(np.abs(a).sum() for a in adv))
        self.responses += len(adv)
        self.reward_sum += float(group.rewards.sum())

    def summary(self) -> dict:
        return {
            "groups": self.groups,
            "responses": self.responses,
            "tokens": self.tokens,
            "reward_mean": self.reward_sum / max(self.responses, 1),
            "zero_variance_share": self.zero_variance_groups / max(self.groups, 1),
            "branch_token_share": self.branch_tokens / max(self.tokens, 1),
            "mean_abs_advantage": self.abs_adv_sum / max(self.tokens, 1),
        }

    def render(self, estimator: str):
        from rich.table import Table

        t = Table(title=f"advantages ({estimator})", show_header=False)
        for k, v in self.summary().items():
            t.add_row(k, f"{v:.4f}" if isinstance(v, float) else str(v))
        return t


def _count_branch(group: Group) -> int:
    """Branching tokens from build-tree's ``branch`` field when present (else 0)."""
    return int(sum(np.count_nonzero(r.get("branch") or []) for r in group.records))


def advantages_group(recs: list[dict], estimator: str, opt: EstimatorOptions,
                     stats: AdvantageStats | None = None) -> list[dict]:
    adv, group = compute_advantages(recs, estimator, opt)
    if stats is not None:
        stats.add(group, adv)
    for rec, a in zip(recs, adv):
        rec["advantages"] = a.tolist()
        rec["estimator"] = estimator
        rec["schema"] = SCHEMA
    return recs
