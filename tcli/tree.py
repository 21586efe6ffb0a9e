"""P2T: a group's responses as an exact prefix tree over token ids, built with numpy.

For response i and t = 0..T_i-1, ``values[i][t]`` is V(prefix of i before token t): the mean reward
of every response whose token ids begin with that prefix (leaf-count weighted, V(root) = mean r).
``values[i][T_i]`` is the value of i's own leaf: the mean reward of the responses identical to i
(so it equals r_i unless duplicates disagree). ``branch[i][t]`` says the node before token t has
two or more children (different next tokens, or some response ends there).

How it is vectorised: sort the group's sequences (memcmp order of big-endian token bytes), take the
longest common prefix (LCP) of neighbours with one numpy comparison, turn it into the G x G LCP
matrix with a running minimum, then count, for every prefix length, how many responses share it with
a reverse cumulative sum over a G x (T+1) histogram. No Python loop touches tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np


@dataclass
class PrefixTree:
    """Flat arrays for the whole group; ``values_of(i)`` / ``branch_of(i)`` give one response."""

    flat_values: np.ndarray    # float64[sum(T_i + 1)]
    flat_branch: np.ndarray    # bool[sum(T_i + 1)]; the slot after each response's last token is unused
    starts: np.ndarray         # int64[G], offset of response i in the flat arrays
    lens: np.ndarray           # int64[G], T_i
    from_build: bool = True    # False when rebuilt from stored ``values`` (no branch information)

    def values_of(self, i: int) -> np.ndarray:
        s = int(self.starts[i])
        return self.flat_values[s : s + int(self.lens[i]) + 1]

    def branch_of(self, i: int) -> np.ndarray:
        s = int(self.starts[i])
        return self.flat_branch[s : s + int(self.lens[i])]

    @property
    def values(self) -> list[np.ndarray]:
        return [self.values_of(i) for i in range(len(self.lens))]

    @property
    def branch(self) -> list[np.ndarray]:
        return [self.branch_of(i) for i in range(len(self.lens))]

    @classmethod
    def from_lists(cls, values: list, branch: list) -> "PrefixTree":
        lens = np.array([len(b) for b in branch], dtype=np.int64)
        starts = np.concatenate([[0], np.cumsum(lens + 1)[:-1]]).astype(np.int64)
        fv = np.concatenate([np.asarray(v, dtype=np.float64) for v in values]) if values else np.zeros(0)
        fb = np.concatenate([np.append(np.asarray(b, dtype=bool), False) for b in branch]) \
            if branch else np.zeros(0, dtype=bool)
        return cls(fv, fb, starts, lens, from_build=False)


def _padded(seqs: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
    lens = np.fromiter((len(s) for s in seqs), dtype=np.int64, count=len(seqs))
    width = int(lens.max()) if len(seqs) else 0
    mat = np.zeros((len(seqs), max(width, 1)), dtype=np.int64)  # 0 = padding
    if width:
        flat = np.concatenate([np.asarray(s, dtype=np.int64) for s in seqs])
        mat[np.arange(mat.shape[1])[None, :] < lens[:, None]] = flat + 1
    return mat, lens


def lcp_matrix(seqs: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
    """G x G longest-common-prefix lengths (diagonal = own length) and the lengths."""
    g = len(seqs)
    mat, lens = _padded(seqs)
    if g == 1:
        return lens.reshape(1, 1).copy(), lens
    if mat.max(initial=0) >= 2**32:
        raise ValueError("token id too large")
    # big-endian uint32 bytes compare like the token sequence; padding 0 sorts before any token
    keys = mat.astype(">u4").view(np.dtype((np.void, 4 * mat.shape[1]))).ravel()
    order = np.argsort(keys, kind="stable")
    s = mat[order]
    diff = s[1:] != s[:-1]
    first = np.where(diff.any(axis=1), diff.argmax(axis=1), s.shape[1])
    adj = np.minimum(first, np.minimum(lens[order][1:], lens[order][:-1]))  # LCP of neighbours
    # LCP(p, q) for p < q in sorted order = min(adj[p:q])
    big = np.iinfo(np.int64).max
    idx = np.arange(g)
    a = np.where(idx[None, :] > idx[:, None], np.concatenate([[big], adj])[None, :], big)
    a = np.minimum.accumulate(a, axis=1)
    a = np.where(idx[None, :] > idx[:, None], a, 0)
    a = a + a.T
    a[idx, idx] = lens[order]
    lcp = np.empty_like(a)
    lcp[np.ix_(order, order)] = a
    return lcp, lens


def build_prefix_tree(seqs: Sequence[Sequence[int]], rewards: Sequence[float]) -> PrefixTree:
    g = len(seqs)
    r = np.asarray(rewards, dtype=np.float64)
    if g == 0:
        return PrefixTree(np.zeros(0), np.zeros(0, dtype=bool), np.zeros(0, np.int64), np.zeros(0, np.int64))
    lcp, lens = lcp_matrix(seqs)
    # Row i sorted ascending: a_0 <= ... <= a_{G-1} = T_i. For t in (a_{j-1}, a_j] the responses
    # sharing i's first t tokens are exactly those at sorted positions j..G-1, so V is a step
    # function with G pieces per response; np.repeat expands all pieces of the group at once.
    order = np.argsort(lcp, axis=1, kind="stable")
    a = np.take_along_axis(lcp, order, axis=1)
    rs = r[order]
    suffix_sum = np.cumsum(rs[:, ::-1], axis=1)[:, ::-1]
    piece_v = suffix_sum / (g - np.arange(g))[None, :]
    piece_len = np.diff(a, axis=1, prepend=-1)
    flat_v = np.repeat(piece_v.ravel(), piece_len.ravel())
    ends = np.cumsum(lens + 1)
    starts = ends - (lens + 1)
    same = (lcp == lens[:, None]) & (lens[None, :] == lens[:, None])  # identical responses
    flat_v[ends - 1] = (same * r[None, :]).sum(axis=1) / same.sum(axis=1)  # own leaf
    # a branch at t < T_i: some other response leaves i's path right after t tokens
    flat_b = np.zeros(int(ends[-1]), dtype=bool)
    off = starts[:, None] + lcp
    flat_b[off[lcp < lens[:, None]]] = True
    return PrefixTree(flat_v, flat_b, starts, lens)


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
