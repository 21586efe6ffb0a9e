"""Advantage estimators (docs/design.md §4) on hand-computed groups and with property tests."""

from __future__ import annotations

import math

import numpy as np
import orjson
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from tcli.errors import DataError, UsageError
from tcli.algos.estimators import ESTIMATORS, EPS, Group, compute_advantages
from tcli.config.stages import AdvantageOptions
from tcli.stages.tree import build_tree_group

ORACLE_TOKENS = [[5, 7, 9, 2], [5, 7, 8, 2], [5, 6, 9, 2], [4, 6, 2]]
ORACLE_REWARDS = [1, 0, 1, 0]


def group(tokens, rewards, **extra):
    return [dict({"prompt_id": "p", "token_ids": list(t), "reward": r}, **extra)
            for t, r in zip(tokens, rewards)]


def adv(recs, name, **opt):
    out = compute_advantages(Group.from_records([dict(r) for r in recs]), name,
                             AdvantageOptions(estimator=name, **opt))
    return [a.tolist() for a in out.per_token]


def close(got, want, tol=1e-5):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=0, atol=tol)


# ------------------------------------------------------------------ docs/design.md §4.4 oracle

def test_design_oracle_grpo():
    a = adv(group(ORACLE_TOKENS, ORACLE_REWARDS), "grpo")
    close(a, [[0.866025] * 4, [-0.866025] * 4, [0.866025] * 4, [-0.866025] * 3])


def test_design_oracle_tempo():
    a = adv(group(ORACLE_TOKENS, ORACLE_REWARDS), "tempo")
    close([a[0], a[2], a[3]], [[1.154701, 0.577350, 1.732051, 0.866025],
                               [1.154701, 1.443376, 0.866025, 0.866025],
                               [-1.732051, -0.866025, -0.866025]])
    # row 2 mirrors row 1 (same path, opposite reward at the last split)
    close([a[1]], [[-0.577350, -1.154701, -1.732051, -0.866025]])


def _tempo_stage(recs):
    from tcli.stages.advantages import advantages_group

    return advantages_group(Group.from_records(recs), AdvantageOptions(estimator="tempo"))


def test_tempo_recomputes_the_tree_and_accepts_matching_stored_values():
    recs = build_tree_group(group(ORACLE_TOKENS, ORACLE_REWARDS))
    assert all("values" in r and "branch" in r for r in recs)
    out = [r["advantages"] for r in _tempo_stage([dict(r) for r in recs])]
    close(out, adv(group(ORACLE_TOKENS, ORACLE_REWARDS), "tempo"), tol=1e-12)


def test_stale_stored_values_are_a_data_error():
    """Rewards changed after build-tree (verify re-run): the old values must not be combined."""
    recs = build_tree_group(group(ORACLE_TOKENS, ORACLE_REWARDS))
    recs[3]["reward"] = 1
    with pytest.raises(DataError) as e:
        _tempo_stage(recs)
    assert e.value.field == "values" and "stale" in e.value.message
    # grpo does not read the tree: stored values are not its business
    from tcli.stages.advantages import advantages_group
    advantages_group(Group.from_records(recs), AdvantageOptions(estimator="grpo"))


def test_stored_values_of_wrong_length_is_a_data_error():
    recs = build_tree_group(group(ORACLE_TOKENS, ORACLE_REWARDS))
    recs[2]["values"] = recs[2]["values"][:-1]
    with pytest.raises(DataError) as e:
        _tempo_stage(recs)
    assert e.value.field == "values" and e.value.index == 2


# ----------------------------------------------------------------------------- baselines

def test_rloo_and_dr_grpo_formulas():
    recs = group([[1], [2, 3], [4], [5, 6, 7]], [1.0, 0.0, 0.5, 0.25])
    r = np.array([1.0, 0.0, 0.5, 0.25])
    rloo = [(r[i] - np.delete(r, i).mean()) for i in range(4)]
    close(adv(recs, "rloo"), [[rloo[0]], [rloo[1]] * 2, [rloo[2]], [rloo[3]] * 3], tol=1e-12)
    d = r - r.mean()
    close(adv(recs, "dr_grpo"), [[d[0]], [d[1]] * 2, [d[2]], [d[3]] * 3], tol=1e-12)
    g = d / (np.std(r, ddof=1) + EPS)
    close(adv(recs, "grpo"), [[g[0]], [g[1]] * 2, [g[2]], [g[3]] * 3], tol=1e-12)


