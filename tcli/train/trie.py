"""Prefix-shared packing for train-step: the responses to one prompt as one prefix tree (no torch).

A group's responses share the prompt, and a sampled tree's responses share whole segments, so
the model only needs to run over the *unique* tokens: the prompt once, then every distinct
response prefix once. :func:`build_trie` lays a group out as one sequence: the prompt, then the
trie's response nodes in depth-first (pre-)order; ``depth`` is each token's position id and
``end`` is one past its last descendant, so token j is an ancestor-or-self of token i exactly
when ``j <= i < end[j]`` (the tree attention mask). Response i's token t is scored by the logits
at its parent's position (``node_pos``), and ``node_of`` maps each (response, token) to its node,
so per-response arrays (old log-probs, advantages, loss aggregation) stay exactly as without
sharing.

How it is vectorised (the approach of :mod:`tcli.algos.tree`, whose sort it reuses): sort the
responses lexicographically and take the longest common prefix ``lcp[k]`` of each sorted response
with the one before it. Sorted response k introduces new nodes for its tokens t >= lcp[k]
(numbered in sorted order: that is a pre-order walk); for t < lcp[k] its node is response
k - 1's node at t, resolved for every token at once by pointer doubling (log G numpy passes). The
subtree of new node (k, t) ends where the first later response with lcp <= t starts: binary
lifting over a sparse table of lcp minima. No Python loop touches tokens.

Groups larger than the micro-batch budget are split into sub-tries of consecutive sorted
responses (each repeats the prompt); a single response longer than the budget gets a micro-batch
of its own (the budget bounds memory, it is not a data rule).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from tcli.algos.tree import _order_adj, _pack


@dataclass
class Trie:
    """One packed group: ``tokens``/``depth``/``end`` over the P prompt + U response nodes."""

    members: list[int]          # sample indices, in the order ``node_of`` follows
    tokens: np.ndarray          # int64[P + U]
    depth: np.ndarray           # int64[P + U] position ids
    end: np.ndarray             # int64[P + U] one past the last descendant (local positions)
    node_pos: np.ndarray        # int64[U] local position whose logits score node u
    node_of: list[np.ndarray]   # per member: int64[T_i] node index of each response token

    @property
    def size(self) -> int:
        return len(self.tokens)


def _sorted_lcp(responses: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Lexicographic order of the responses and lcp[k] = LCP(sorted k - 1, sorted k), lcp[0] = 0."""
    lens = np.array([len(r) for r in responses], dtype=np.int64)
    fst = np.concatenate(([0], np.cumsum(lens)[:-1])).astype(np.int64)
    flat, end = _pack(list(responses), lens.tolist(), fst.tolist(), (int(lens.sum()),))
    order, adj = _order_adj(flat, fst, lens, end)
    return order, np.concatenate(([0], adj)).astype(np.int64)


def _first_le(lcp: np.ndarray, start: np.ndarray, t: np.ndarray) -> np.ndarray:
    """For each query: the first r >= start with lcp[r] <= t (len(lcp) if none), by binary
    lifting over a sparse table of range minima."""
    g = len(lcp)
    table = [lcp]
    while (1 << len(table)) <= g:
        prev, h = table[-1], 1 << (len(table) - 1)
        table.append(np.minimum(prev[:-h], prev[h:]))
    pos = start.copy()
    for lvl in range(len(table) - 1, -1, -1):
        span = 1 << lvl
        ok = pos + span <= g
        blk = np.full(len(pos), -1, dtype=np.int64)
        blk[ok] = table[lvl][pos[ok]]
        jump = ok & (blk > t)
        pos[jump] += span
    return pos


def build_trie(prompt: np.ndarray, responses: Sequence[np.ndarray], members: list[int]) -> Trie:
    """The packed prefix tree of responses (all non-empty) to one prompt."""
    P = len(prompt)
    order, lcp = _sorted_lcp(responses)
    resp = [np.asarray(responses[k], dtype=np.int64) for k in order]
    lens = np.array([len(r) for r in resp], dtype=np.int64)
    new = lens - lcp                                       # new nodes per sorted response
    base = np.concatenate(([0], np.cumsum(new))).astype(np.int64)
    U = int(base[-1])
    off = np.concatenate(([0], np.cumsum(lens)[:-1])).astype(np.int64)
    k_of = np.repeat(np.arange(len(resp)), lens)
    t = np.arange(int(lens.sum()), dtype=np.int64) - off[k_of]
    is_new = t >= lcp[k_of]
    prev_len = np.concatenate(([0], lens[:-1]))
    src = np.where(is_new, np.arange(len(t)), np.arange(len(t)) - prev_len[k_of])
    while True:                                            # pointer doubling to the introducer
        nxt = src[src]
        if np.array_equal(nxt, src):
            break
        src = nxt
    own = np.where(is_new, base[k_of] + t - lcp[k_of], 0)
    node_flat = own[src]
    parent = np.where(t == 0, P - 1, P + node_flat[np.maximum(np.arange(len(t)) - 1, 0)])
    node_pos = np.empty(U, dtype=np.int64)
    node_pos[node_flat[is_new]] = parent[is_new]
    tokens = np.concatenate([np.asarray(prompt, dtype=np.int64)] + [r[lcp[k]:] for k, r in
                                                                    enumerate(resp)])
    depth = np.concatenate([np.arange(P), P + t[is_new]]).astype(np.int64)
    stop = _first_le(lcp, k_of[is_new] + 1, t[is_new])
    end = np.concatenate([np.full(P, P + U), P + base[stop]]).astype(np.int64)
    node_of: list = [None] * len(resp)
    for k, i in enumerate(order.tolist()):
        node_of[i] = node_flat[off[k]: off[k] + lens[k]]
    return Trie(list(members), tokens, depth, end, node_pos, node_of)


