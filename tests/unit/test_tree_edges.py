"""P2T prefix tree (docs/design.md §4.3) at the edges of its token-id encoding: ids equal to the
padding value of a narrower key, the largest id, -1, and rows of mixed integer kinds. Each build
is compared with the dict-trie oracle or with values computed by hand."""

from __future__ import annotations

import numpy as np
import pytest

from tcli.algos.tree import build_prefix_tree
from tcli.algos.tree_oracle import reference_prefix_tree

U32_MAX = 2**32 - 1  # the END padding of uint32 keys: a token id with it needs uint64 keys


def assert_same_tree(got, want):
    assert np.array_equal(got.lens, want.lens) and np.array_equal(got.starts, want.starts)
    np.testing.assert_allclose(got.flat_values, want.flat_values, rtol=0, atol=1e-12)
    assert [b.tolist() for b in got.branch] == [b.tolist() for b in want.branch]


@pytest.mark.parametrize("as_array", [False, True])
def test_token_id_equal_to_the_uint32_padding_is_a_real_token(as_array):
    # [1] ends where [1, U32_MAX] goes on: a uint32 key could not tell them apart
    seqs = [[1], [1, U32_MAX], [2]]
    rewards = [1.0, 0.0, 0.5]
    rows = [np.array(s, dtype=np.int64) for s in seqs] if as_array else seqs
    got = build_prefix_tree(rows, rewards)
    assert_same_tree(got, reference_prefix_tree(seqs, rewards))
    # by hand: V(root) = 0.5, V([1]) = mean(1, 0) = 0.5, the leaves keep their own rewards
    assert got.values[0].tolist() == [0.5, 1.0]
    assert got.values[1].tolist() == [0.5, 0.5, 0.0]
    assert got.branch[1].tolist() == [True, True]  # [1] ends at the node after token 0


@pytest.mark.parametrize("seqs", [[np.array([2**64 - 1], dtype=np.uint64)],
                                  [np.array([1, -1])],
                                  [np.array([5], dtype=np.uint64), np.array([-1], dtype=np.int64)]])
def test_rejects_ids_outside_the_key_range(seqs):
    with pytest.raises(ValueError, match="token ids"):
        build_prefix_tree(seqs, [1.0] * len(seqs))


def test_mixed_signed_and_unsigned_rows_keep_large_ids_exact():
    # int64 + uint64 would promote to float64, where 2^60 and 2^60 + 1 are the same number
    seqs = [np.array([2**60], dtype=np.int64), np.array([2**60 + 1], dtype=np.uint64)]
    got = build_prefix_tree(seqs, [1.0, 0.0])
    assert [v.tolist() for v in got.values] == [[0.5, 1.0], [0.5, 0.0]]
    assert [b.tolist() for b in got.branch] == [[True], [True]]


def test_from_lists_keeps_every_leaf_slot_false_like_the_build():
    # branch counts are taken over the whole flat array, so the unused slot after each response
    # must not read as a branch in a rebuilt tree either
    seqs, rewards = [[5, 7, 9], [5, 7], [4]], [1.0, 0.0, 0.5]
    built = build_prefix_tree(seqs, rewards)
    again = type(built).from_lists([v.tolist() for v in built.values],
                                   [b.tolist() for b in built.branch])
    assert again.flat_branch.tolist() == built.flat_branch.tolist()
    assert not again.flat_branch[again.starts + again.lens].any()