def test_std_population_vs_unbiased():
    recs = group(ORACLE_TOKENS, ORACLE_REWARDS)
    unbiased = adv(recs, "grpo", std="unbiased")[0][0]
    population = adv(recs, "grpo", std="population")[0][0]
    assert unbiased == pytest.approx(0.5 / (math.sqrt(1 / 3) + EPS), abs=1e-12)
    assert population == pytest.approx(0.5 / (0.5 + EPS), abs=1e-12)
    t_pop = adv(recs, "tempo", std="population")[0]
    close([t_pop], [[x * (math.sqrt(1 / 3) + EPS) / (0.5 + EPS) for x in adv(recs, "tempo")[0]]])


def test_td_coef():
    recs = group(ORACLE_TOKENS, ORACLE_REWARDS)
    grpo = adv(recs, "grpo")
    close(adv(recs, "tempo", td_coef=0.0), grpo, tol=1e-12)
    sigma = math.sqrt(1 / 3) + EPS
    # response 1: delta = V(s_{t+1}) - V(s_t) = 1/6, -1/6, 1/2, 0
    deltas = [1 / 6, -1 / 6, 0.5, 0.0]
    close([adv(recs, "tempo", td_coef=2.0)[0]], [[(0.5 + 2 * d) / sigma for d in deltas]], tol=1e-9)


# ----------------------------------------------------------------------------- degenerate groups

ALL = ["grpo", "dr_grpo", "rloo", "tempo"]


@pytest.mark.parametrize("name", ALL)
def test_zero_variance_group_is_all_zeros(name):
    a = adv(group(ORACLE_TOKENS, [0.7] * 4), name)
    assert [len(x) for x in a] == [4, 4, 4, 3]
    assert all(v == 0.0 for x in a for v in x)


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("std", ["unbiased", "population"])
def test_single_response_group_is_all_zeros(name, std):
    a = adv(group([[1, 2, 3]], [1.0]), name, std=std)
    assert a == [[0.0, 0.0, 0.0]]


@pytest.mark.parametrize("name", ALL)
def test_empty_responses_give_empty_advantages(name):
    a = adv(group([[], [1], []], [1.0, 0.0, 0.0]), name)
    assert [len(x) for x in a] == [0, 1, 0]
    assert all(math.isfinite(v) for x in a for v in x)


def test_identical_duplicates_disagreeing_on_reward():
    # [1,2] twice (rewards 1 and 0) and [1,3] (reward 1): mu = 2/3; the duplicates' shared leaf is 0.5
    recs = group([[1, 2], [1, 2], [1, 3]], [1.0, 0.0, 1.0])
    sigma = np.std([1.0, 0.0, 1.0], ddof=1) + EPS
    mu = 2 / 3
    a = adv(recs, "tempo")
    close(a, [[(1 - mu + 0) / sigma, (1 - mu + (0.5 - mu)) / sigma],
              [(0 - mu + 0) / sigma, (0 - mu + (0.5 - mu)) / sigma],
              [(1 - mu + 0) / sigma, (1 - mu + (1 - mu)) / sigma]], tol=1e-9)


def test_identical_responses_agreeing_give_grpo():
    recs = group([[4, 5, 6]] * 3 + [[4, 5, 7]], [1.0, 1.0, 1.0, 0.0])
    a = adv(recs, "tempo")
    assert a[0] != adv(recs, "grpo")[0]  # the split at the last token carries credit
    b = adv(group([[4, 5, 6]] * 3, [1.0, 1.0, 0.0]), "tempo")
    close(b, adv(group([[4, 5, 6]] * 3, [1.0, 1.0, 0.0]), "grpo"), tol=1e-12)


# ----------------------------------------------------------------------------- properties

rewards_st = st.sampled_from([0.0, 1.0, 0.5, -1.0, 2.0])


