"""P2T prefix tree (tcli.algos.tree): the vectorised build against the dict-trie oracle and by hand."""

from __future__ import annotations

import contextlib
import tracemalloc

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import tcli.algos.tree as tree_mod
from tcli.algos.tree import PrefixTree, build_prefix_tree
from tcli.algos.tree_oracle import lcp_matrix, reference_prefix_tree

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


# ----------------------------------------------------------------------------- O(tokens) build

# Every code path of the build, forced: the LCP intervals by the Python stack walk or the sparse
# table, V's pieces expanded by sorting or by the running-maximum fill, and sort keys cut short so
# tied rows are re-sorted by their remaining tokens (the path for one very long response).
PATHS = {
    "default": {},
    "table": {"_SMALL_G": 0},
    "stack": {"_SMALL_G": 10**9},
    "fill": {"_SORT_PIECES": 10**9},
    "sort": {"_SORT_PIECES": 0},
    "short-keys": {"_PAD": 1, "_CELLS": 1},
    "short-keys-table-fill": {"_PAD": 1, "_CELLS": 1, "_SMALL_G": 0, "_SORT_PIECES": 10**9},
}


@contextlib.contextmanager
def forced(path: str):
    saved = {k: getattr(tree_mod, k) for k in PATHS[path]}
    try:
        for k, v in PATHS[path].items():
            setattr(tree_mod, k, v)
        yield
    finally:
        for k, v in saved.items():
            setattr(tree_mod, k, v)


def check(seqs, rewards, path: str = "default") -> None:
    want = reference_prefix_tree(seqs, rewards)
    with forced(path):
        assert_same_tree(build_prefix_tree(seqs, rewards), want)
        assert_same_tree(build_prefix_tree([np.array(s, dtype=np.int64) for s in seqs], rewards), want)


def big_random_group(rng: np.random.Generator, g: int, alphabet: int = 3, max_new: int = 12):
    """G responses that copy an earlier one up to a random point (possibly all of it, or none)
    and continue, plus exact duplicates and empty responses; small alphabets so prefixes collide."""
    seqs: list[list[int]] = [[]]
    for _ in range(g - 1):
        roll = rng.random()
        parent = seqs[int(rng.integers(len(seqs)))]
        if roll < 0.1:
            seqs.append(list(parent))
        elif roll < 0.15:
            seqs.append([])
        else:
            cut = int(rng.integers(0, len(parent) + 1))
            seqs.append(parent[:cut] + rng.integers(0, alphabet, int(rng.integers(0, max_new))).tolist())
    order = rng.permutation(g)
    return [seqs[i] for i in order], rng.random(g).tolist()


@pytest.mark.parametrize("path", list(PATHS))
def test_every_code_path_matches_dict_trie(path):
    rng = np.random.default_rng(99)
    for _ in range(300):
        check(*random_group(rng), path)
    for g in (2, 3, 17, 64, 200):
        for alphabet in (1, 2, 5):
            check(*big_random_group(rng, g, alphabet), path)


@pytest.mark.parametrize("path", ["default", "table", "short-keys"])
def test_group_of_2000_random_responses(path):
    rng = np.random.default_rng(2000)
    seqs, rewards = big_random_group(rng, 2000, alphabet=4, max_new=40)
    check(seqs, rewards, path)


@pytest.mark.parametrize("path", list(PATHS))
def test_hand_groups_on_every_path(path):
    groups = [
        ([[3, 1, 4]], [0.7]),                                   # G = 1
        ([[]], [0.3]),                                          # G = 1, empty
        ([[], [], []], [1.0, 0.0, 0.5]),                        # only empty responses
        ([[1, 2], [1, 2], [1, 2]], [1.0, 0.0, 0.0]),            # all identical
        ([[1], [1, 2], [1, 2, 3], [1, 2, 3, 4]], [1, 0, 1, 0]),  # each a prefix of the next
        ([[1, 2, 3, 4], [1, 2, 3], [1, 2], [1]], [1, 0, 1, 0]),  # ... in the other order
        ([[5, 5, 5], [], [5, 5, 5], [5], [5, 5, 5, 5], []], [1, 0, 0.5, 0.25, 1, 1]),
        ([[0] * 50 + [1], [0] * 50 + [2], [0] * 50, [0] * 50 + [1], [0] * 49], [1, 0, 0, 0.5, 1]),
    ]
    for seqs, rewards in groups:
        check(seqs, [float(x) for x in rewards], path)


