"""Render one group's prefix tree with rich: where responses branch, V(s) at every node, the reward
at every leaf and TEMPO's delta = V(child) - V(parent) on every branch. Display only.

A node is a maximal run of tokens the node's responses share without branching, so a response of
5,000 tokens is one node, however deep. The tree is built with an explicit stack (no recursion, so
any depth renders); rich prints a Tree iteratively too, but every level indents by 4 columns and
rich drops what does not fit the width, so levels past ``max_levels`` (by default what the console
width leaves room for) are summarised in one "… N more levels" line.
"""

from __future__ import annotations

from typing import Callable, Optional

import numpy as np

from tcli.algos.estimators import Group
from tcli.algos.masks import policy_td
from tcli.algos.tree import PrefixTree, build_prefix_tree
from tcli.records import at_record, entropies

_LABEL_COLUMNS = 40  # room kept for labels when the display depth follows the console width


def _fmt_tokens(ids: list[int], decode: Optional[Callable], limit: int) -> str:
    limit = max(limit, 2)
    if len(ids) <= limit:
        return repr(decode(ids)) if decode is not None else " ".join(map(str, ids))
    head, tail = ids[: limit // 2], ids[len(ids) - (limit - limit // 2):]
    if decode is not None:
        text = repr(decode(head) + " … " + decode(tail))
    else:
        text = " ".join(map(str, head)) + " … " + " ".join(map(str, tail))
    return f"{text} ({len(ids):,} tokens)"


class _Walk:
    """Splits a node's responses into the node's extent, its ended responses and its children."""

    def __init__(self, tokens: list[np.ndarray], tree: PrefixTree):
        self.lens = tree.lens
        self.flat = np.concatenate(tokens) if tokens else np.zeros(0, dtype=np.int64)
        self.offsets = np.cumsum(tree.lens) - tree.lens
        self.forks = [np.flatnonzero(tree.branch_of(i)) for i in range(len(tokens))]

    def split(self, members: np.ndarray, t: int, top: bool
              ) -> tuple[int, int, np.ndarray, list[np.ndarray]]:
        """The node holding ``members`` (every response with their first t tokens, and for a
        child node also token t) runs to depth t_end: the first branch point of its longest
        response at or past t (t + 1: token t is what a child's responses share), or that
        response's end. Returns (t_end, the longest response, the responses ending at t_end,
        the children's responses in order of first appearance)."""
        lens = self.lens[members]
        longest = int(members[np.argmax(lens)])
        forks = self.forks[longest]
        k = int(np.searchsorted(forks, t if top else t + 1))
        t_end = int(forks[k]) if k < len(forks) else int(self.lens[longest])
        go_on = lens > t_end
        cont = members[go_on]
        if not len(cont):
            return t_end, longest, members, []
        _, first, which = np.unique(self.flat[self.offsets[cont] + t_end], return_index=True,
                                    return_inverse=True)
        rank = np.empty_like(first)
        rank[np.argsort(first)] = np.arange(len(first))
        which = rank[which]
        kids = np.split(cont[np.argsort(which, kind="stable")], np.cumsum(np.bincount(which))[:-1])
        return t_end, longest, members[~go_on], kids


def render_group(recs: list[dict], decode: Optional[Callable] = None, max_run: int = 24,
                 max_levels: Optional[int] = None):
    """A rich Tree of one group: a node per run of shared tokens, its V, δ and branch mark, a leaf
    line per response; with recorded ``entropies``, H = the sampling entropy of the token where a
    node's children start. ``max_levels``: node levels shown below the root (default: as many as
    the console width leaves ``_LABEL_COLUMNS`` columns of label room for)."""
    from rich.markup import escape
    from rich.tree import Tree

    group = Group.from_records(recs)
    tree = build_prefix_tree(group.tokens, group.rewards)
    walk = _Walk(group.tokens, tree)
    ents = _entropies(recs, group.tokens)
    r = group.rewards
    if max_levels is None:
        from rich.console import Console

        max_levels = max(4, (Console().width - _LABEL_COLUMNS) // 4)
    pid = recs[0].get("prompt_id")
    root = Tree(f"[bold]{escape(str(pid))}[/]  G={len(recs)}  V(root)=mean r={r.mean():.3f}")

    # (rich parent, responses of the node, depth where its run starts, parent's V, node level)
    stack = [(root, np.arange(len(recs)), 0, float(r.mean()), 1)]
    while stack:
        parent, members, t, parent_v, level = stack.pop()
        t_end, longest, ended, kids = walk.split(members, t, level == 1)
        # V of the node; if the longest response ends here, all of them do (they are identical)
        v = float(tree.values_of(longest)[t_end])
        run = group.tokens[longest][t:t_end].tolist()
        mask = None if group.masks is None else group.masks[longest]
        label = _run_label(run, None if mask is None else mask[t:t_end], decode, max_run)
        label += f"  [cyan]V={v:.3f}[/]"
        if abs(v - parent_v) > 1e-12:
            label += f"  [magenta]δ={v - parent_v:+.3f}[/]"
        if len(kids) + bool(len(ended)) >= 2:
            label += "  [yellow]⑂ branch[/]"
        if kids and ents[int(kids[0][0])] is not None:  # entropy of the token the children start at
            label += f"  [blue]H={ents[int(kids[0][0])][t_end]:.2f}[/]"
        node = parent.add(label)
        for i in ended.tolist():
            node.add(f"[green]■ leaf[/] sample {escape(str(recs[i].get('sample_id', i)))}  "
                     f"r={r[i]:g}{_env_count(group, i)}")
        if kids and level >= max_levels:
            n = sum(map(len, kids))
            more = _levels_below(walk, kids, t_end)
            node.add(f"[dim]… {more} more level{'s' if more != 1 else ''} below "
                     f"({n} response{'s' if n != 1 else ''}); display depth capped at {max_levels}[/]")
            continue
        for members_k in reversed(kids):  # popped in order, so children keep their order
            stack.append((node, members_k, t_end, v, level + 1))
    return root


def _run_label(run: list[int], mask: Optional[np.ndarray], decode, max_run: int) -> str:
    """A node's tokens as rich markup: environment spans (``loss_mask`` 0, a tool's output) are
    dim and bracketed as ``⟦env …⟧``, so they read apart from the policy's tokens in colour and
    in plain text alike (docs/design.md §3.6)."""
    from rich.markup import escape

    if not run:
        return "·"
    if mask is None or mask.all():
        return escape(_fmt_tokens(run, decode, max_run))
    cuts = np.flatnonzero(np.diff(mask.view(np.int8))) + 1
    parts = []
    for a, b in zip(np.concatenate(([0], cuts)).tolist(), np.append(cuts, len(run)).tolist()):
        text = escape(_fmt_tokens(run[a:b], decode, max_run))
        parts.append(text if mask[a] else f"[dim]⟦env {text}⟧[/]")
    return " ".join(parts)


def _env_count(group: Group, i: int) -> str:
    """``  (N env tokens)`` for a response with environment tokens, else nothing."""
    m = None if group.masks is None else group.masks[i]
    n = 0 if m is None else int(len(m) - m.sum())
    return f"  [dim]({n} env token{'s' if n != 1 else ''})[/]" if n else ""


def _entropies(recs: list[dict], tokens: list[np.ndarray]) -> list[Optional[np.ndarray]]:
    """Each record's validated ``entropies`` (None where it has none)."""
    out = []
    for i, (rec, toks) in enumerate(zip(recs, tokens)):
        with at_record(i):
            out.append(entropies(rec, len(toks)))
    return out


def _levels_below(walk: _Walk, kids: list[np.ndarray], t: int) -> int:
    """How many node levels lie below a node whose children are ``kids`` (iteratively)."""
    height = 0
    stack = [(members, t, 1) for members in kids]
    while stack:
        members, t0, level = stack.pop()
        height = max(height, level)
        t_end, _, _, sub = walk.split(members, t0, False)
        stack.extend((m, t_end, level + 1) for m in sub)
    return height


def tempo_deltas(recs: list[dict]) -> list[np.ndarray]:
    """delta_t = V(s_{t+1}) - V(s_t) per response (used by show-tree and tests); with a
    ``loss_mask``, 0 on environment tokens and jumping over them (docs/design.md §3.6)."""
    group = Group.from_records(recs)
    tree = build_prefix_tree(group.tokens, group.rewards)
    masks = group.masks or [None] * len(recs)
    return [np.diff(tree.values_of(i)) if m is None else policy_td(tree.values_of(i), m)
            for i, m in enumerate(masks)]