@settings(max_examples=150, deadline=None)
@given(tokens=st.lists(st.integers(0, 50), max_size=12), rewards=st.lists(rewards_st, min_size=1, max_size=8),
       td=st.sampled_from([1.0, 0.5, 3.0]), std=st.sampled_from(["unbiased", "population"]))
def test_tempo_equals_grpo_without_branching(tokens, rewards, td, std):
    """All responses identical (or G = 1): no branch anywhere, so delta = 0 and TEMPO = GRPO."""
    recs = group([tokens] * len(rewards), rewards)
    close(adv(recs, "tempo", td_coef=td, std=std), adv(recs, "grpo", std=std), tol=1e-9)


@st.composite
def distinct_groups(draw):
    seqs = draw(st.lists(st.lists(st.integers(0, 2), max_size=7), min_size=2, max_size=8, unique_by=tuple))
    rewards = draw(st.lists(rewards_st, min_size=len(seqs), max_size=len(seqs)))
    return seqs, rewards


@settings(max_examples=200, deadline=None)
@given(distinct_groups(), st.sampled_from([1.0, 0.5, 2.0]))
def test_sum_of_deltas_is_reward_minus_mean(g, td):
    seqs, rewards = g
    r = np.array(rewards)
    assume(np.std(r) > 0)
    from tcli.show import tempo_deltas

    recs = group(seqs, rewards)
    for i, d in enumerate(tempo_deltas(recs)):
        if not seqs[i]:
            continue  # an empty response has no tokens, hence no deltas
        assert d.sum() == pytest.approx(r[i] - r.mean(), abs=1e-9)
    # the estimator itself: sum_t A_t (sigma + eps) = T (r - mu) + lambda (r - mu)
    sigma = np.std(r, ddof=1) + EPS
    for i, a in enumerate(adv(recs, "tempo", td_coef=td)):
        t = len(seqs[i])
        if t:
            assert sum(a) * sigma == pytest.approx((t + td) * (r[i] - r.mean()), abs=1e-7)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.lists(st.integers(0, 3), max_size=5), rewards_st), min_size=1, max_size=6),
       st.sampled_from(ALL + ["reinforce_pp", "reinforce_pp_baseline"]))
def test_never_nan(grp, name):
    a = adv(group([t for t, _ in grp], [r for _, r in grp]), name)
    assert [len(x) for x in a] == [len(t) for t, _ in grp]
    assert all(math.isfinite(v) for x in a for v in x)


# ----------------------------------------------------------------------------- REINFORCE++

# two groups: rewards 1, 0, 0.5 with 2, 1, 3 tokens; rewards 0, 0.2 with 1, 3 tokens
PP_GROUPS = [(["p", [[1, 2], [3], [4, 5, 6]], [1.0, 0.0, 0.5]]),
             (["q", [[7], [8, 9, 10]], [0.0, 0.2]])]


def _batch(name, **opt):
    """The advantages stage as `tcli advantages` runs it: group by group, then stage_end."""
    from tcli.stages.advantages import stage_end, stage_group

    opts = AdvantageOptions(estimator=name, **opt)
    recs = []
    for pid, toks, rw in PP_GROUPS:
        recs += stage_group([dict(r, prompt_id=pid) for r in group(toks, rw)], opts).records
    return [r["advantages"] for r in stage_end(recs, opts)]


def test_reinforce_pp_normalises_the_reward_over_the_whole_batch():
    """docs/design.md §4.14: the 10 tokens carry r = 1,1 0 .5,.5,.5 | 0 .2,.2,.2: mean 0.41,
    population std sqrt(1.189 / 10) = 0.344819; A = (r - 0.41) / 0.344819 on every token."""
    close(_batch("reinforce_pp"), [[1.711044] * 2, [-1.189030], [0.261007] * 3,
                                   [-1.189030], [-0.609016] * 3])


