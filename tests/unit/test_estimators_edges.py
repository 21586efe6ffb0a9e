"""Advantage estimators (docs/design.md §4.1, §4.2, §4.5, §4.14) at their edges: huge rewards
(rescaled by a power of two, which must not change any formula), float noise in groups of equal
rewards, and malformed tree segments. Expected values are computed by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tcli.algos.estimators import Group, compute_advantages, group_std
from tcli.config.stages import AdvantageOptions
from tcli.errors import DataError

BIG = 2.0**400  # exact in float64, far beyond the 1e100 rescaling threshold


def group(tokens, rewards):
    return [{"prompt_id": "p", "token_ids": list(t), "reward": r} for t, r in zip(tokens, rewards)]


def adv(recs, name, **opt):
    out = compute_advantages(Group.from_records([dict(r) for r in recs]), name,
                             AdvantageOptions(estimator=name, **opt))
    return [a.tolist() for a in out.per_token]


def test_group_std_of_one_reward_is_zero_and_ddof_follows_the_mode():
    assert group_std(np.array([3.0]), "unbiased") == 0.0
    assert group_std(np.array([3.0]), "population") == 0.0
    assert group_std(np.array([1.0, 0.0]), "unbiased") == pytest.approx(math.sqrt(0.5), rel=1e-15)
    assert group_std(np.array([1.0, 0.0]), "population") == 0.5


def test_grpo_of_huge_rewards_is_the_scale_free_formula():
    # G = 2, r = (c, 0): μ = c/2, σ = c/√2, so A = ±(c/2)/(c/√2 + ε) = ±1/√2 up to ε/c ~ 1e-126
    a = adv(group([[1], [2]], [BIG, 0.0]), "grpo")
    assert a[0][0] == pytest.approx(1 / math.sqrt(2), rel=1e-12)
    assert a[1][0] == pytest.approx(-1 / math.sqrt(2), rel=1e-12)


def test_grpo_of_rewards_near_the_float_maximum():
    # 1e308 = 0.56 · 2^1024: the rescaling power of two must itself stay finite
    a = adv(group([[1], [2]], [1e308, -1e308]), "grpo")
    assert a[0][0] == pytest.approx(1 / math.sqrt(2), rel=1e-12)
    assert a[1][0] == pytest.approx(-1 / math.sqrt(2), rel=1e-12)


@pytest.mark.parametrize("name", ["dr_grpo", "reinforce_pp_baseline"])
def test_mean_baselines_of_huge_rewards_keep_the_reward_units(name):
    # r − μ with r = (c, 0): ±c/2, exact for a power of two
    assert adv(group([[1], [2, 3]], [BIG, 0.0]), name) == [[BIG / 2], [-BIG / 2] * 2]


def test_reinforce_pp_group_step_is_the_raw_reward_even_when_huge():
    assert adv(group([[1], [2]], [BIG, 0.0]), "reinforce_pp") == [[BIG], [0.0]]


@pytest.mark.parametrize("name", ["grpo", "dr_grpo", "rloo", "tempo", "reinforce_pp_baseline"])
@pytest.mark.parametrize("value", [0.1, 3e12 + 0.7])
def test_equal_rewards_give_exactly_zero(name, value):
    """σ = 0 for equal rewards (§4.1): np.std of six equal floats is a few ulps, not 0, and
    r·G − Σr is not 0 either; over σ + ε that noise was an advantage near 1 for 3e12 + 0.7."""
    toks = [[1, 2], [1, 3], [4], [4, 5], [6], [7]]
    assert adv(group(toks, [value] * 6), name) == [[0.0] * len(t) for t in toks]


def test_treerpo_siblings_of_equal_value_get_exactly_zero():
    v = 3e12 + 0.7
    recs = tree_group([((0, 0), [1, 2], v), ((0, 1), [1, 2], v), ((0, 2), [1, 2], v),
                       ((1, 0), [1, 2], 0.0), ((1, 1), [1, 2], 0.0)])
    a = adv(recs, "treerpo", norm="mean")
    # root level: V([0]) = v, V([1]) = 0 → ±v/2; below, equal siblings → 0
    assert [x[1] for x in a] == [0.0] * 5
    assert [x[0] for x in a] == pytest.approx([v / 2] * 3 + [-v / 2] * 2, rel=1e-15)


def test_rloo_hand_computed():
    # r_i − mean of the other two: 1 − 0.5, 0 − 1, 1 − 0.5
    assert adv(group([[1], [2], [3]], [1.0, 0.0, 1.0]), "rloo") == [[0.5], [-1.0], [0.5]]


# ----------------------------------------------------------------------------- TreeRPO segments

def tree_group(leaves):
    """leaves: (node_path, segment_ends, reward); token ids are unique per leaf."""
    return [{"prompt_id": "t", "token_ids": list(range(10 * i, 10 * i + ends[-1])), "reward": r,
             "node_path": list(path), "segment_ends": list(ends)}
            for i, (path, ends, r) in enumerate(leaves)]


@pytest.mark.parametrize("ends", [[2, 2, 4], [-1, 4, 4], [-1, 2, 4]])
def test_treerpo_segment_ends_must_be_non_negative_and_strictly_increasing(ends):
    recs = tree_group([((0, 0, 0), [1, 2, 4], 1.0), ((0, 0, 1), [1, 2, 4], 0.0)])
    recs[0]["segment_ends"] = ends
    with pytest.raises(DataError) as e:
        adv(recs, "treerpo")
    assert e.value.field == "segment_ends"


@pytest.mark.parametrize("ends", [[4], [1, 2, 4]])
def test_treerpo_segment_ends_has_one_entry_per_node_path_entry(ends):
    recs = tree_group([((0, 0), [1, 4], 1.0), ((0, 1), [1, 4], 0.0)])
    recs[0]["segment_ends"] = ends  # ends at len(token_ids), increasing, but one segment off
    with pytest.raises(DataError) as e:
        adv(recs, "treerpo")
    assert e.value.field == "segment_ends"


def test_treerpo_a_leaf_cannot_also_have_children():
    recs = tree_group([((0,), [2], 1.0), ((0, 0), [1, 2], 0.0), ((1,), [2], 1.0)])
    with pytest.raises(DataError) as e:
        adv(recs, "treerpo")
    assert e.value.field == "node_path" and "leaf" in str(e.value)


def huge_tree():
    """Two root children with V = c and V = 0 (c = 2^400), each with two equal leaves."""
    return tree_group([((0, 0), [1, 2], BIG), ((0, 1), [1, 2], BIG),
                       ((1, 0), [1, 2], 0.0), ((1, 1), [1, 2], 0.0)])


def test_treerpo_of_huge_rewards_is_scale_free_under_norm_std():
    # siblings (c, 0): ±(c/2)/(c/√2 + ε) = ±1/√2 up to ε/c
    a = adv(huge_tree(), "treerpo")
    s = 1 / math.sqrt(2)
    assert [x[1] for x in a] == [0.0] * 4
    assert [x[0] for x in a] == pytest.approx([s, s, -s, -s], rel=1e-12)


def test_treerpo_of_huge_rewards_keeps_reward_units_under_norm_mean():
    assert adv(huge_tree(), "treerpo", norm="mean") == [[BIG / 2, 0.0]] * 2 + [[-BIG / 2, 0.0]] * 2


def test_treerpo_prune_std_is_in_reward_units_for_huge_rewards():
    # the std of (c, 0) is c/√2 in reward units, far above 1: nothing is pruned
    a = adv(huge_tree(), "treerpo", prune_std=1.0)
    assert a[0][0] == pytest.approx(1 / math.sqrt(2), rel=1e-12)


@pytest.mark.parametrize("reward, values, field", [
    (1.0, [1e308, -1e308, 0.0], "critic_values"),  # δ_0 = V_1 − V_0 = −2e308
    (1.5e308, [-0.5e308, 0.0], "reward"),          # δ_0 = r − V_0 = 2e308
])
def test_gae_overflow_names_the_field_that_caused_it(reward, values, field):
    recs = [{"prompt_id": "p", "token_ids": list(range(len(values) - 1)), "reward": reward,
             "critic_values": values}]
    with pytest.raises(DataError) as e:
        adv(recs, "gae")
    assert e.value.field == field


def test_treerpo_node_value_is_the_mean_of_three_children():
    # V([0]) = mean(1, 0, 0) = 1/3, V([1]) = 1 (an early leaf); --norm mean: ∓1/3 at the root
    recs = tree_group([((0, 0), [1, 2], 1.0), ((0, 1), [1, 2], 0.0), ((0, 2), [1, 2], 0.0),
                       ((1,), [2], 1.0)])
    a = adv(recs, "treerpo", norm="mean")
    assert [x[0] for x in a] == pytest.approx([-1 / 3] * 3 + [1 / 3], rel=1e-12)
    assert [x[1] for x in a[:3]] == pytest.approx([2 / 3, -1 / 3, -1 / 3], rel=1e-12)


def test_shaped_group_keeps_its_environment_tokens():
    recs = group([[1, 2, 3], [1, 4]], [1.0, 0.0])
    recs[0]["loss_mask"] = [1, 0, 1]
    shaped = Group.from_records(recs).shaped(np.array([0.0, -0.5]))
    out = compute_advantages(shaped, "grpo", AdvantageOptions(estimator="grpo")).per_token
    # shaped rewards 1, −0.5: μ = 0.25, σ = 1.5/√2; the tool's token keeps A = 0
    a = 0.75 / (1.5 / math.sqrt(2) + 1e-6)
    assert out[0][1] == 0.0
    assert out[0][[0, 2]].tolist() == pytest.approx([a, a], rel=1e-12)
    assert out[1].tolist() == pytest.approx([-a, -a], rel=1e-12)


def test_grpo_of_rewards_whose_squares_overflow():
    # (1e200)² overflows float64: σ must come from the rescaled rewards (A = ±1/√2 for G = 2)
    a = adv(group([[1], [2]], [1e200, 0.0]), "grpo")
    assert a[0][0] == pytest.approx(1 / math.sqrt(2), rel=1e-12)
    assert a[1][0] == pytest.approx(-1 / math.sqrt(2), rel=1e-12)


def test_gae_estimator_runs_its_chain_over_policy_tokens_only():
    rec = {"prompt_id": "p", "token_ids": [1, 2, 3], "reward": 1.0, "loss_mask": [1, 0, 1],
           "critic_values": [0.5, 0.25, 0.75, 0.0]}
    out = compute_advantages(Group.from_records([rec]), "gae",
                             AdvantageOptions(estimator="gae", gamma=1.0, lam=0.5))
    # policy chain V = 0.5, 0.75, terminal 0: δ = 0.25, 0.25; A = 0.25 + 0.5·0.25, 0.25
    assert out.per_token[0].tolist() == [0.375, 0.0, 0.25]
    assert out.returns[0].tolist() == [0.875, 0.25, 1.0]  # the tool's token: return = its V
