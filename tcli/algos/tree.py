"""P2T: a group's responses as an exact prefix tree over token ids, built with numpy.

For response i and t = 0..T_i-1, ``values[i][t]`` is V(prefix of i before token t): the mean reward
of every response whose token ids begin with that prefix (leaf-count weighted, V(root) = mean r).
``values[i][T_i]`` is the value of i's own leaf: the mean reward of the responses identical to i
(so it equals r_i unless duplicates disagree). ``branch[i][t]`` says the node before token t has
two or more children (different next tokens, or some response ends there).

How it is vectorised: write the group's token ids into one G x (T+1) matrix (one C call per row),
sort the rows as raw bytes so responses sharing a prefix become neighbours, take the longest common
prefix (LCP) of neighbours with one comparison, turn it into the G x G LCP matrix with a running
minimum, and expand each response's G-piece step function of V with np.repeat. No Python loop
touches tokens; the dict-trie ``reference_prefix_tree`` is the oracle the tests compare against.
"""

from __future__ import annotations

import struct
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


def _token_matrix(seqs: Sequence[Sequence[int]], lens: list[int]) -> np.ndarray:
    """G x (max T + 1) unsigned matrix of the token ids; every row is closed and padded with END.

    END (the dtype's max) is not a token id, so two distinct rows always differ at or before the end
    of the shorter one. Python lists go in through ``struct.pack_into`` (one C call per row that
    also rejects negative, too large and non-integer ids); numpy rows are range-checked and copied.
    uint32 keys halve the memory traffic; ids that do not fit fall back to uint64.
    """
    for dtype, code in ((np.uint32, "I"), (np.uint64, "Q")):
        end = np.iinfo(dtype).max
        mat = np.zeros((len(seqs), max(lens) + 1), dtype=dtype)
        step = mat.strides[0]
        hi = 0
        try:
            for i, (s, n) in enumerate(zip(seqs, lens)):
                if not n:
                    continue
                if isinstance(s, np.ndarray):
                    if s.ndim != 1 or s.dtype.kind not in "iu":
                        raise TypeError(f"token ids must be a flat integer array, got {s.dtype} "
                                        f"with {s.ndim} dimensions")
                    if s.min() < 0:
                        raise ValueError(f"token ids must be non-negative, got {int(s.min())}")
                    hi = max(hi, int(s.max()))
                    if hi < end:
                        mat[i, :n] = s
                else:
                    struct.pack_into(f"={n}{code}", mat, i * step, *s)
        except struct.error as e:
            if code == "Q":
                raise ValueError(f"token ids must be integers in [0, 2**64 - 1): {e}") from None
            continue
        if hi >= end or mat.max() == end:
            if code == "Q":
                raise ValueError("token ids must be below 2**64 - 1")
            continue
        for row, n in zip(mat, lens):
            row[n:] = end
        return mat
    raise AssertionError("unreachable")


_UPPER: dict[int, np.ndarray] = {}  # cached strict upper-triangle masks, one per group size
_BIG = np.iinfo(np.int64).max


def _sorted_lcp(seqs: Sequence[Sequence[int]], lens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Lexicographic order of the responses and their G x G LCP matrix in that order.

    Sorting rows as raw bytes (void keys) puts responses that share a prefix next to each other
    (any fixed total order on token ids does, so native byte order is fine); then LCP(p, q) for
    p < q in sorted order is the minimum of the neighbours' LCPs between them.
    """
    g = len(seqs)
    mat = _token_matrix(seqs, lens.tolist())
    order = np.argsort(mat.view(np.dtype((np.void, mat.strides[0]))).ravel(), kind="stable")
    slens = lens[order]
    if g == 1:
        return order, slens.reshape(1, 1).copy()
    s = mat[order]
    neq = s[1:] != s[:-1]
    first = neq.argmax(axis=1)  # rows end with END, so distinct rows differ at or before min length
    adj = np.where(neq[np.arange(g - 1), first], first, slens[1:])  # all-equal: identical responses
    upper = _UPPER.get(g)
    if upper is None:
        upper = np.triu(np.ones((g, g), dtype=bool), 1)
        upper.flags.writeable = False
        upper = _UPPER.setdefault(g, upper)
    m = np.where(upper, np.concatenate(([0], adj)), _BIG)  # row p, column q > p: adj[q - 1]
    np.minimum.accumulate(m, axis=1, out=m)                 # -> min(adj[p:q])
    m *= upper
    m += m.T
    m.ravel()[:: g + 1] = slens
    return order, m


def lcp_matrix(seqs: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
    """G x G longest-common-prefix lengths (diagonal = own length) and the lengths."""
    lens = np.array([len(s) for s in seqs], dtype=np.int64)
    if not len(seqs):
        return np.zeros((0, 0), dtype=np.int64), lens
    order, m = _sorted_lcp(seqs, lens)
    inv = np.empty_like(order)
    inv[order] = np.arange(len(order))
    return m[np.ix_(inv, inv)], lens


def build_prefix_tree(seqs: Sequence[Sequence[int]], rewards: Sequence[float]) -> PrefixTree:
    """The group's P2T values and branch flags; ``seqs`` are lists or integer arrays of token ids."""
    g = len(seqs)
    r = np.asarray(rewards, dtype=np.float64)
    if r.shape != (g,):
        raise ValueError(f"{g} sequences but {r.size} rewards")
    lens = np.array([len(s) for s in seqs], dtype=np.int64)
    ends = np.cumsum(lens + 1)
    starts = ends - (lens + 1)
    if g == 0:
        return PrefixTree(np.zeros(0), np.zeros(0, dtype=bool), starts, lens)
    order, lcp = _sorted_lcp(seqs, lens)  # both in sorted order from here on
    rs = r[order]
    slens = lens[order]
    inv = np.empty_like(order)
    inv[order] = np.arange(g)
    # Row p sorted ascending: a_0 <= ... <= a_{G-1} = T_p. For t in (a_{j-1}, a_j] the responses
    # sharing p's first t tokens are exactly those in columns j..G-1, so V is a step function with
    # G pieces per response; np.repeat expands all pieces of the group at once.
    col = np.argsort(lcp, axis=1, kind="stable")
    a = np.take_along_axis(lcp, col, axis=1)
    piece_v = np.cumsum(rs[col][:, ::-1], axis=1)[:, ::-1] / np.arange(g, 0, -1)
    piece_len = np.diff(a, axis=1, prepend=-1)
    flat_v = np.repeat(piece_v[inv].ravel(), piece_len[inv].ravel())
    # own leaf: the mean reward of the responses identical to this one (neighbours in sorted order)
    dup = (lcp.ravel()[1 :: g + 1] == slens[1:]) & (slens[1:] == slens[:-1])
    if dup.any():
        run = np.concatenate(([0], np.cumsum(~dup)))
        leaf = (np.bincount(run, weights=rs) / np.bincount(run))[run]
        flat_v[ends[order] - 1] = leaf
    else:
        flat_v[ends - 1] = r
    # a branch at t < T_p: some other response leaves p's path right after t tokens
    flat_b = np.zeros(int(ends[-1]), dtype=bool)
    flat_b[(starts[order][:, None] + lcp)[lcp < slens[:, None]]] = True
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