def test_reinforce_pp_baseline_subtracts_the_group_mean_then_normalises_over_the_batch():
    """Group means 0.5 and 0.1: r - mean = .5,.5 -.5 0,0,0 | -.1 .1,.1,.1 over the 10 tokens:
    mean 0.07, population std sqrt(0.741 / 10) = 0.272213."""
    close(_batch("reinforce_pp_baseline"), [[1.579645] * 2, [-2.093947], [-0.257151] * 3,
                                            [-0.624511], [0.110208] * 3])


def test_reinforce_pp_statistics_span_groups_not_one_group():
    """One group alone is normalised on its own tokens: a different answer than in the batch."""
    from tcli.stages.advantages import stage_end, stage_group

    opts = AdvantageOptions(estimator="reinforce_pp")
    pid, toks, rw = PP_GROUPS[0]
    alone = stage_end(stage_group(group(toks, rw), opts).records, opts)
    assert alone[0]["advantages"][0] != pytest.approx(1.711044, abs=1e-3)


def test_reinforce_pp_in_the_cli_buffers_the_whole_input():
    from conftest import run_tcli

    lines = b"".join(orjson.dumps(dict(r, prompt_id=pid)) + b"\n"
                     for pid, toks, rw in PP_GROUPS for r in group(toks, rw))
    out = run_tcli(["advantages", "-e", "reinforce_pp_baseline", "--stats"], input=lines)
    assert out.returncode == 0, out.stderr
    got = [orjson.loads(x)["advantages"] for x in out.stdout.splitlines()]
    close(got, _batch("reinforce_pp_baseline"), tol=1e-12)
    # --stats reports the mean |A| of the normalised advantages
    want = sum(abs(v) for a in got for v in a) / 10
    assert f"{want:.4f}" in out.stderr.decode()


def test_reinforce_pp_huge_rewards_stay_finite():
    from tcli.stages.advantages import stage_end, stage_group

    opts = AdvantageOptions(estimator="reinforce_pp")
    recs = stage_group(group([[1], [2]], [1e308, -1e308]), opts).records
    a = [x for r in stage_end(recs, opts) for x in r["advantages"]]
    assert a == pytest.approx([1.0, -1.0], abs=1e-6)


def test_tempo_of_huge_rewards_is_the_scale_free_formula():
    """A = ((r - mu) + delta) / (sigma + eps) for rewards c x ORACLE_REWARDS is, as c grows, the
    scale-free ((r - mu) + delta) / sigma: rescaling huge rewards by a power of two must scale
    eps with them, as the unscaled arithmetic of c = 2^40 does."""
    huge = adv(group(ORACLE_TOKENS, [2.0**400 * r for r in ORACLE_REWARDS]), "tempo")
    big = adv(group(ORACLE_TOKENS, [2.0**40 * r for r in ORACLE_REWARDS]), "tempo")
    # row 4 by hand: sigma = sqrt(1/3); delta = V([4]) - V() = 0 - 0.5 on its first token, 0 on
    # the others: -1 / sigma = -sqrt(3), then -0.5 / sigma = -sqrt(3) / 2 twice
    s3 = math.sqrt(3)
    # eps / sigma ~ 1e-6 / (2^40 x 0.58) ~ 2e-18 for c = 2^40, ~1e-126 for 2^400; float64 ~1e-15
    assert huge[3] == pytest.approx([-s3, -s3 / 2, -s3 / 2], rel=1e-12)
    for h, b in zip(huge, big):
        assert h == pytest.approx(b, rel=1e-12)


# ----------------------------------------------------------------------------- overlong shaping

def test_overlong_penalty_hand_computed():
    """docs/design.md §4.15: L_max 10, buffer 4: 0 up to 6 tokens, then -(L - 6) / 4 down to -1
    at 10."""
    from tcli.algos.shaping import overlong_penalty

    lens = np.array([0, 5, 6, 7, 9, 10])
    recs = [{"token_ids": [1] * n, "max_new_tokens": 10} for n in lens]
    assert overlong_penalty(recs, lens, 4, 1.0).tolist() == [0, 0, 0, -0.25, -0.75, -1.0]
    assert overlong_penalty(recs, lens, 4, 0.5).tolist() == [0, 0, 0, -0.125, -0.375, -0.5]
    assert overlong_penalty(recs, lens, 0, 1.0).tolist() == [0.0] * 6  # off: the cap is not read


