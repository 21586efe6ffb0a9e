"""P2T prefix tree (tcli.algos.tree): the vectorised build against the dict-trie oracle and by hand."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tcli.algos.tree import PrefixTree, build_prefix_tree, lcp_matrix, reference_prefix_tree

ORACLE_TOKENS = [[5, 7, 9, 2], [5, 7, 8, 2], [5, 6, 9, 2], [4, 6, 2]]
ORACLE_REWARDS = [1.0, 0.0, 1.0, 0.0]


def token_mask(tree: PrefixTree) -> np.ndarray:
    """Real token slots of the flat arrays (the slot after each response's last token is unused)."""
    mask = np.ones(len(tree.flat_branch), dtype=bool)
    mask[tree.starts + tree.lens] = False
    return mask


def assert_same_tree(got: PrefixTree, want: PrefixTree) -> None:
    assert np.array_equal(got.lens, want.lens)
    assert np.array_equal(got.starts, want.starts)
    assert got.flat_values.shape == want.flat_values.shape
    assert np.abs(got.flat_values - want.flat_values).max(initial=0) < 1e-12, (got.values, want.values)
    assert np.array_equal(got.flat_branch[token_mask(got)], want.flat_branch[token_mask(want)]), \
        (got.branch, want.branch)


def random_group(rng: np.random.Generator) -> tuple[list[list[int]], list[float]]:
    """Small alphabets so prefixes collide; empty responses, duplicates and prefixes of each other."""
    g = int(rng.integers(1, 10))
    alphabet = int(rng.integers(1, 4))
    seqs: list[list[int]] = []
    for _ in range(g):
        roll = rng.random()
        if seqs and roll < 0.15:
            seqs.append(list(seqs[int(rng.integers(len(seqs)))]))  # exact duplicate
        elif seqs and roll < 0.6:
            parent = seqs[int(rng.integers(len(seqs)))]
            cut = int(rng.integers(0, len(parent) + 1))  # a prefix of it, possibly extended
            seqs.append(parent[:cut] + rng.integers(0, alphabet, int(rng.integers(0, 4))).tolist())
        else:
            seqs.append(rng.integers(0, alphabet, int(rng.integers(0, 8))).tolist())
    rewards = rng.choice([0.0, 0.5, 1.0, -2.0], size=g).tolist()
    return seqs, rewards


def test_design_oracle_values_and_branches():
    tree = build_prefix_tree(ORACLE_TOKENS, ORACLE_REWARDS)
    expected = [
        [0.5, 2 / 3, 0.5, 1.0, 1.0],   # root, [5], [5,7], [5,7,9], leaf
        [0.5, 2 / 3, 0.5, 0.0, 0.0],
        [0.5, 2 / 3, 1.0, 1.0, 1.0],   # [5,6] only holds response 3
        [0.5, 0.0, 0.0, 0.0],
    ]
    for got, want in zip(tree.values, expected):
        np.testing.assert_allclose(got, want, atol=1e-12)
    assert [b.tolist() for b in tree.branch] == [
        [True, True, True, False],
        [True, True, True, False],
        [True, True, False, False],
        [True, False, False],
    ]


def test_same_token_same_position_different_prefix_is_not_merged():
    # token 2 at position 1 under prefix [1] and under prefix [3]: two different nodes
    tree = build_prefix_tree([[1, 2, 9], [3, 2, 9], [1, 2, 9]], [1.0, 0.0, 0.0])
    np.testing.assert_allclose(tree.values_of(0), [1 / 3, 0.5, 0.5, 0.5])
    np.testing.assert_allclose(tree.values_of(1), [1 / 3, 0.0, 0.0, 0.0])
    assert tree.branch_of(1).tolist() == [True, False, False]


def test_identical_responses_share_their_leaf_value():
    tree = build_prefix_tree([[1, 2], [1, 2], [1, 3]], [1.0, 0.0, 1.0])
    np.testing.assert_allclose(tree.values_of(0), [2 / 3, 2 / 3, 0.5])
    np.testing.assert_allclose(tree.values_of(1), [2 / 3, 2 / 3, 0.5])
    np.testing.assert_allclose(tree.values_of(2), [2 / 3, 2 / 3, 1.0])
    assert tree.branch_of(0).tolist() == [False, True]


def test_prefix_response_ends_inside_another():
    # [1] ends where [1, 2] continues: the node after [1] branches (an end is a child)
    tree = build_prefix_tree([[1], [1, 2], []], [1.0, 0.0, 0.5])
    np.testing.assert_allclose(tree.values_of(0), [0.5, 1.0])
    np.testing.assert_allclose(tree.values_of(1), [0.5, 0.5, 0.0])
    np.testing.assert_allclose(tree.values_of(2), [0.5])
    assert tree.branch_of(1).tolist() == [True, True]
    assert tree.branch_of(0).tolist() == [True]
    assert tree.branch_of(2).tolist() == []


def test_empty_and_single_groups():
    empty = build_prefix_tree([], [])
    assert empty.values == [] and len(empty.flat_values) == 0
    one = build_prefix_tree([[3, 4, 5]], [0.25])
    np.testing.assert_allclose(one.values_of(0), [0.25] * 4)
    assert not one.branch_of(0).any()
    blank = build_prefix_tree([[], []], [1.0, 0.0])
    np.testing.assert_allclose(blank.values_of(0), [0.5])


def test_matches_dict_trie_on_thousands_of_random_groups():
    rng = np.random.default_rng(1234)
    for _ in range(2000):
        seqs, rewards = random_group(rng)
        want = reference_prefix_tree(seqs, rewards)
        assert_same_tree(build_prefix_tree(seqs, rewards), want)
        assert_same_tree(build_prefix_tree([np.array(s, dtype=np.int64) for s in seqs], rewards), want)


def test_matches_dict_trie_on_long_realistic_groups():
    """Responses copying an earlier one up to a random point, like sampled rollouts."""
    rng = np.random.default_rng(7)
    for _ in range(20):
        seqs = [rng.integers(0, 50_000, size=int(rng.integers(0, 300))).tolist()]
        for i in range(1, 16):
            parent = seqs[int(rng.integers(i))]
            cut = int(rng.integers(0, len(parent) + 1))
            seqs.append(parent[:cut] + rng.integers(0, 50_000, int(rng.integers(0, 300))).tolist())
        rewards = rng.random(16).tolist()
        assert_same_tree(build_prefix_tree(seqs, rewards), reference_prefix_tree(seqs, rewards))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.lists(st.integers(0, 2), max_size=6), st.sampled_from([0.0, 1.0, 0.3])),
                min_size=1, max_size=8))
