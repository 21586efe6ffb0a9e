"""P2T: a group's responses as an exact prefix tree over token ids, built with numpy.

For response i and t = 0..T_i-1, ``values[i][t]`` is V(prefix of i before token t): the mean reward
of every response whose token ids begin with that prefix (leaf-count weighted, V(root) = mean r).
``values[i][T_i]`` is the value of i's own leaf: the mean reward of the responses identical to i
(so it equals r_i unless duplicates disagree). ``branch[i][t]`` says the node before token t has
two or more children (different next tokens, or some response ends there).

How it is vectorised, in O(total tokens + G log G) time and memory (the build never makes a G x G
array; ``tree_oracle.lcp_matrix`` does, for tests):

1. Sort the responses lexicographically: rows of an END-padded token matrix compared as raw bytes
   (any fixed order on token ids will do), so responses sharing a prefix become neighbours, and
   take the longest common prefix ``adj[k]`` of sorted neighbours k, k + 1 with one comparison.
   When padding every row to the longest would take more than _PAD cells per token (one very
   long response among many short ones), the key holds only the first W tokens and each run of
   rows still tied after W tokens is ordered by the rest of its tokens (``_order_adj``; tied rows
   are longer than W, so each level of that recursion has at most 1/_PAD of the rows and costs
   O(tokens + G): at most log_4 G levels, and one in practice).
2. The responses sharing sorted response p's first t tokens form a contiguous range around p: the
   trie's nodes where responses part (and the ends shared by identical responses) are the LCP
   intervals of ``adj``, maximal ranges [l, r] whose neighbour LCPs are all >= d, d = their
   minimum = the node's depth. Their ends are the nearest smaller values of ``adj``: a Python
   stack walk for small groups, else binary lifting over a sparse table of range minima (log G
   numpy passes of length G). V of a node is the mean of the rewards l..r; its parent's depth is
   the larger LCP just outside the range (``_nodes``).
3. V along one response is a step function with a piece per node on its path: node u holds V(u)
   on the slots (parent's depth, d_u] of each of its responses, and below its deepest node a
   response is on its own (V = r). The nodes holding a response have distinct depths <= T, so
   all (response, node) pairs number at most tokens + G. Each pair gives where its piece starts
   in the flat output; the pieces are sorted and expanded with np.repeat when they are few
   (under 1/16 of the slots), else a running maximum over the slots carries each start forward.
   A pair with d_u < T also flags the branch at slot d_u, and each response's last slot gets its
   own leaf's value.

No Python loop touches tokens; the dict-trie ``reference_prefix_tree`` (tcli/algos/tree_oracle.py)
is the oracle the tests compare against.
"""

from __future__ import annotations

import array
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


# ----------------------------------------------------------------------------- sorting

_U32 = next(c for c in "IL" if array.array(c).itemsize == 4)  # array's code for uint32
_PAD = 4          # a sort key may hold up to _PAD cells per token (plus one per response) ...
_CELLS = 1 << 20  # ... or this many cells in all, whichever is larger