def test_overlong_shaping_feeds_the_estimator_and_keeps_the_reward():
    """rewards 1, 1, 0, 0 with 5, 8, 9, 10 tokens (cap 10, buffer 4): penalties 0, -0.5, -0.75, -1;
    shaped 1, 0.5, -0.75, -1, mean -0.0625; dr_grpo = shaped - mean."""
    from tcli.stages.advantages import AdvantageStats, stage_group

    recs = group([[1] * 5, [2] * 8, [3] * 9, [4] * 10], [1, 1, 0, 0], max_new_tokens=10)
    stats = AdvantageStats()
    out = stage_group(recs, AdvantageOptions(estimator="dr_grpo", overlong_buffer=4), stats).records
    close([r["advantages"] for r in out], [[1.0625] * 5, [0.5625] * 8, [-0.6875] * 9,
                                           [-0.9375] * 10], tol=1e-12)
    assert [r["overlong_penalty"] for r in out] == [0.0, -0.5, -0.75, -1.0]
    assert [r["reward"] for r in out] == [1, 1, 0, 0]
    assert stats.summary()["reward_mean"] == 0.5  # the verifier's rewards


def test_overlong_shaping_keeps_stored_values_of_the_recorded_rewards():
    """build-tree's values are V of the recorded rewards; shaping does not make them stale."""
    from tcli.stages.advantages import stage_group

    recs = build_tree_group(group(ORACLE_TOKENS, ORACLE_REWARDS, max_new_tokens=4))
    out = stage_group(recs, AdvantageOptions(estimator="tempo", overlong_buffer=1)).records
    assert [r["overlong_penalty"] for r in out] == [-1.0, -1.0, -1.0, 0.0]


@pytest.mark.parametrize("cap, words", [(None, "is missing"), (2, "has 3 tokens"),
                                        (True, "integer"), (0, "integer")])
def test_overlong_shaping_needs_the_sampling_cap(cap, words):
    from tcli.stages.advantages import stage_group

    recs = group([[1, 2], [1, 2, 3]], [1, 0])
    if cap is not None:
        recs[1]["max_new_tokens"] = cap
    recs[0]["max_new_tokens"] = 5
    with pytest.raises(DataError, match=words) as e:
        stage_group(recs, AdvantageOptions(estimator="grpo", overlong_buffer=1))
    assert e.value.field == "max_new_tokens" and e.value.index == 1


# ----------------------------------------------------------------------------- TreeRPO

def tree_group(leaves):
    """leaves: (node_path, segment lengths, reward); token ids are unique per segment."""
    recs = []
    for path, seg_lens, r in leaves:
        ends = np.cumsum(seg_lens).tolist()
        toks = list(range(sum(seg_lens)))
        recs.append({"prompt_id": "t", "token_ids": toks, "reward": r, "node_path": list(path),
                     "segment_ends": ends})
    return recs


def test_treerpo_balanced_tree():
    # two levels, two children each; V(A) = 0.5, V(B) = 1
    recs = tree_group([((0, 0), [2, 3], 1.0), ((0, 1), [2, 1], 0.0),
                       ((1, 0), [1, 2], 1.0), ((1, 1), [1, 1], 1.0)])
    a = adv(recs, "treerpo")
    s = math.sqrt(0.125) + EPS      # std of (0.5, 1), unbiased
    leaf = 0.5 / (math.sqrt(0.5) + EPS)  # siblings (1, 0) under A
    close(a, [[-0.25 / s] * 2 + [leaf] * 3, [-0.25 / s] * 2 + [-leaf],
              [0.25 / s] + [0.0] * 2, [0.25 / s] + [0.0]], tol=1e-9)


def unbalanced():
    """A = [0] holds [0,0] (three leaves, all reward 1) and the early leaf [0,1] (reward 0);
    B = [1] holds leaves 1 and 0. Children-mean: V([0,0]) = 1, V(A) = 0.5 = V(B).
    A leaf-count mean would give V(A) = 0.75 instead."""
    return tree_group([((0, 0, 0), [2, 2, 1], 1.0), ((0, 0, 1), [2, 2, 2], 1.0),
                       ((0, 0, 2), [2, 2, 1], 1.0), ((0, 1), [2, 3], 0.0),
                       ((1, 0), [1, 1], 1.0), ((1, 1), [1, 2], 0.0)])