def test_matches_dict_trie_property(group):
    seqs = [s for s, _ in group]
    rewards = [r for _, r in group]
    assert_same_tree(build_prefix_tree(seqs, rewards), reference_prefix_tree(seqs, rewards))


def test_lcp_matrix_brute_force():
    rng = np.random.default_rng(5)
    for _ in range(300):
        seqs, _ = random_group(rng)
        lcp, lens = lcp_matrix(seqs)
        for i, a in enumerate(seqs):
            assert lens[i] == len(a)
            for j, b in enumerate(seqs):
                n = 0
                while n < min(len(a), len(b)) and a[n] == b[n]:
                    n += 1
                assert lcp[i, j] == n


@pytest.mark.parametrize("big", [2**32 - 2, 2**32 - 1, 2**32, 2**40, 2**63 - 1])
def test_large_token_ids(big):
    seqs = [[1, big, 3], [1, big, 4], [1, 2]]
    rewards = [1.0, 0.0, 1.0]
    want = reference_prefix_tree(seqs, rewards)
    assert_same_tree(build_prefix_tree(seqs, rewards), want)
    assert_same_tree(build_prefix_tree([np.array(s, dtype=np.int64) for s in seqs], rewards), want)


@pytest.mark.parametrize("seqs", [[[1, -1]], [[1, 2.5]], [["a"]], [np.array([1, -3])],
                                  [np.array([1.0, 2.0])]])
def test_rejects_bad_token_ids(seqs):
    with pytest.raises((ValueError, TypeError)):
        build_prefix_tree(seqs, [1.0] * len(seqs))


def test_rewards_must_match_group():
    with pytest.raises(ValueError):
        build_prefix_tree([[1], [2]], [1.0])


def test_from_lists_round_trip():
    tree = build_prefix_tree(ORACLE_TOKENS, ORACLE_REWARDS)
    again = PrefixTree.from_lists([v.tolist() for v in tree.values], [b.tolist() for b in tree.branch])
    assert_same_tree(again, tree)
    assert not again.from_build


def test_leaf_slot_is_never_a_branch():
    """TEMPO counts branching tokens over the whole flat array; the per-response leaf slot must stay False."""
    import random

    import numpy as np

    from tcli.algos.tree import build_prefix_tree

    rng = random.Random(1)
    for _ in range(500):
        g = rng.randint(1, 8)
        seqs = [[rng.randint(0, 2) for _ in range(rng.randint(0, 6))] for _ in range(g)]
        t = build_prefix_tree(seqs, [rng.random() for _ in range(g)])
        assert not np.asarray(t.flat_branch)[t.starts + t.lens].any()
