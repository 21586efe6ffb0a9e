"""Render one group's prefix tree with rich: where responses branch, V(s) at every node, the reward
at every leaf and TEMPO's delta = V(child) - V(parent) on every branch. Display only (small groups)."""

from __future__ import annotations

from typing import Callable, Optional

import numpy as np

from tcli.algos.estimators import Group
from tcli.algos.tree import build_prefix_tree


def _fmt_tokens(ids: list[int], decode: Optional[Callable], limit: int) -> str:
    shown = ids if len(ids) <= limit else ids[: limit // 2] + [-1] + ids[-limit // 2:]
    if decode is not None:
        if len(ids) > limit:
            text = decode(ids[: limit // 2]) + " … " + decode(ids[-limit // 2:])
        else:
            text = decode(ids)
        return repr(text)
    return " ".join("…" if t == -1 else str(t) for t in shown)


def render_group(recs: list[dict], decode: Optional[Callable] = None, max_run: int = 24):
    from rich.markup import escape
    from rich.tree import Tree

    group = Group.from_records(recs)
    tree = build_prefix_tree(group.tokens, group.rewards)
    seqs = [t.tolist() for t in group.tokens]
    r = group.rewards
    pid = recs[0].get("prompt_id")
    root = Tree(f"[bold]{escape(str(pid))}[/]  G={len(seqs)}  V(root)=mean r={r.mean():.3f}")

    def value(i: int, t: int) -> float:
        return float(tree.values_of(i)[t])

    def expand(parent, members: list[int], t: int, parent_v: float) -> None:
        """Add the node reached after a shared run of tokens, then its children."""
        start = t
        while all(len(seqs[i]) > t for i in members) and len({seqs[i][t] for i in members}) == 1:
            t += 1
        v = value(members[0], t)
        ended = [i for i in members if len(seqs[i]) == t]
        by_tok: dict[int, list[int]] = {}
        for i in members:
            if len(seqs[i]) > t:
                by_tok.setdefault(seqs[i][t], []).append(i)
        run = seqs[members[0]][start:t]
        label = (escape(_fmt_tokens(run, decode, max_run)) if run else "·") + f"  [cyan]V={v:.3f}[/]"
        if abs(v - parent_v) > 1e-12:
            label += f"  [magenta]δ={v - parent_v:+.3f}[/]"
        if len(by_tok) + bool(ended) >= 2:
            label += "  [yellow]⑂ branch[/]"
        node = parent.add(label)
        for i in ended:
            node.add(f"[green]■ leaf[/] sample {recs[i].get('sample_id', i)}  r={r[i]:g}")
        for kids in by_tok.values():
            expand(node, kids, t, v)

    expand(root, list(range(len(seqs))), 0, float(r.mean()))
    return root


def tempo_deltas(recs: list[dict]) -> list[np.ndarray]:
    """delta_t = V(s_{t+1}) - V(s_t) per response (used by show-tree and tests)."""
    group = Group.from_records(recs)
    tree = build_prefix_tree(group.tokens, group.rewards)
    return [np.diff(tree.values_of(i)) for i in range(len(recs))]