def test_treerpo_unbalanced_children_mean_not_leaf_mean():
    a = adv(unbalanced(), "treerpo")
    inner = 0.5 / (math.sqrt(0.5) + EPS)  # siblings [0,0] (V=1) and [0,1] (V=0)
    lv = 0.5 / (math.sqrt(0.5) + EPS)     # siblings [1,0], [1,1]
    # root level: V(A) = V(B) = 0.5 -> zero variance -> 0 (leaf-count means 0.75 vs 0.5 would not be)
    close(a, [[0.0] * 2 + [inner] * 2 + [0.0], [0.0] * 2 + [inner] * 2 + [0.0] * 2,
              [0.0] * 2 + [inner] * 2 + [0.0], [0.0] * 2 + [-inner] * 3,
              [0.0, lv], [0.0, -lv, -lv]], tol=1e-9)


def test_treerpo_norm_mean_on_unbalanced_tree():
    recs = unbalanced()
    recs[5]["reward"] = 1.0   # now V(B) = 1, V(A) = 0.5: root siblings differ by 0.5
    a = adv(recs, "treerpo", norm="mean")
    assert a[0][:2] == pytest.approx([-0.25, -0.25])   # V(A) - mean = 0.5 - 0.75
    assert a[4] == pytest.approx([0.25, 0.0])           # V(B) - mean; B's leaves tie
    assert a[3] == pytest.approx([-0.25, -0.25, -0.5, -0.5, -0.5])  # [0,1]: 0 - mean(1, 0)


def test_treerpo_prune_std():
    recs = tree_group([((0, 0), [1, 1], 1.0), ((0, 1), [1, 1], 0.9),
                       ((1, 0), [1, 1], 1.0), ((1, 1), [1, 1], 0.0)])
    a = adv(recs, "treerpo", prune_std=0.2)
    # siblings under [0] have std 0.0707 < 0.2 -> 0; under [1] std 0.707 stays
    assert a[0][1] == 0.0 and a[1][1] == 0.0
    assert a[2][1] == pytest.approx(0.5 / (math.sqrt(0.5) + EPS))
    assert a[0][0] == pytest.approx(-a[2][0]) and a[0][0] != 0.0
    none_pruned = adv(recs, "treerpo")
    assert none_pruned[0][1] != 0.0


def test_treerpo_prune_std_keeps_a_std_equal_to_it():
    """Only a std *below* --prune-std zeroes a sibling group (docs/design.md §4.5): siblings 1, 0
    have population std exactly 0.5, so prune_std = 0.5 keeps them."""
    recs = tree_group([((0, 0), [1, 1], 1.0), ((0, 1), [1, 1], 0.0),
                       ((1, 0), [1, 1], 1.0), ((1, 1), [1, 1], 0.0)])
    a = adv(recs, "treerpo", std="population", prune_std=0.5)
    leaf = 0.5 / (0.5 + EPS)  # (V - mean) / (std + eps) = (1 - 0.5) / (0.5 + eps)
    # the root's children both have V = 0.5 (no spread): their segment gets 0
    close(a, [[0.0, leaf], [0.0, -leaf], [0.0, leaf], [0.0, -leaf]], tol=1e-12)
    pruned = adv(recs, "treerpo", std="population", prune_std=0.5000001)
    assert pruned == [[0.0, 0.0]] * 4


