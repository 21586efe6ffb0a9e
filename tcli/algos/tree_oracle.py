"""Slow, obviously right versions of the P2T tree's parts, for the tests and the benchmark: the
G x G longest-common-prefix matrix and the dict-trie that ``build_prefix_tree`` must equal."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from tcli.algos.tree import PrefixTree, sort_responses


def lcp_matrix(seqs: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
    """G x G longest-common-prefix lengths (diagonal = own length) and the lengths.

    O(G^2) memory: for tests and small groups only; ``build_prefix_tree`` never builds it.
    """
    lens = np.array([len(s) for s in seqs], dtype=np.int64)
    g = len(seqs)
    if not g:
        return np.zeros((0, 0), dtype=np.int64), lens
    order, adj = sort_responses(seqs, lens)
    m = np.full((g, g), np.iinfo(np.int64).max, dtype=np.int64)
    for p in range(g - 1):  # row p, column q > p: min(adj[p:q])
        m[p, p + 1 :] = np.minimum.accumulate(adj[p:])
    m = np.triu(m, 1)
    m += m.T
    m[np.arange(g), np.arange(g)] = lens[order]
    inv = np.empty_like(order)
    inv[order] = np.arange(g)
    return m[np.ix_(inv, inv)], lens


def reference_prefix_tree(seqs: Sequence[Sequence[int]], rewards: Sequence[float]) -> PrefixTree:
    """The straightforward dict-trie, kept as the oracle for tests and the benchmark baseline."""
    root: dict = {"n": 0, "s": 0.0, "kids": {}, "ends": 0, "end_s": 0.0}
    for seq, rw in zip(seqs, rewards):
        node = root
        node["n"] += 1
        node["s"] += rw
        for tok in seq:
            node = node["kids"].setdefault(tok, {"n": 0, "s": 0.0, "kids": {}, "ends": 0, "end_s": 0.0})
            node["n"] += 1
            node["s"] += rw
        node["ends"] += 1
        node["end_s"] += rw
    values, branch = [], []
    for seq in seqs:
        node = root
        vs, bs = [], []
        for tok in seq:
            vs.append(node["s"] / node["n"])
            bs.append(len(node["kids"]) + (1 if node["ends"] else 0) >= 2)
            node = node["kids"][tok]
        vs.append(node["end_s"] / node["ends"])
        values.append(vs)
        branch.append(bs)
    return PrefixTree.from_lists(values, branch)