def _pack(seqs: Sequence[Sequence[int]], lens: list[int], offsets: Sequence[int], shape: tuple
          ) -> tuple[np.ndarray, int]:
    """An unsigned array of ``shape`` holding row i's token ids from flat offset ``offsets[i]``
    and END everywhere else; END is the dtype's max, which is not a token id. The rows are laid
    out in order: ``shape`` is (G, width) with offsets i * width, or (total,) with offsets the
    cumulative lengths.

    Python lists are appended to one ``array.array`` (``fromlist``: one C loop per row that also
    rejects negative, too large and non-integer ids); numpy rows are concatenated and range-checked
    in one go (per-row numpy calls cost microseconds, which adds up over thousands of rows). Each
    kind then goes into place row by row when its rows are few, else through one mask. uint32
    keys halve the memory traffic; ids that do not fit make the keys uint64.
    """
    arrays, lists = [], []
    for i, s in enumerate(seqs):
        if isinstance(s, np.ndarray):
            if s.ndim != 1 or s.dtype.kind not in "iu":
                raise TypeError(f"token ids must be a flat integer array, got {s.dtype} "
                                f"with {s.ndim} dimensions")
            if lens[i]:
                arrays.append(i)
        elif lens[i]:
            lists.append(i)
    from_arrays, wide_a = _array_ids(seqs, arrays)
    from_lists, wide_l = _list_ids(seqs, lists)
    dtype = np.uint64 if wide_a or wide_l else np.uint32
    end = int(np.iinfo(dtype).max)
    buf = np.full(shape, end, dtype=dtype)
    for rows, src in ((arrays, from_arrays), (lists, from_lists)):
        if rows:
            _place(buf, src, rows, seqs, lens, offsets, every=len(rows) == len(arrays) + len(lists))
    return buf, end


def _array_ids(seqs, rows: list[int]) -> tuple[np.ndarray | None, bool]:
    """The numpy rows' ids concatenated and range-checked; True when uint64 keys are needed."""
    if not rows:
        return None, False
    arrs = [seqs[i] for i in rows]
    if len({a.dtype.kind for a in arrs}) > 1:  # int64 + uint64 would promote to float64
        for a in arrs:
            if a.dtype.kind == "i" and a.min() < 0:
                raise ValueError(f"token ids must be non-negative, got {int(a.min())}")
        arrs = [a.astype(np.uint64, copy=False) for a in arrs]
    ids = np.concatenate(arrs)
    lo, hi = ids.min(), int(ids.max())
    if lo < 0:
        raise ValueError(f"token ids must be non-negative, got {int(lo)}")
    if hi >= 2**64 - 1:
        raise ValueError("token ids must be below 2**64 - 1")
    return ids, hi >= 2**32 - 1


def _list_ids(seqs, rows: list[int]) -> tuple[np.ndarray | None, bool]:
    """The list rows' ids through one ``array.array`` (uint32, else uint64)."""
    if not rows:
        return None, False
    for code, dtype in ((_U32, np.uint32), ("Q", np.uint64)):
        packed = array.array(code)
        try:
            for i in rows:
                row = seqs[i]
                if type(row) is list:
                    packed.fromlist(row)
                else:
                    packed.extend(row)
        except (OverflowError, TypeError) as e:
            if code == "Q":
                raise ValueError(f"token ids must be integers in [0, 2**64 - 1): {e}") from None
            continue
        ids = np.frombuffer(packed, dtype=dtype)
        if (ids == np.iinfo(dtype).max).any():  # END itself
            if code == "Q":
                raise ValueError("token ids must be below 2**64 - 1")
            continue
        return ids, code == "Q"
    raise AssertionError("unreachable")


def _place(buf: np.ndarray, src: np.ndarray, rows: list[int], seqs, lens, offsets,
           every: bool) -> None:
    """Write the concatenated ids of ``rows`` into their places in ``buf``."""
    flat = buf.reshape(-1)
    if len(rows) <= 64:  # a few rows: copying each is cheapest
        at = 0
        for i in rows:
            n = lens[i]
            flat[offsets[i] : offsets[i] + n] = src[at : at + n]
            at += n
        return
    if every and buf.ndim == 1:
        flat[:] = src
        return
    lens_a = np.asarray(lens)
    if buf.ndim == 1:
        mask = np.repeat(np.isin(np.arange(len(seqs)), rows), lens_a)
    else:
        mask = np.arange(buf.shape[1]) < lens_a[:, None]
        if not every:
            mask &= np.isin(np.arange(len(seqs)), rows)[:, None]
    buf[mask] = src


