"""The build-tree stage: P2T values and branch flags written into a group's records."""

from __future__ import annotations

from tcli import SCHEMA
from tcli.algos.estimators import Group
from tcli.algos.tree import build_prefix_tree


def build_tree_group(recs: list[dict]) -> list[dict]:
    """Add ``values`` (T+1 floats) and ``branch`` (T bools) from the group's P2T prefix tree."""
    group = Group.from_records(recs)
    tree = build_prefix_tree(group.tokens, group.rewards)
    values = tree.flat_values.tolist()
    branch = tree.flat_branch.tolist()
    for i, rec in enumerate(recs):
        s, n = int(tree.starts[i]), int(tree.lens[i])
        rec["values"] = values[s : s + n + 1]
        rec["branch"] = branch[s : s + n]
        rec["schema"] = SCHEMA
    return recs
