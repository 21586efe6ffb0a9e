"""show-tree's renderer (tcli.show.render_group): labels, iterative build, deep trees print."""

from __future__ import annotations

import io

import numpy as np
from rich.console import Console

from tcli.algos.tree import build_prefix_tree
from tcli.show import render_group, tempo_deltas


def records(seqs, rewards, pid="p"):
    return [{"prompt_id": pid, "sample_id": i, "token_ids": list(s), "reward": float(r)}
            for i, (s, r) in enumerate(zip(seqs, rewards))]


def printed(tree, width: int = 80) -> str:
    buf = io.StringIO()
    Console(file=buf, width=width).print(tree)
    return buf.getvalue()


def caterpillar(levels: int):
    """Response i = i zeros then a one: the tree branches at every one of ``levels`` levels."""
    return records([[0] * i + [1] for i in range(levels)], [i % 2 for i in range(levels)])


def test_oracle_group_labels():
    out = printed(render_group(records([[5, 7, 9, 2], [5, 7, 8, 2], [5, 6, 9, 2], [4, 6, 2]],
                                       [1, 0, 1, 0], pid="first")))
    assert out.startswith("first  G=4  V(root)=mean r=0.500")
    assert "5  V=0.667  δ=+0.167  ⑂ branch" in out
    assert "9 2  V=1.000  δ=+0.500" in out
    assert "4 6 2  V=0.000  δ=-0.500" in out
    assert out.count("■ leaf") == 4


def test_node_where_a_response_ends_shows_the_node_value():
    # [1] ends where [1, 2] goes on: the node after [1] holds both (V = 0.5), not [1]'s own leaf (1.0)
    out = printed(render_group(records([[1], [1, 2]], [1, 0])))
    assert "1  V=0.500  ⑂ branch" in out
    assert "2  V=0.000  δ=-0.500" in out
    assert out.count("■ leaf") == 2


def test_shared_1500_token_chain_is_one_node():
    shared = list(range(100, 1600))
    recs = records([shared + [1, 2], shared + [3], shared + [3, 4]], [1, 0, 1])
    tree = render_group(recs, max_run=24)
    node = tree.children[0]
    assert "(1,500 tokens)" in str(node.label) and "branch" in str(node.label)
    assert len(node.children) == 2
    out = printed(tree, width=200)
    assert out.count("■ leaf") == 3 and "V=0.667" in out


def test_single_5000_token_response():
    rng = np.random.default_rng(0)
    tree = render_group(records([rng.integers(0, 1000, 5000).tolist()], [1]))
    assert len(tree.children) == 1 and "(5,000 tokens)" in str(tree.children[0].label)
    out = printed(tree)
    assert "■ leaf sample 0  r=1" in out


def test_1500_levels_of_branching_build_without_recursion():
    """Deeper than Python's default recursion limit (1,000): the old recursive builder failed."""
    tree = render_group(caterpillar(1500), max_levels=2000)
    depth, node = 0, tree
    while node.children:
        node = node.children[-1]
        depth += 1
    assert depth == 1501  # 1,500 nodes, then the last response's leaf


def test_300_levels_print_in_full_on_a_wide_console():
    out = printed(render_group(caterpillar(300), max_levels=400), width=1400)
    assert out.count("■ leaf") == 300
    assert "more level" not in out


def test_deep_tree_is_capped_to_the_console_width(monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    tree = render_group(caterpillar(300))  # 80 columns leave room for 10 levels
    out = printed(tree, width=80)
    lines = out.splitlines()
    assert all(line.strip() for line in lines)  # nothing squeezed to an empty line
    assert "… 290 more levels below (291 responses); display depth capped at 10" in " ".join(
        line.strip(" │") for line in lines)
    assert out.count("■ leaf") == 9  # the leaves of levels 2..10 (level 1 is the empty root run)


def test_explicit_cap_counts_levels_and_responses():
    tree = render_group(caterpillar(6), max_levels=3)
    out = printed(tree, width=200)
    assert "… 3 more levels below (4 responses); display depth capped at 3" in out


def test_tempo_deltas_sum_to_reward_minus_mean():
    seqs = [[5, 7, 9, 2], [5, 7, 8, 2], [5, 6, 9, 2], [4, 6, 2]]
    r = np.array([1.0, 0.0, 1.0, 0.0])
    for i, d in enumerate(tempo_deltas(records(seqs, r))):
        assert abs(d.sum() - (r[i] - r.mean())) < 1e-12
        np.testing.assert_allclose(d, np.diff(build_prefix_tree(seqs, r).values_of(i)))


def test_decoded_runs_show_head_and_tail():
    text = b"She has 16 apples and eats 3 of them, so she has 13 left."
    recs = records([list(text) + [10], list(text) + [33]], [1, 0])
    decode = lambda ids: bytes(ids).decode("utf-8", "replace")  # noqa: E731
    tree = render_group(recs, decode=decode, max_run=8)
    assert str(tree.children[0].label).startswith(f"'She  … eft.' ({len(text)} tokens)  ")
    out = printed(tree, width=120)
    assert "'\\n'" in out and "'!'" in out