def test_duplicates_share_leaf_but_not_their_longer_extension():
    # [1, 2] twice (rewards 1, 0) and [1, 2, 3]: the node after [1, 2] holds all three (V = 2/3),
    # the duplicates' own leaf holds only the two of them (V = 1/2)
    tree = build_prefix_tree([[1, 2], [1, 2, 3], [1, 2]], [1.0, 1.0, 0.0])
    np.testing.assert_allclose(tree.values_of(0), [2 / 3, 2 / 3, 0.5])
    np.testing.assert_allclose(tree.values_of(1), [2 / 3, 2 / 3, 2 / 3, 1.0])
    assert tree.branch_of(1).tolist() == [False, False, True]
    assert tree.branch_of(0).tolist() == [False, False]


def test_node_walks_agree_with_brute_force():
    """The Python stack walk and the sparse table find the same nodes: every LCP interval (with
    its parent's depth and reward sum) and every response's own stretch below it."""
    rng = np.random.default_rng(3)
    for _ in range(1000):
        m = int(rng.integers(0, 70))
        adj = rng.integers(0, int(rng.integers(1, 6)), m)
        outer = np.concatenate(([-1], adj, [-1]))
        deepest = np.maximum(outer[:-1], outer[1:])
        slens = deepest + rng.integers(0, 3, m + 1)
        rs = rng.choice([0.0, 1.0, 0.25], m + 1)
        want = set()
        for k in range(m):
            lo, hi = k, k
            while lo > 0 and adj[lo - 1] >= adj[k]:
                lo -= 1
            while hi + 1 < m and adj[hi + 1] >= adj[k]:
                hi += 1
            want.add((lo, hi + 1, int(adj[k]), int(max(outer[lo], outer[hi + 2])),
                      float(rs[lo : hi + 2].sum())))
        for p in range(m + 1):
            if deepest[p] < slens[p]:
                want.add((p, p, int(slens[p]), int(deepest[p]), float(rs[p])))
        for fn in (tree_mod._nodes_stack, tree_mod._nodes_table):
            got = list(zip(*(a.tolist() for a in fn(adj, rs, slens))))
            assert len(got) == len(want) and set(got) == want, (fn.__name__, adj)


def traced_peak(fn) -> int:
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_memory_is_linear_in_tokens_not_quadratic_in_group_size():
    """10,000 short responses (the ~300 kB group that once peaked at 5.7 GB): the G x G LCP matrix
    alone would be 800 MB; the build stays within ~100 bytes per token."""
    rng = np.random.default_rng(10_000)
    seqs, rewards = big_random_group(rng, 10_000, alphabet=8, max_new=8)
    n = sum(map(len, seqs)) + len(seqs)
    peak = traced_peak(lambda: build_prefix_tree(seqs, rewards))
    assert peak < 150 * n + (16 << 20), (peak, n)


def test_one_long_response_among_many_short_is_not_padded():
    """Padding 5,000 rows to the one 200,000-token response would take 4 GB; the short key with
    re-sorted ties keeps it linear, and the answer exact."""
    rng = np.random.default_rng(5)
    long_ = rng.integers(0, 3, 200_000).tolist()
    seqs = [long_[: int(rng.integers(0, 30))] for _ in range(4_996)]
    seqs += [long_, list(long_), long_[:-1], long_[:150_000] + [7]]
    rewards = rng.random(len(seqs)).tolist()
    n = sum(map(len, seqs)) + len(seqs)
    got = None

    def build():
        nonlocal got
        got = build_prefix_tree(seqs, rewards)

    peak = traced_peak(build)
    assert peak < 150 * n + (16 << 20), (peak, n)
    assert_same_tree(got, reference_prefix_tree(seqs, rewards))


@pytest.mark.parametrize("path", ["default", "short-keys"])
@pytest.mark.parametrize("g", [9, 150])
def test_mixed_list_and_array_rows(path, g):
    """Lists and int64 / uint64 / int32 arrays in one group, some ids beyond uint32; few array
    rows are copied one by one, many go through one mask."""
    rng = np.random.default_rng(g)
    seqs, rewards = big_random_group(rng, g, alphabet=3)
    seqs = [s + [2**40] if i % 5 == 0 else s for i, s in enumerate(seqs)]

    def as_kind(i, s):
        if i % 4 == 0:
            return s
        if i % 4 == 3 and max(s, default=0) < 2**31:
            return np.array(s, dtype=np.int32)
        return np.array(s, dtype=np.uint64 if i % 4 == 2 else np.int64)

    with forced(path):
        got = build_prefix_tree([as_kind(i, s) for i, s in enumerate(seqs)], rewards)
    assert_same_tree(got, reference_prefix_tree(seqs, rewards))
