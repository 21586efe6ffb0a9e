"""Environment tokens (``loss_mask`` 0) in the CPU stages: advantages of every estimator, the TD
chain of TEMPO and GAE, whitening, show-tree, token counts and validation (docs/design.md §3.6)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from rich.console import Console

from conftest import failed, jsonl, oracle_records, run_tcli
from tcli.algos.estimators import ESTIMATORS, Group, needs
from tcli.algos.gae import gae
from tcli.config.stages import AdvantageOptions
from tcli.errors import DataError
from tcli.records import loss_mask
from tcli.show import render_group, tempo_deltas
from tcli.stages.advantages import AdvantageStats, stage_end, stage_group
from tcli.stages.sample import token_counts
from tcli.stages.tree import build_tree_group

# A tree-sampled group (width 2, depth 2, segments of 3 tokens) that every estimator can read:
# node_path/segment_ends for TreeRPO, critic_values for GAE. Each response's first segment has
# a tool result in its middle, its second segment starts with one.
SEGS = {(0, 0): [5, 7, 9, 11, 12, 2], (0, 1): [5, 7, 9, 13, 14, 2],
        (1, 0): [6, 8, 10, 15, 16, 2], (1, 1): [6, 8, 10, 17, 18, 2]}
MASK = [1, 0, 1, 0, 1, 1]
REWARDS = [1.0, 0.0, 0.0, 1.0]


def tree_group(mask=MASK) -> list[dict]:
    rng = np.random.default_rng(0)
    out = []
    for i, ((path, toks), r) in enumerate(zip(SEGS.items(), REWARDS)):
        rec = {"prompt_id": "t", "sample_id": i, "token_ids": toks, "reward": r,
               "node_path": list(path), "segment_ends": [3, 6],
               "critic_values": rng.normal(0, 0.5, len(toks) + 1).round(3).tolist()}
        if mask is not None:
            rec["loss_mask"] = list(mask)
        out.append(rec)
    return out


def run_stage(recs, name: str, **opt) -> tuple[list[dict], AdvantageStats]:
    o = AdvantageOptions(estimator=name, **opt)
    stats = AdvantageStats()
    recs = [dict(r) for r in recs]
    stage_group(recs, o, stats)
    return stage_end(recs, o, stats), stats


ALL = sorted(ESTIMATORS.names())


@pytest.mark.parametrize("whiten", [False, True])
@pytest.mark.parametrize("name", ALL)
def test_every_estimator_gives_zero_advantage_on_environment_tokens(name, whiten):
    recs, stats = run_stage(tree_group(), name, whiten=whiten)
    env = ~np.array(MASK, dtype=bool)
    for r in recs:
        a = np.array(r["advantages"])
        assert (a[env] == 0.0).all(), (name, a)
        assert np.abs(a[~env]).sum() > 0, (name, a)  # the policy tokens still learn
    assert stats.tokens == 4 * sum(MASK)  # statistics count policy tokens only
    # branching policy tokens: token 0 of each response; the branch at token 3 is a tool's
    assert stats.branch_tokens == 4
    assert run_stage(tree_group(None), name)[1].branch_tokens == 8
    if whiten or needs(name).batch_stats:  # whitened over the policy tokens alone
        pol = np.concatenate([np.array(r["advantages"])[~env] for r in recs])
        assert abs(pol.mean()) < 1e-12 and pol.std() == pytest.approx(1.0, rel=1e-6)


@pytest.mark.parametrize("whiten", [False, True])
@pytest.mark.parametrize("name", ALL)
def test_all_ones_mask_is_bit_identical_to_no_mask(name, whiten):
    a, sa = run_stage(tree_group(None), name, whiten=whiten)
    b, sb = run_stage(tree_group([1] * 6), name, whiten=whiten)
    for x, y in zip(a, b):
        assert x["advantages"] == y["advantages"]
        assert x.get("returns") == y.get("returns")
    assert sa.summary() == sb.summary()


def test_tempo_td_jumps_over_an_environment_span():
    """Oracle group, response 0 = [5, 7, 9, 2] with 7 and 9 a tool's output. δ lands on policy
    tokens only: token 0 gets V([5, 7, 9]) − V(root), and token 3, the first policy token after
    the span, starts from V of the prefix that ends with the span."""
    recs = oracle_records()
    recs[0]["loss_mask"] = [1, 0, 0, 1]
    build_tree_group(recs)
    v = recs[0]["values"]
    assert v == pytest.approx([0.5, 2 / 3, 0.5, 1.0, 1.0])  # the tree is the tokens' alone
    d = tempo_deltas(recs)[0]
    assert d.tolist() == pytest.approx([v[3] - v[0], 0.0, 0.0, v[4] - v[3]])
    assert d.sum() == pytest.approx(1.0 - 0.5)  # still r − μ
    sigma = np.std([1, 0, 1, 0], ddof=1)
    a = run_stage(recs, "tempo")[0][0]["advantages"]
    assert a == pytest.approx([(0.5 + 0.5) / (sigma + 1e-6), 0.0, 0.0, 0.5 / (sigma + 1e-6)])


def test_tempo_branch_right_after_an_environment_span():
    """Responses 0 and 1 share [5, 7] and part at token 2; with 7 a tool's output, the branching
    policy token 2 gets V(s_3) − V(s_2) = V([5, 7, x]) − V([5, 7]) as without a mask, and token 0
    gets V([5, 7]) − V(root): the TD chain jumps the span instead of landing on it."""
    recs = oracle_records()
    plain = tempo_deltas(recs)
    for r in recs[:2]:
        r["loss_mask"] = [1, 0, 1, 1]
    d = tempo_deltas(recs)
    for i in range(2):
        assert d[i][2] == plain[i][2] and d[i][3] == plain[i][3]
        assert d[i][1] == 0.0
        assert d[i][0] == pytest.approx(plain[i][0] + plain[i][1])  # = V([5, 7]) − V(root) = 0
    assert d[0].tolist() == pytest.approx([0.0, 0.0, 0.5, 0.0])


def test_gae_chain_skips_environment_tokens():
    """GAE over a masked response equals GAE over the policy tokens alone (V before each policy
    token), scattered back; environment tokens get A = 0 and return V_t."""
    v = np.array([0.1, 0.4, -0.2, 0.3, 0.7, 0.05, 9.0])
    m = np.array([1, 0, 0, 1, 1, 0], dtype=bool)
    a, ret = gae(1.0, v, 0.9, 0.8, m)
    pa, pret = gae(1.0, np.array([0.1, 0.3, 0.7, 9.0]), 0.9, 0.8)
    assert a[m].tolist() == pa.tolist() and ret[m].tolist() == pret.tolist()
    assert (a[~m] == 0).all() and ret[~m].tolist() == v[:6][~m].tolist()
    # one step by hand: the last policy token (4) is terminal after the trailing tool output
    assert pa[-1] == pytest.approx(1.0 - 0.7)
    assert pa[0] == pytest.approx(sum((0.9 * 0.8) ** k * d for k, d in
                                      enumerate([0.9 * 0.3 - 0.1, 0.9 * 0.7 - 0.3, 1.0 - 0.7])))


def test_show_tree_marks_environment_tokens():
    recs = oracle_records()
    recs[0]["loss_mask"] = [1, 0, 0, 1]
    buf = io.StringIO()
    Console(file=buf, width=100).print(render_group(recs))
    out = buf.getvalue()
    assert "⟦env 9⟧ 2" in out  # the node [9, 2] below [5, 7]: 9 is the tool's, 2 the policy's
    assert "r=1  (2 env tokens)" in out
    r = run_tcli(["show-tree", "-"], input=jsonl(recs))
    assert r.returncode == 0 and "⟦env" in r.stdout.decode()


def test_token_counts_count_policy_tokens():
    recs = tree_group()
    for r in recs:
        r["prompt_id"] = "t"
    # 4 leaves of 4 policy tokens; unique: 2 first segments (2 each) + 4 second ones (2 each)
    assert token_counts(recs) == (2 * 2 + 4 * 2, 16)
    assert token_counts(tree_group(None)) == (2 * 3 + 4 * 3, 24)


@pytest.mark.parametrize("value, words", [
    ([1, 0, 1], "has 3 entries, expected 4"),
    ([1, 2, 1, 1], "must be 0 (environment) or 1 (policy), got 2"),
    ([1, True, 1, 1], "got booleans"),
    ([1, 0.0, 1, 1], "got floats"),
    ("1011", "must be a list of 0/1, got str"),
])
def test_bad_loss_mask_is_bad_data(value, words):
    with pytest.raises(DataError, match=words.replace("(", r"\(").replace(")", r"\)")):
        loss_mask({"loss_mask": value}, 4)
    recs = oracle_records()
    recs[2]["loss_mask"] = value
    for cmd in ("build-tree", "advantages", "show-tree"):
        r = run_tcli([cmd, "-"], input=jsonl(recs))
        failed(r, 65, "<stdin>:3:", "field 'loss_mask'", words)


def test_group_without_environment_tokens_has_no_masks():
    recs = oracle_records()
    recs[0]["loss_mask"] = [1, 1, 1, 1]
    assert Group.from_records(recs).masks is None
