"""Advantage estimators (docs/design.md §4), registered by name.

An estimator maps one prompt's group to an :class:`Advantages` result: one float64 array per
response (one value per response token). Every estimator is vectorised over the group; the only
Python loops run over responses or tree nodes, never over tokens.

Huge rewards: a group whose rewards exceed 1e100 in magnitude is computed on rewards divided by a
power of two (exact), so sums and squares cannot overflow; an advantage that is still not finite
(``dr_grpo`` of ±1e308) is a data error, never an ``inf`` in the output.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Callable

import numpy as np

from tcli.algos.gae import gae as gae_one
from tcli.algos.masks import any_masked, policy_td, zero_environment
from tcli.algos.tree import PrefixTree, build_prefix_tree
from tcli.errors import DataError
from tcli.records import (at_record, check_aligned, float_array, in_group, int_list, loss_mask,
                          reward, token_array)
from tcli.registry import Registry

EPS = 1e-6
HUGE = 1e100  # rewards beyond this are rescaled by a power of two before any arithmetic


@dataclass
class Group:
    """One prompt's responses, validated once: token arrays and finite rewards. The P2T tree is
    built on first use and shared by every consumer (estimator, metrics, build-tree)."""

    records: list[dict]
    tokens: list[np.ndarray]
    rewards: np.ndarray
    masks: list[np.ndarray | None] | None = None  # ``loss_mask`` per response (None: all policy)

    @classmethod
    def from_records(cls, recs: list[dict]) -> "Group":
        if not recs:
            raise DataError("empty group")
        tokens = in_group(token_array, recs)
        rewards = np.array(in_group(reward, recs), dtype=np.float64)
        masks = [None] * len(recs)
        for i, (rec, t) in enumerate(zip(recs, tokens)):
            with at_record(i):
                masks[i] = loss_mask(rec, len(t))
                check_aligned(rec, len(t))
        return cls(recs, tokens, rewards, masks if any_masked(masks) else None)

    @property
    def lens(self) -> np.ndarray:
        return np.fromiter((len(t) for t in self.tokens), dtype=np.int64, count=len(self.tokens))

    @cached_property
    def scale(self) -> float:
        """1, or a power of two that brings every |reward| below 2 (exact division)."""
        top = float(np.abs(self.rewards).max())
        return 1.0 if top <= HUGE else math.ldexp(1.0, math.frexp(top)[1] - 1)

    @cached_property
    def scaled_rewards(self) -> np.ndarray:
        return self.rewards / self.scale

    @cached_property
    def tree(self) -> PrefixTree:
        """The P2T prefix tree in units of ``scaled_rewards``."""
        return build_prefix_tree(self.tokens, self.scaled_rewards)

    @property
    def values(self) -> np.ndarray:
        """Flat V of every prefix (tree layout), in reward units."""
        return self.tree.flat_values * self.scale

    @property
    def all_equal(self) -> bool:
        """Rewards all equal (one response included): no group-relative signal, whatever the
        estimator. What ``zero_variance_share`` counts and the loop's refill and filter_groups
        call uninformative."""
        return len(set(self.rewards.tolist())) < 2

    def branch_tokens(self) -> int:
        """Branching policy tokens (a branch at a tool's output is the environment's, §3.6)."""
        if self.masks is None:
            return int(np.count_nonzero(self.tree.flat_branch))
        tree = self.tree
        return sum(int(np.count_nonzero(tree.branch_of(i) if m is None else tree.branch_of(i)[m]))
                   for i, m in enumerate(self.masks))

    def shaped(self, added: np.ndarray) -> "Group":
        """The group the estimator sees when shaping adds ``added`` to the rewards (itself when
        nothing is added; the records keep their ``reward``)."""
        if not added.any():
            return self
        return Group(self.records, self.tokens, self.rewards + added, self.masks)


@dataclass
class Advantages:
    """What an estimator returns: per-token advantages (and gae's value targets)."""

    per_token: list[np.ndarray]
    returns: list[np.ndarray] | None = None  # value targets (gae only)


@dataclass(frozen=True)
class Needs:
    """What an estimator reads besides the group's tokens and rewards; stages, the loop and its
    configuration ask the registry (``needs``) instead of keeping lists of names."""

    prefix_tree: bool = False   # the P2T tree (stored build-tree ``values`` must match it)
    tree_sampled: bool = False  # ``node_path``/``segment_ends``: groups sampled as trees
    critic: bool = False        # ``critic_values`` of a learned critic (the loop trains one)
    batch_stats: bool = False   # finished over the whole batch: whitened in the stage's last step
    reads: tuple[str, ...] = ()  # the advantage settings only some estimators read (set: refused)


@dataclass(frozen=True)
class Estimator:
    """A registered estimator: ``fn(group, opt)`` (``opt``: the advantage settings,
    ``AdvantageOptions``) and what it needs."""

    fn: Callable[[Group, Any], Advantages]
    needs: Needs

    def __call__(self, group: Group, opt) -> Advantages:
        return self.fn(group, opt)


ESTIMATORS: Registry[Estimator] = Registry("estimator")


def estimator(*names: str, **wants):
    """Register a function under ``names``, with what it needs (``Needs`` fields)."""
    def deco(fn):
        for name in names:
            ESTIMATORS.register(name)(Estimator(fn, Needs(**wants)))
        return fn

    return deco


def needs(name: str) -> Needs:
    """What the estimator ``name`` needs (UsageError naming the valid ones if unknown)."""
    return ESTIMATORS.get(name).needs


def group_std(r: np.ndarray, mode: str) -> float:
    """0 exactly when the values are all equal (np.std of equal floats can be ulps above 0, and
    that noise divided by sigma + eps would be an advantage of order 1 for large rewards)."""
    if len(r) < 2 or (r == r[0]).all():
        return 0.0
    return float(np.std(r, ddof=1 if mode == "unbiased" else 0))


def _per_token(group: Group, seq_adv: np.ndarray) -> Advantages:
    return Advantages([np.full(len(t), a, dtype=np.float64) for t, a in zip(group.tokens, seq_adv)])


def _no_signal(group: Group) -> Advantages:
    """G = 1 or sigma = 0: every advantage is exactly zero (never NaN)."""
    return _per_token(group, np.zeros_like(group.rewards))


def _sigma(group: Group, opt) -> float | None:
    """The scaled group std, or None when the group carries no signal."""
    sigma = group_std(group.scaled_rewards, opt.std)
    return None if len(group.rewards) < 2 or sigma == 0.0 else sigma


@estimator("grpo", reads=("std",))
def grpo(group: Group, opt) -> Advantages:
    """Group-normalised sequence reward, the same for every token."""
    r, sigma = group.scaled_rewards, _sigma(group, opt)
    if sigma is None:
        return _no_signal(group)
    return _per_token(group, (r - r.mean()) / (sigma + EPS / group.scale))


@estimator("dr_grpo")
def dr_grpo(group: Group, opt) -> Advantages:
    """GRPO without the std division (Dr. GRPO): r - mean."""
    r = group.scaled_rewards
    if _sigma(group, opt) is None:
        return _no_signal(group)
    return _per_token(group, (r - r.mean()) * group.scale)


@estimator("rloo")
def rloo(group: Group, opt) -> Advantages:
    """Leave-one-out baseline: r_i minus the mean of the other G-1 rewards."""
    r, g = group.scaled_rewards, len(group.rewards)
    if _sigma(group, opt) is None:
        return _no_signal(group)
    return _per_token(group, (r * g - r.sum()) / (g - 1) * group.scale)


@estimator("tempo", prefix_tree=True, reads=("std", "td_coef"))
def tempo(group: Group, opt) -> Advantages:
    """GRPO plus the temporal-difference correction delta = V(s_{t+1}) - V(s_t) from the P2T tree."""
    r, sigma = group.scaled_rewards, _sigma(group, opt)
    if sigma is None:
        return _no_signal(group)
    tree = group.tree
    flat_delta = np.diff(tree.flat_values, append=0.0)  # slot t of response i: V(t+1) - V(t)
    lens = tree.lens
    base = np.repeat(r - r.mean(), lens + 1)
    if group.masks is not None:  # environment spans: δ jumps to the next policy token (§3.6)
        for i, m in enumerate(group.masks):
            if m is not None:
                s, n = int(tree.starts[i]), int(lens[i])
                flat_delta[s : s + n] = policy_td(tree.values_of(i), m)
    flat_adv = (base + opt.td_coef * flat_delta) / (sigma + EPS / group.scale)
    return Advantages([flat_adv[s : s + n] for s, n in zip(tree.starts.tolist(), lens.tolist())])


# ----------------------------------------------------------------------------- REINFORCE++
# The group step only; the advantages stage then whitens over every token of the batch
# (``batch_stats``), so the statistics span all groups of a step, on all ranks
# (docs/design.md §4.14).

@estimator("reinforce_pp", batch_stats=True)
def reinforce_pp(group: Group, opt) -> Advantages:
    """REINFORCE++: the reward itself; the batch mean is its only baseline."""
    return _per_token(group, group.rewards.copy())


@estimator("reinforce_pp_baseline", batch_stats=True)
def reinforce_pp_baseline(group: Group, opt) -> Advantages:
    """REINFORCE++-baseline: r - group mean (no std division), then the batch whitening."""
    r = group.scaled_rewards
    if _sigma(group, opt) is None:  # equal rewards: r - mean could be ulps, never exactly 0
        return _no_signal(group)
    return _per_token(group, (r - r.mean()) * group.scale)


# ----------------------------------------------------------------------------- TreeRPO

def _tree_paths(group: Group) -> tuple[list[tuple[int, ...]], list[np.ndarray]]:
    paths, seg_ends = [], []
    for i, rec in enumerate(group.records):
        with at_record(i):
            path = tuple(int_list(rec, "node_path"))
            ends = int_list(rec, "segment_ends")
            if len(ends) != len(path):
                raise DataError(f"has {len(ends)} entries but node_path has {len(path)}",
                                field="segment_ends")
            n = len(group.tokens[i])
            if path and (any(b <= a for a, b in zip(ends, ends[1:])) or ends[-1] != n or ends[0] < 0):
                raise DataError(f"must be increasing and end at len(token_ids) = {n}",
                                field="segment_ends")
        paths.append(path)
        seg_ends.append(np.asarray(ends, dtype=np.int64))
    if not any(paths):
        raise DataError("treerpo needs tree-sampled records (node_path is empty); "
                        "sample with `tcli sample-tree --mode tree`", field="node_path")
    return paths, seg_ends


@estimator("treerpo", tree_sampled=True, reads=("std", "norm", "prune_std"))
def treerpo(group: Group, opt) -> Advantages:
    """Step-level advantages: V(node) = mean of its children's V, normalised among siblings."""
    paths, seg_ends = _tree_paths(group)
    value, children = _node_values(group, paths)
    adv = _sibling_advantages(value, children, opt, group.scale)
    out = []
    for path, ends in zip(paths, seg_ends):
        seg_adv = np.array([adv[path[: d + 1]] for d in range(len(path))])
        out.append(np.repeat(seg_adv, np.diff(ends, prepend=0)))
    return Advantages(out)


def _node_values(group: Group, paths):
    """V(leaf) = its scaled reward, V(node) = mean of its children's V; and each node's children."""
    value: dict[tuple[int, ...], float] = {}
    children: dict[tuple[int, ...], list[tuple[int, ...]]] = {}
    for i, (path, rw) in enumerate(zip(paths, group.scaled_rewards)):
        if path in value:
            with at_record(i):
                raise DataError(f"two responses share the leaf node_path {list(path)}",
                                field="node_path")
        value[path] = float(rw)
        for d in range(1, len(path) + 1):
            node, parent = path[:d], path[: d - 1]
            kids = children.setdefault(parent, [])
            if node not in kids:
                kids.append(node)
    for i, path in enumerate(paths):
        if path in children:
            with at_record(i):
                raise DataError(f"node_path {list(path)} is a leaf and also has children",
                                field="node_path")
    for node in sorted(children, key=len, reverse=True):  # bottom-up over nodes, not tokens
        value[node] = float(np.mean([value[c] for c in children[node]]))
    return value, children


def _sibling_advantages(value, children, opt, scale: float):
    """Each sibling group normalised on its own; groups without spread (or below prune_std) get 0."""
    adv: dict[tuple[int, ...], float] = {}
    for parent, kids in children.items():
        v = np.array([value[c] for c in kids])
        sd = group_std(v, opt.std)
        if len(v) < 2 or sd == 0.0 or sd * scale < opt.prune_std:
            a = np.zeros_like(v)
        elif opt.norm == "std":
            a = (v - v.mean()) / (sd + EPS / scale)
        else:
            a = (v - v.mean()) * scale
        adv.update(zip(kids, a.tolist()))
    return adv


# ----------------------------------------------------------------------------- PPO

@estimator("gae", "ppo", critic=True, reads=("gamma", "lam"))
def gae(group: Group, opt) -> Advantages:
    """GAE(gamma, lam) over a learned critic's ``critic_values`` (``tcli values``); writes
    ``returns`` for ``train-critic``. Rewards are used as they are (no group normalisation).
    ``ppo`` is the same estimator; in ``tcli loop`` either name also trains the critic."""
    adv, ret = [], []
    for i, (rec, toks, r) in enumerate(zip(group.records, group.tokens, group.rewards)):
        with at_record(i):
            if "critic_values" not in rec:
                raise DataError("is missing; gae/ppo need a critic's values: run `tcli values "
                                "--critic DIR` first", field="critic_values")
            v = float_array(rec, "critic_values", len(toks) + 1)
            a, g = gae_one(float(r), v, opt.gamma, opt.lam,
                           None if group.masks is None else group.masks[i])
            if not (np.isfinite(a).all() and np.isfinite(g).all()):
                raise DataError("too large: gae advantages overflow (rescale the values)",
                                field="critic_values" if np.abs(v).max() > abs(r) else "reward")
        adv.append(a)
        ret.append(g)
    return Advantages(adv, ret)


def compute_advantages(group: Group, name: str, opt) -> Advantages:
    """Run the named estimator; an advantage that overflowed is a data error naming the reward."""
    with np.errstate(over="ignore", invalid="ignore"):  # checked below, not warned about
        out = ESTIMATORS.get(name)(group, opt)
    if group.masks is not None:  # no advantage on environment tokens, whatever the estimator
        zero_environment(out.per_token, group.masks)
    for a in out.per_token + (out.returns or []):
        if not np.isfinite(a).all():
            raise DataError(f"rewards of this group are too large: {name} advantages overflow "
                            "(rescale the rewards)", field="reward")
    return out
