"""Advantage estimators (DESIGN §4), registered by name.

An estimator maps one prompt's group to one float64 array per response (one value per response
token). Every estimator is vectorised over the group; the only Python loops run over responses or
tree nodes, never over tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from tcli.errors import DataError
from tcli.records import at_record, float_array, in_group, int_list, reward, token_array
from tcli.registry import Registry

EPS = 1e-6


@dataclass
class EstimatorOptions:
    std: str = "unbiased"        # unbiased (G-1) | population (G)
    td_coef: float = 1.0         # TEMPO's lambda
    norm: str = "std"            # TreeRPO: std | mean
    prune_std: float = 0.0       # TreeRPO: sibling groups with std below this get 0
    eps: float = EPS


@dataclass
class Group:
    """One prompt's responses, validated: token arrays and finite rewards."""

    records: list[dict]
    tokens: list[np.ndarray]
    rewards: np.ndarray
    stats: dict = field(default_factory=dict)  # filled by estimators for --stats

    @classmethod
    def from_records(cls, recs: list[dict]) -> "Group":
        if not recs:
            raise DataError("empty group")
        tokens = in_group(token_array, recs)
        rewards = np.array(in_group(reward, recs), dtype=np.float64)
        return cls(recs, tokens, rewards)

    @property
    def lens(self) -> np.ndarray:
        return np.fromiter((len(t) for t in self.tokens), dtype=np.int64, count=len(self.tokens))


Estimator = Callable[[Group, EstimatorOptions], list[np.ndarray]]
ESTIMATORS: Registry[Estimator] = Registry("estimator")


def group_std(r: np.ndarray, mode: str) -> float:
    if mode not in ("unbiased", "population"):
        raise ValueError(f"std must be unbiased or population, got {mode!r}")
    if len(r) < 2:
        return 0.0
    return float(np.std(r, ddof=1 if mode == "unbiased" else 0))


def _per_token(group: Group, seq_adv: np.ndarray) -> list[np.ndarray]:
    return [np.full(len(t), a, dtype=np.float64) for t, a in zip(group.tokens, seq_adv)]


def _degenerate(group: Group, sigma: float) -> bool:
    """G = 1 or sigma = 0: no signal, all advantages are exactly zero (never NaN)."""
    zero = len(group.rewards) < 2 or sigma == 0.0
    group.stats["zero_variance"] = zero
    return zero


@ESTIMATORS.register("grpo")
def grpo(group: Group, opt: EstimatorOptions) -> list[np.ndarray]:
    """Group-normalised sequence reward, the same for every token."""
    r = group.rewards
    sigma = group_std(r, opt.std)
    if _degenerate(group, sigma):
        return _per_token(group, np.zeros_like(r))
    return _per_token(group, (r - r.mean()) / (sigma + opt.eps))


@ESTIMATORS.register("dr_grpo")
def dr_grpo(group: Group, opt: EstimatorOptions) -> list[np.ndarray]:
    """GRPO without the std division (Dr. GRPO): r - mean."""
    r = group.rewards
    if _degenerate(group, group_std(r, opt.std)):
        return _per_token(group, np.zeros_like(r))
    return _per_token(group, r - r.mean())


@ESTIMATORS.register("rloo")
def rloo(group: Group, opt: EstimatorOptions) -> list[np.ndarray]:
    """Leave-one-out baseline: r_i minus the mean of the other G-1 rewards."""
    r = group.rewards
    g = len(r)
    if _degenerate(group, group_std(r, opt.std)):
        return _per_token(group, np.zeros_like(r))
    return _per_token(group, (r * g - r.sum()) / (g - 1))


def prefix_tree_of(group: Group):
    """The P2T tree: taken from ``values`` written by build-tree when present, else built here."""
    from tcli.algos.tree import PrefixTree, build_prefix_tree

    if all("values" in rec for rec in group.records):
        vals = []
        for i, (rec, t) in enumerate(zip(group.records, group.tokens)):
            with at_record(i):
                vals.append(float_array(rec, "values", len(t) + 1))
        return PrefixTree.from_lists(vals, [np.zeros(len(t), dtype=bool) for t in group.tokens])
    return build_prefix_tree(group.tokens, group.rewards)


@ESTIMATORS.register("tempo")
def tempo(group: Group, opt: EstimatorOptions) -> list[np.ndarray]:
    """GRPO plus the temporal-difference correction delta = V(s_{t+1}) - V(s_t) from the P2T tree."""
    r = group.rewards
    sigma = group_std(r, opt.std)
    if _degenerate(group, sigma):
        return _per_token(group, np.zeros_like(r))
    tree = prefix_tree_of(group)
    flat_delta = np.diff(tree.flat_values, append=0.0)  # slot t of response i: V(t+1) - V(t)
    lens = tree.lens
    base = np.repeat(r - r.mean(), lens + 1)
    flat_adv = (base + opt.td_coef * flat_delta) / (sigma + opt.eps)
    if tree.from_build:  # the leaf slot after each response is never flagged
        group.stats["branch_tokens"] = int(np.count_nonzero(tree.flat_branch))
    return [flat_adv[s : s + n] for s, n in zip(tree.starts.tolist(), lens.tolist())]


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


@ESTIMATORS.register("treerpo")
def treerpo(group: Group, opt: EstimatorOptions) -> list[np.ndarray]:
    """Step-level advantages: V(node) = mean of its children's V, normalised among siblings."""
    if opt.norm not in ("std", "mean"):
        raise ValueError(f"norm must be std or mean, got {opt.norm!r}")
    paths, seg_ends = _tree_paths(group)
    value: dict[tuple[int, ...], float] = {}
    children: dict[tuple[int, ...], list[tuple[int, ...]]] = {}
    for i, (path, rw) in enumerate(zip(paths, group.rewards)):
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
    adv: dict[tuple[int, ...], float] = {}
    zero_groups = 0
    for parent, kids in children.items():
        v = np.array([value[c] for c in kids])
        sd = group_std(v, opt.std)
        if len(v) < 2 or sd == 0.0 or sd < opt.prune_std:
            a = np.zeros_like(v)
            zero_groups += 1
        elif opt.norm == "std":
            a = (v - v.mean()) / (sd + opt.eps)
        else:
            a = v - v.mean()
        adv.update(zip(kids, a.tolist()))
    group.stats["zero_variance"] = zero_groups == len(children)
    out = []
    for path, ends in zip(paths, seg_ends):
        seg_adv = np.array([adv[path[: d + 1]] for d in range(len(path))])
        seg_len = np.diff(ends, prepend=0)
        out.append(np.repeat(seg_adv, seg_len))
    return out


def compute_advantages(recs: list[dict], name: str, opt: EstimatorOptions) -> tuple[list[np.ndarray], Group]:
    """Validate a group and run the named estimator on it."""
    fn = ESTIMATORS.get(name)
    group = Group.from_records(recs)
    return fn(group, opt), group


def estimator_names() -> Sequence[str]:
    return ESTIMATORS.names()