def group_units(prompts: Sequence[np.ndarray], responses: Sequence[np.ndarray],
                idxs: Sequence[int], budget: int) -> list[Trie]:
    """The samples ``idxs`` grouped by identical prompt, each group one trie, or several
    sub-tries of consecutive sorted responses when it has more than ``budget`` unique tokens."""
    groups: dict[bytes, list[int]] = {}
    for i in idxs:
        groups.setdefault(np.asarray(prompts[i], dtype=np.int64).tobytes(), []).append(int(i))
    units = []
    for members in groups.values():
        trie = build_trie(prompts[members[0]], [responses[i] for i in members], members)
        if trie.size <= budget or len(members) == 1:
            units.append(trie)
            continue
        for run in _split_runs(prompts[members[0]], [responses[i] for i in members], budget):
            sub = [members[k] for k in run]
            units.append(build_trie(prompts[sub[0]], [responses[i] for i in sub], sub))
    return units


def _split_runs(prompt, responses: Sequence[np.ndarray], budget: int) -> list[list[int]]:
    """Runs of consecutive sorted responses whose sub-trie fits ``budget`` (greedy; a response
    that alone exceeds it forms a run of its own)."""
    order, lcp = _sorted_lcp(responses)
    P = len(prompt)
    runs: list[list[int]] = []
    size = 0
    for k, i in enumerate(order.tolist()):
        n = len(responses[i])
        if runs and size + n - lcp[k] <= budget:
            runs[-1].append(i)
            size += n - int(lcp[k])
        else:
            runs.append([i])
            size = P + n
    return runs


@dataclass
class PackedRow:
    """Several tries concatenated into one row (block-diagonal tree mask, no padding)."""

    input_ids: np.ndarray                 # int64[N]
    position_ids: np.ndarray              # int64[N]
    end: np.ndarray = None                # int64[N] one past the last descendant (row-global)
    blocks: list[tuple[int, int]] = field(default_factory=list)  # [start, stop) per trie
    node_pos: np.ndarray = None           # int64[U] row position scoring node u
    node_tok: np.ndarray = None           # int64[U] the node's token (the target)
    members: list[int] = field(default_factory=list)
    node_of: list[np.ndarray] = field(default_factory=list)      # global node ids per member


def pack_row(tries: Sequence[Trie]) -> PackedRow:
    """Concatenate tries into one row; node ids and positions become row-global."""
    row = PackedRow(np.concatenate([t.tokens for t in tries]),
                    np.concatenate([t.depth for t in tries]))
    pos, node_pos, node_tok, nodes, ends = 0, [], [], 0, []
    for t in tries:
        P = t.size - len(t.node_pos)
        row.blocks.append((pos, pos + t.size))
        ends.append(pos + t.end)
        node_pos.append(pos + t.node_pos)
        node_tok.append(t.tokens[P:])
        row.members.extend(t.members)
        row.node_of.extend(n + nodes for n in t.node_of)
        pos += t.size
        nodes += len(t.node_pos)
    row.end = np.concatenate(ends)
    row.node_pos = np.concatenate(node_pos)
    row.node_tok = np.concatenate(node_tok)
    return row


def bin_units(sizes: Sequence[int], budget: int) -> list[list[int]]:
    """First-fit decreasing: unit indices into bins of at most ``budget`` tokens (a unit larger
    than the budget gets a bin of its own). Deterministic (ties by index)."""
    bins: list[list[int]] = []
    room: list[int] = []
    for u in sorted(range(len(sizes)), key=lambda u: (-int(sizes[u]), u)):
        n = int(sizes[u])
        for b, r in enumerate(room):
            if n <= r:
                bins[b].append(u)
                room[b] -= n
                break
        else:
            bins.append([u])
            room.append(budget - n)
    return bins


def tile_plan(end: np.ndarray, q: int) -> tuple[np.ndarray, np.ndarray]:
    """Tree attention of a packed row in query tiles of ``q`` positions: per tile the key
    positions it needs, ``kidx`` [T, K] (0-padded), and the mask [T, q, K].

    In pre-order, an ancestor j < s of a node at or after s is an ancestor of s itself, so the
    keys of tile [s, e) are {j < e : end[j] > s}: the tile and the path above it, never the rest
    of the tree (and never another trie of the row, whose nodes all end before s). Attention then
    costs O(N x (depth + q)) instead of the O(N^2) of one dense tree mask. Rows past N attend to
    key 0 only (their output is dropped; a fully masked row would be NaN)."""
    n = len(end)
    T = -(-n // q)
    s = np.arange(T, dtype=np.int64) * q
    ar = np.arange(n, dtype=np.int64)
    need = (ar[None, :] < np.minimum(s + q, n)[:, None]) & (end[None, :] > s[:, None])
    counts = need.sum(1)
    K = int(counts.max())
    valid = np.arange(K)[None, :] < counts[:, None]
    kidx = np.zeros((T, K), dtype=np.int64)
    kidx[valid] = np.nonzero(need)[1]
    qpos = s[:, None] + np.arange(q)[None, :]
    mask = (valid[:, None, :] & (kidx[:, None, :] <= qpos[:, :, None])
            & (qpos[:, :, None] < end[kidx][:, None, :]))
    mask[:, :, 0] |= qpos >= n
    return kidx, mask