@pytest.mark.parametrize("name", sorted(ESTIMATORS.names()))
def test_zero_variance_share_is_the_share_of_groups_whose_rewards_are_all_equal(name):
    """From the rewards, whatever the estimator: gae gives an all-equal group non-zero advantages
    and still counts it; treerpo's prune_std zeroes a group whose rewards differ and does not;
    three rewards of 0.1 have a float std of 1.7e-17 and are still all equal (§4.1)."""
    from tcli.stages.advantages import AdvantageStats, stage_group

    four = [((0, 0), [1, 1]), ((0, 1), [1, 1]), ((1, 0), [1, 1]), ((1, 1), [1, 1])]
    three = [((0, 0), [1, 1]), ((0, 1), [1, 2]), ((1,), [2])]
    groups = [(four, [0.0] * 4), (four, [1.0, 0.0, 1.0, 1.0]), (three, [0.1] * 3),
              ([((0,), [3])], [1.0]), (three, [2.0, 0.0, 0.0])]
    opt = AdvantageOptions(estimator=name, prune_std=10.0 if name == "treerpo" else 0.0)
    stats = AdvantageStats(branch=False)
    for leaves, rewards in groups:
        recs = tree_group([(p, s, r) for (p, s), r in zip(leaves, rewards)])
        for r in recs:
            r["critic_values"] = [0.25] * (len(r["token_ids"]) + 1)
        stage_group(recs, opt, stats)
    assert stats.summary()["zero_variance_share"] == 3 / 5


def test_treerpo_early_leaf_at_the_root_level():
    recs = tree_group([((0, 0), [2, 2], 1.0), ((0, 1), [2, 1], 1.0), ((1,), [3], 0.0)])
    a = adv(recs, "treerpo")
    s = math.sqrt(0.5) + EPS  # std of (1, 0)
    close(a, [[0.5 / s] * 2 + [0.0] * 2, [0.5 / s] * 2 + [0.0], [-0.5 / s] * 3], tol=1e-9)


def test_treerpo_needs_node_paths():
    recs = group(ORACLE_TOKENS, ORACLE_REWARDS, node_path=[], segment_ends=[])
    with pytest.raises(DataError) as e:
        adv(recs, "treerpo")
    assert e.value.field == "node_path" and "tree" in str(e.value)


@pytest.mark.parametrize("mutate, field", [
    (lambda rs: rs[1].update(node_path=[0, 0]), "node_path"),           # two leaves share a path
    (lambda rs: rs[0].update(segment_ends=[2, 4]), "segment_ends"),     # does not end at len
    (lambda rs: rs[0].update(segment_ends=[2]), "segment_ends"),        # wrong length
    (lambda rs: rs[0].pop("node_path"), "node_path"),
    (lambda rs: rs[0].update(node_path=[0, True]), "node_path"),
])
def test_treerpo_bad_tree_records(mutate, field):
    recs = tree_group([((0, 0), [2, 3], 1.0), ((0, 1), [2, 1], 0.0), ((1,), [1], 1.0)])
    mutate(recs)
    with pytest.raises(DataError) as e:
        adv(recs, "treerpo")
    assert e.value.field == field


def test_treerpo_zero_variance_and_single_child():
    a = adv(tree_group([((0, 0), [1, 1], 1.0), ((0, 1), [1, 1], 1.0)]), "treerpo")
    assert a == [[0.0, 0.0], [0.0, 0.0]]


def test_unknown_estimator_lists_valid_names():
    with pytest.raises(UsageError) as e:
        adv(group([[1]], [1.0]), "nope")
    for name in ("grpo", "dr_grpo", "rloo", "tempo", "treerpo"):
        assert name in str(e.value)
    assert set(ALL + ["treerpo"]) <= set(ESTIMATORS.names())


def test_bad_record_is_located_by_index():
    recs = group(ORACLE_TOKENS, ORACLE_REWARDS)
    recs[2]["reward"] = "high"
    with pytest.raises(DataError) as e:
        adv(recs, "grpo")
    assert e.value.field == "reward" and e.value.index == 2


def test_token_ids_accept_numpy_ints_but_not_bools():
    recs = group([[1, 2], [1, 3]], [1.0, 0.0])
    recs[0]["token_ids"] = [np.int64(1), np.uint32(2)]
    assert adv(recs, "tempo")[0] == adv(group([[1, 2], [1, 3]], [1.0, 0.0]), "tempo")[0]
    recs[1]["token_ids"] = [1, True]
    with pytest.raises(DataError) as e:
        adv(recs, "tempo")
    assert (e.value.field, e.value.index) == ("token_ids", 1) and "booleans" in str(e.value)
