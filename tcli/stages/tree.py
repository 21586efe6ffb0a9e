"""The build-tree stage: P2T values and branch flags written into a group's records."""

from __future__ import annotations

from tcli import SCHEMA
from tcli.algos.estimators import Group


def write_tree(group: Group) -> None:
    """Add ``values`` (T+1 floats) and ``branch`` (T bools) from the group's prefix tree."""
    tree = group.tree
    values = group.values.tolist()
    branch = tree.flat_branch.tolist()
    for rec, s, n in zip(group.records, tree.starts.tolist(), tree.lens.tolist()):
        rec["values"] = values[s : s + n + 1]
        rec["branch"] = branch[s : s + n]
        rec["schema"] = SCHEMA


def build_tree_group(recs: list[dict]) -> list[dict]:
    """The stage on one group of records (validated here)."""
    write_tree(Group.from_records(recs))
    return recs