def _ranges(starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """concatenate(arange(s, s + c) for s, c in zip(starts, counts)), without a Python loop."""
    ends = np.cumsum(counts)
    return np.repeat(starts - ends + counts, counts) + np.arange(ends[-1] if len(ends) else 0)


def _sort_rows(mat: np.ndarray, lens: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Order of the key rows (raw bytes), LCP of sorted neighbours, and which neighbours are tied.

    A row holds a response's first W = ``mat.shape[1]`` tokens, closed with END if it is shorter.
    Equal keys are identical responses when they hold an END (LCP = their length), else the two
    responses are tied: they share W tokens and the key cannot tell them apart.
    """
    g, w = mat.shape
    order = np.argsort(mat.view(np.dtype((np.void, mat.strides[0]))).ravel(), kind="stable")
    s = mat[order]
    neq = s[1:] != s[:-1]
    del s
    first = neq.argmax(axis=1)
    differ = neq[np.arange(g - 1), first]
    del neq
    slens = lens[order]
    adj = np.where(differ, first, np.minimum(slens[1:], w))
    return order, adj, ~differ & (slens[1:] >= w)


def _order_adj(flat: np.ndarray, fst: np.ndarray, lens: np.ndarray, end: int
               ) -> tuple[np.ndarray, np.ndarray]:
    """Lexicographic order of the rows flat[fst[i] : fst[i] + lens[i]] and the LCP of sorted
    neighbours, for groups whose longest row would make a full-width key too big.

    The key holds W tokens, W chosen so the key matrix has at most max(_PAD cells per token,
    _CELLS) cells; each run of tied rows is then ordered by its rows' remaining tokens. Tied rows
    are longer than W, so a run has at most 1/_PAD as many rows as this call and the recursion is
    at most log_4 G deep.
    """
    g = len(lens)
    if g == 1:
        return np.zeros(1, dtype=np.int64), np.zeros(0, dtype=np.int64)
    n = int(lens.sum())
    w = min(int(lens.max()) + 1, max(-(-_PAD * (n + g) // g), _CELLS // g))
    take = np.minimum(lens, w)
    mat = np.full((g, w), end, dtype=flat.dtype)
    mat[np.arange(w) < take[:, None]] = flat[_ranges(fst, take)]
    order, adj, tie = _sort_rows(mat, lens)
    del mat
    if tie.any():
        edges = np.flatnonzero(np.diff(np.concatenate(([0], tie.view(np.int8), [0]))))
        for a, b in zip(edges[::2].tolist(), edges[1::2].tolist()):  # rows a..b share W tokens
            rows = order[a : b + 1]
            sub_order, sub_adj = _order_adj(flat, fst[rows] + w, lens[rows] - w, end)
            order[a : b + 1] = rows[sub_order]
            adj[a:b] = w + sub_adj
    return order, adj


def sort_responses(seqs: Sequence[Sequence[int]], lens: np.ndarray
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Lexicographic order of the responses and ``adj[k]`` = LCP of sorted responses k, k + 1."""
    g = len(lens)
    n_lens = lens.tolist()
    n = sum(n_lens)
    w = max(n_lens) + 1
    if g * w <= max(_PAD * (n + g), _CELLS):  # the usual case: pad every row to the longest
        mat, _ = _pack(seqs, n_lens, range(0, g * w, w), (g, w))
        if g == 1:
            return np.zeros(1, dtype=np.int64), np.zeros(0, dtype=np.int64)
        order, adj, _ = _sort_rows(mat, lens)  # every key holds an END: no ties
        return order, adj
    fst = np.cumsum(lens) - lens
    flat, end = _pack(seqs, n_lens, fst.tolist(), (n,))
    return _order_adj(flat, fst, lens, end)


# ----------------------------------------------------------------------------- the trie's nodes

_SMALL_G = 256  # below this many responses a Python stack walk over adj beats log G numpy passes

Nodes = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]


def _nodes_stack(adj: np.ndarray, rs: np.ndarray, slens: np.ndarray) -> Nodes:
    """``_nodes`` by the classic stack walk over ``adj`` (O(G) Python steps, for small groups).

    Each open interval on the stack is [depth, first response, reward sum so far]; ``cur`` is the
    sum of the responses not yet attached to an open interval (the latest response, or an interval
    that just closed). Sums are added up the tree, as the dict-trie's are, so they stay exact for
    0/1 rewards and within a few ulps otherwise.
    """
    a = adj.tolist()
    a.append(-1)
    r = rs.tolist()
    t = slens.tolist()
    ls: list[int] = []
    rr: list[int] = []
    ds: list[int] = []
    pds: list[int] = []
    sums: list[float] = []
    stack: list[list] = []
    prev = -1
    for k, x in enumerate(a):
        deepest = x if x > prev else prev
        if deepest < t[k]:  # response k on its own below its deepest shared node
            ls.append(k), rr.append(k), ds.append(t[k]), pds.append(deepest), sums.append(r[k])
        cur = r[k]
        lb = k
        while stack and stack[-1][0] > x:  # adj[k] < d closes the interval at response k
            d, lb, acc = stack.pop()
            cur += acc
            ls.append(lb), rr.append(k), ds.append(d), sums.append(cur)
            pds.append(max(a[lb - 1] if lb else -1, x))
        if x >= 0:
            if stack and stack[-1][0] == x:
                stack[-1][2] += cur
            else:
                stack.append([x, lb, cur])
        prev = x
    i64 = np.int64
    return (np.array(ls, dtype=i64), np.array(rr, dtype=i64), np.array(ds, dtype=i64),
            np.array(pds, dtype=i64), np.array(sums, dtype=np.float64))


def _intervals_table(adj: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(l, r, depth) of every LCP interval, in O(G log G) numpy work.

    Pair k spans the interval of depth adj[k] from l = (nearest pair left of k with a smaller LCP)
    + 1 to r = the nearest such pair right of k. Binary lifting over a sparse table of range minima
    finds both for every k at once: the walks run over [-2] * P, adj, -1, adj reversed, so one
    pass does both sides (the -1 stops every walk at the seam, the -2 padding at the start without
    a bounds check). Of the pairs of one interval (equal minima inside it) the leftmost is kept.
    Branch-free arithmetic throughout: masked numpy updates on random masks are ten times slower.
    """
    m = len(adj)
    if not m:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    top = (2 * m + 1).bit_length() - 1
    pad = 1 << top
    dt = np.int32 if 2 * m + 1 + pad < 2**31 and int(adj.max()) < 2**31 - 1 else np.int64
    x = np.concatenate((np.full(pad, -2, dtype=dt), adj.astype(dt), [-1], adj[::-1].astype(dt)))
    n = len(x)
    tab = np.empty((top + 1, n), dtype=dt)  # tab[i, j] = min(x[j : j + 2**i])
    tab[0] = x
    for i in range(1, top + 1):
        h = 1 << (i - 1)
        np.minimum(tab[i - 1, : n - 2 * h + 1], tab[i - 1, h : n - h + 1], out=tab[i, : n - 2 * h + 1])
    xs = x[pad:]
    left = np.arange(pad, n, dtype=dt)  # smallest j with min(x[j:k]) >= x[k], k = pad, pad + 1, ...
    for i in range(top, -1, -1):
        step = dt(1 << i)
        ok = tab[i].take(left - step) >= xs
        left -= ok * step
    left -= pad
    k = np.arange(m, dtype=dt)
    lk = left[:m]
    right = k + (k + dt(m + 1) - left[m + 1 :])[::-1]  # the reversed walk's lengths, mirrored
    # keep k unless min(adj[lk:k]) == adj[k]: two sparse-table blocks cover [lk, k)
    span = k - lk
    lvl = (np.frexp(np.maximum(span, 1))[1] - 1).astype(dt)
    width = np.left_shift(dt(1), lvl)
    inside = np.minimum(tab[lvl, lk + pad], tab[lvl, k - width + pad])
    keep = (span == 0) | (inside > adj)
    return lk[keep].astype(np.int64), right[keep].astype(np.int64) + 1, adj[keep]


def _nodes_table(adj: np.ndarray, rs: np.ndarray, slens: np.ndarray) -> Nodes:
    """``_nodes`` in numpy: the sparse-table intervals, sums by np.add.reduceat (each interval's
    rewards added in order, like the dict-trie's)."""
    l, r, d = _intervals_table(adj)
    outer = np.concatenate(([-1], adj, [-1]))
    deepest = np.maximum(outer[:-1], outer[1:])
    solo = np.flatnonzero(deepest < slens)
    bounds = np.empty(2 * len(l), dtype=np.int64)
    bounds[0::2] = l
    bounds[1::2] = r + 1
    sums = np.add.reduceat(np.append(rs, 0.0), bounds)[::2]
    return (np.concatenate((l, solo)), np.concatenate((r, solo)), np.concatenate((d, slens[solo])),
            np.concatenate((np.maximum(outer[l], outer[r + 1]), deepest[solo])),
            np.concatenate((sums, rs[solo])))


def _nodes(adj: np.ndarray, rs: np.ndarray, slens: np.ndarray) -> Nodes:
    """The trie's nodes on the responses' paths as ranges of sorted responses: (l, r, depth,
    parent's depth, reward sum).

    Where responses part (and where identical responses end together) the node at depth d holds
    sorted responses l..r: an LCP interval, a maximal range whose neighbour LCPs are all >= d,
    with d their minimum. Its parent's depth is the larger LCP just outside the range (-1 for the
    root). Below its deepest such node a response p is on its own: (p, p, T_p, that depth, r_p).
    On p's path each node holds V = sum / (r - l + 1) on the slots (parent's depth, depth].
    """
    return (_nodes_stack if len(adj) < _SMALL_G else _nodes_table)(adj, rs, slens)


# ----------------------------------------------------------------------------- the tree

_SORT_PIECES = 16  # sort the pieces when there are fewer than 1/16 as many as slots, else fill


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
    order, adj = sort_responses(seqs, lens)  # sorted order from here on
    total = int(ends[-1])
    rs = r[order]
    slens = lens[order]
    base = starts[order]  # where each sorted response's slots start in the flat arrays
    l, rr, d, pd, sums = _nodes(adj, rs, slens)
    size = rr - l + 1
    # every (response, node on its path) pair: at most tokens + G of them, as a response's nodes
    # have distinct depths <= T. Each starts a piece of V's step function at the slot after the
    # parent's depth; a node at depth d < T is a branch point.
    p = _ranges(l, size)
    at_p = base[p]
    d_p = np.repeat(d, size)
    flat_b = np.zeros(total, dtype=bool)
    flat_b[(at_p + d_p)[d_p < slens[p]]] = True
    piece_at = at_p + np.repeat(pd + 1, size)
    piece_v = np.repeat(sums / size, size)
    del p, at_p, d_p
    if len(piece_at) * _SORT_PIECES < total:
        o = np.argsort(piece_at)
        flat_v = np.repeat(piece_v[o], np.diff(piece_at[o], append=total))
    else:
        mark = np.zeros(total, dtype=np.intp)
        mark[piece_at] = piece_at
        np.maximum.accumulate(mark, out=mark)  # each slot -> where its piece starts
        at = np.empty(total)
        at[piece_at] = piece_v
        flat_v = at[mark]
        del mark, at
    # own leaf: the mean reward of the responses identical to this one (neighbours in sorted order)
    dup = (adj == slens[1:]) & (slens[1:] == slens[:-1])
    if dup.any():
        run = np.concatenate(([0], np.cumsum(~dup)))
        flat_v[base + slens] = (np.bincount(run, weights=rs) / np.bincount(run))[run]
    else:
        flat_v[base + slens] = rs
    return PrefixTree(flat_v, flat_b, starts, lens)
