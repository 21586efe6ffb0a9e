"""Environment-token helpers (docs/design.md §3.6) on hand-computed arrays: TEMPO's δ jumping
over environment spans, the compressed value chain GAE runs on, and the copies they return."""

from __future__ import annotations

import numpy as np

from tcli.algos.gae import gae
from tcli.algos.masks import (any_masked, compress, expand, policy_count, policy_td,
                              zero_environment)

# all values are multiples of 1/4: every difference below is exact in float64


def test_policy_td_last_policy_token_reaches_the_leaf_value():
    values = np.array([0.5, 0.25, 0.75, 0.0, 1.0])  # V(s_0..s_3), V(leaf)
    mask = np.array([True, False, False, True])
    # policy tokens 0 and 3: δ_0 = V(s_3) − V(s_0), δ_3 = V(leaf) − V(s_3)
    assert policy_td(values, mask).tolist() == [-0.5, 0.0, 0.0, 1.0]
    assert policy_td(values, mask).sum() == values[-1] - values[0]


def test_policy_td_single_policy_token_spans_to_the_leaf():
    values = np.array([0.0, 0.25, 0.5, 1.0])
    mask = np.array([False, True, False])
    assert policy_td(values, mask).tolist() == [0.0, 0.75, 0.0]


def test_policy_td_without_policy_tokens_is_zero():
    assert policy_td(np.array([0.25, 0.5, 1.0]), np.array([False, False])).tolist() == [0.0, 0.0]


def test_policy_td_all_policy_is_the_plain_difference():
    values = np.array([0.25, 0.5, 0.0, 1.0])
    assert policy_td(values, np.ones(3, dtype=bool)).tolist() == np.diff(values).tolist()


def test_compress_keeps_policy_values_and_the_value_after_the_last_token():
    values = np.array([0.0, 1.0, 2.0, 3.0, 4.0])
    pos, v = compress(values, np.array([True, False, True, False]))
    assert pos.tolist() == [0, 2]
    assert v.tolist() == [0.0, 2.0, 4.0]  # V before tokens 0 and 2, then V_T


def test_expand_returns_a_copy_and_leaves_fill_alone():
    fill = np.array([7.0, 8.0, 9.0])
    out = expand(np.array([1]), np.array([-1.0]), fill)
    assert out.tolist() == [7.0, -1.0, 9.0]
    assert fill.tolist() == [7.0, 8.0, 9.0]


def test_masked_gae_does_not_write_into_the_callers_values():
    values = np.array([0.5, 0.25, 0.75, 0.0])
    before = values.copy()
    adv, ret = gae(1.0, values, 1.0, 1.0, np.array([True, False, True]))
    assert values.tolist() == before.tolist()
    # γ = λ = 1 over policy tokens 0, 2: A_2 = r − V_2, A_0 = r − V_0; environment: A 0, return V
    assert adv.tolist() == [0.5, 0.0, 0.25]
    assert ret.tolist() == [1.0, 0.25, 1.0]


def test_policy_count_counts_policy_tokens_only():
    masks = [None, np.array([True, False, False]), np.array([False, True])]
    assert policy_count(masks, [4, 3, 2]) == 4 + 1 + 1


def test_any_masked_and_zero_environment():
    assert not any_masked([None, np.ones(2, dtype=bool)])
    assert any_masked([None, np.array([True, False])])
    per_token = [np.array([1.0, 2.0]), np.array([3.0, 4.0, 5.0])]
    zero_environment(per_token, [None, np.array([False, True, False])])
    assert [a.tolist() for a in per_token] == [[1.0, 2.0], [0.0, 4.0, 0.0]]
