"""The advantages stage: per-token advantages for a group of records, and their running summary.

``stage_group`` and ``stage_end`` are the stage as ``tcli advantages`` and ``tcli loop`` both run
it: group by group, then (``whiten``, REINFORCE++) once over every record kept: the whole input,
or the loop's step gathered from every rank."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from tcli import SCHEMA
from tcli.algos.estimators import HUGE, Advantages, Group, compute_advantages, needs
from tcli.algos.masks import policy_count
from tcli.algos.shaping import overlong_penalty
from tcli.errors import DataError
from tcli.records import at_record, float_array, loss_mask
from tcli.stages.tree import write_tree


@dataclass
class AdvantageStats:
    """Running summary for ``advantages --stats`` and the loop's metrics. With ``branch`` it
    also counts branching tokens (this builds the P2T tree for estimators that do not need it)."""

    branch: bool = True
    groups: int = 0
    zero_variance_groups: int = 0
    tokens: int = 0
    branch_tokens: int = 0
    abs_adv_sum: float = 0.0
    responses: int = 0
    reward_sum: float = 0.0

    def add(self, group: Group, result: Advantages) -> None:
        self.groups += 1
        self.zero_variance_groups += group.all_equal  # from the rewards, for every estimator
        self.tokens += policy_count(group.masks or [None] * len(result.per_token),
                                    [len(a) for a in result.per_token])  # policy tokens
        if self.branch:
            self.branch_tokens += group.branch_tokens()
        with np.errstate(over="ignore"):  # sums of rewards near 1e308 are inf, not a warning
            self.abs_adv_sum += float(sum(np.abs(a).sum() for a in result.per_token))
            self.reward_sum += float(group.rewards.sum())
        self.responses += len(result.per_token)

    def summary(self) -> dict:
        out = {
            "groups": self.groups,
            "responses": self.responses,
            "tokens": self.tokens,
            "reward_mean": self.reward_sum / max(self.responses, 1),
            "zero_variance_share": self.zero_variance_groups / max(self.groups, 1),
            "mean_abs_advantage": self.abs_adv_sum / max(self.tokens, 1),
        }
        if self.branch:
            out["branch_token_share"] = self.branch_tokens / max(self.tokens, 1)
        return out

    def render(self, estimator: str):
        from rich.table import Table

        t = Table(title=f"advantages ({estimator})", show_header=False)
        for k, v in self.summary().items():
            t.add_row(k, f"{v:.4f}" if isinstance(v, float) else str(v))
        return t


def check_stored_values(group: Group) -> None:
    """``values`` from an earlier build-tree must match this group's tokens and rewards: a verify
    re-run since then would otherwise pair old values with new rewards. Mismatch: exit 65."""
    if not all("values" in rec for rec in group.records):
        return
    tree, values = group.tree, group.values
    for i, (rec, s, n) in enumerate(zip(group.records, tree.starts.tolist(), tree.lens.tolist())):
        with at_record(i):
            stored = float_array(rec, "values", n + 1)
            if not np.allclose(stored, values[s : s + n + 1], rtol=1e-9, atol=1e-12):
                raise DataError("is stale: it does not match the prefix tree of this group's "
                                "token_ids and rewards (rewards changed after build-tree?); "
                                "re-run build-tree or drop the field", field="values")


def advantages_group(group: Group, opt, stats: AdvantageStats | None = None) -> list[dict]:
    """Add ``advantages`` and ``estimator`` to the group's records (``opt``: AdvantageOptions);
    with ``overlong_buffer`` the estimator sees the shaped rewards, and the records get
    ``overlong_penalty``. Stored ``values`` and ``stats`` stay those of the recorded rewards."""
    if needs(opt.estimator).prefix_tree:
        check_stored_values(group)
    penalty = overlong_penalty(group.records, group.lens, opt.overlong_buffer,
                               opt.overlong_penalty)
    result = compute_advantages(group.shaped(penalty), opt.estimator, opt)
    if stats is not None:
        stats.add(group, result)
    returns = result.returns or [None] * len(result.per_token)
    for rec, a, g, p in zip(group.records, result.per_token, returns, penalty.tolist()):
        rec["advantages"] = a.tolist()
        if g is not None:
            rec["returns"] = g.tolist()
        if opt.overlong_buffer:
            rec["overlong_penalty"] = p
        rec["estimator"] = opt.estimator
        rec["schema"] = SCHEMA
    return group.records


def whiten(records: list[dict]) -> list[dict]:
    """Advantages shifted and scaled to mean 0 and std 1 over every policy token of ``records``
    (environment tokens stay 0 and count nowhere, docs/design.md §3.6; PPO's
    batch whitening, REINFORCE++'s batch normalisation); ``returns`` keep the reward scale, they
    are the critic's targets. Huge values are divided by a power of two first (exact), so the
    mean and the squares cannot overflow."""
    if not records:
        return records
    masks = [loss_mask(r, len(r["advantages"])) for r in records]
    arrays = [np.asarray(r["advantages"], dtype=np.float64) for r in records]
    flat = np.concatenate([a if m is None else a[m] for a, m in zip(arrays, masks)])
    if flat.size == 0:
        return records
    top = float(np.abs(flat).max())  # advantages near 1e308: statistics of a / 2**k (exact)
    scale = 1.0 if top <= HUGE else math.ldexp(1.0, math.frexp(top)[1] - 1)
    flat /= scale
    mean, std = float(flat.mean()), float(flat.std())
    for rec, a, m in zip(records, arrays, masks):
        a = a / scale
        a = (a - mean) / (std + 1e-8 / scale)
        if m is not None:
            a[~m] = 0.0  # environment tokens: no advantage, outside the statistics (§3.6)
        rec["advantages"] = a.tolist()
    return records


def batch_wide(opt) -> bool:
    """Does the stage need every record before it writes one (``whiten``, or an estimator whose
    statistics span the batch)?"""
    return opt.whiten or needs(opt.estimator).batch_stats


def stage_group(recs: list[dict], opt, stats: AdvantageStats | None = None, *,
                tree: bool = False) -> Group:
    """The stage on one group of records (validated here): their advantages in place, counted
    in ``stats``; ``tree`` also writes build-tree's ``values`` and ``branch`` (for show-tree)."""
    group = Group.from_records(recs)
    advantages_group(group, opt, stats)
    if tree:
        write_tree(group)
    return group


def stage_end(records: list[dict], opt, stats: AdvantageStats | None = None) -> list[dict]:
    """The stage's last step over all the records kept: whitening when ``whiten`` asks or the
    estimator's statistics span the batch (REINFORCE++). ``stats`` then reports the mean |A| of
    the whitened advantages (tokens of groups not in ``records`` count as 0)."""
    if not batch_wide(opt):
        return records
    whiten(records)
    if stats is not None:
        stats.abs_adv_sum = float(sum(np.abs(r["advantages"]).sum() for r in records))
    return records
