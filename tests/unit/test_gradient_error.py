"""Measuring a policy gradient's error (docs/design.md §10): tcli's estimators on a policy whose
exact gradient is known, the statistics (LS scale, rel_mse, cosine, bootstrap CI), the trainer's
``loss_gradient`` and the example's command line end to end on a tiny model.

The known answer: a softmax policy pi = softmax(theta) over K first tokens, each followed by a
fixed continuation, the reward a function of the first token only. J = sum_k pi_k r_k, so
grad J = pi * (r - J); a response's score is e_{y_0} - pi (the continuation does not depend on
theta), and a group's estimate is (1/G) sum_i A_{i,0} (e_{y_i0} - pi)."""

from __future__ import annotations

import itertools
import json
import re

import numpy as np
import orjson
import pytest

from tcli.algos.estimators import Group, compute_advantages
from tcli.algos.gradient_error import bootstrap_ci, cosine, ls_scale, rel_mse
from tcli.config.stages import AdvantageOptions

PI = np.array([0.5, 0.3, 0.2])
R = np.array([1.0, 0.0, 0.5])
EXACT = PI * (R - PI @ R)
G, L = 4, 3  # responses per group, tokens per response


def group_estimate(first: np.ndarray, name: str, opt: AdvantageOptions) -> np.ndarray:
    """One group's gradient estimate from tcli's estimator ``name`` on first tokens ``first``."""
    recs = [{"token_ids": [int(k), 10 + int(k), 20 + int(k)], "reward": float(R[k])}
            for k in first]
    adv = compute_advantages(Group.from_records(recs), name, opt).per_token
    score = np.eye(len(PI))[first] - PI
    return np.array([a[0] for a in adv]) @ score / len(first)


def exact_mean(name: str, opt: AdvantageOptions) -> np.ndarray:
    """E[group estimate] by enumerating all K^G outcomes with their probabilities."""
    total = np.zeros(len(PI))
    for first in itertools.product(range(len(PI)), repeat=G):
        total += np.prod(PI[list(first)]) * group_estimate(np.array(first), name, opt)
    return total


@pytest.fixture(scope="module")
def draws():
    """Per-group estimates of 4000 independent groups, for each estimator checked."""
    rng = np.random.default_rng(0)
    firsts = rng.choice(len(PI), p=PI, size=(4000, G))
    return {name: np.array([group_estimate(f, name, opt) for f in firsts])
            for name, opt in OPTS.items()}


OPTS = {"rloo": AdvantageOptions(estimator="rloo"), "dr_grpo": AdvantageOptions(estimator="dr_grpo"),
        "grpo": AdvantageOptions(estimator="grpo"),
        "tempo": AdvantageOptions(estimator="tempo", td_coef=2.0)}


def test_closed_form_matches_enumeration_for_the_unbiased_estimators():
    # RLOO is unbiased; Dr. GRPO's baseline includes the response itself: (G - 1) / G of it
    assert exact_mean("rloo", OPTS["rloo"]) == pytest.approx(EXACT, abs=1e-12)
    assert exact_mean("dr_grpo", OPTS["dr_grpo"]) == pytest.approx(EXACT * (G - 1) / G, abs=1e-12)


@pytest.mark.parametrize("name", list(OPTS))
def test_monte_carlo_means_agree_with_the_exact_expectation(draws, name):
    est = draws[name]
    se = est.std(axis=0, ddof=1) / np.sqrt(len(est))
    expect = exact_mean(name, OPTS[name])
    assert np.all(np.abs(est.mean(axis=0) - expect) <= 4 * se + 1e-12), (est.mean(0), expect, se)
    # and every one of them points the way of the true gradient
    assert cosine(expect, EXACT) > 0.9


def test_rloo_mse_halves_when_the_budget_doubles(draws):
    """A batch at budget B holds B / (G L) groups; its estimate is their mean, so the MSE of an
    unbiased estimator is Var(group) / m. 2000 batches of 4 groups against 1000 of 8: each mean
    of ||g - grad J||^2 has a relative SE <= sqrt(2 / n) (a chi-square-like square norm), the
    ratio <= sqrt(2/2000 + 2/1000) = 0.055, so 4 SE is +-0.11 around 0.5."""
    est = draws["rloo"]

    def mse(m: int) -> float:
        batches = est[: len(est) // m * m].reshape(-1, m, len(PI)).mean(axis=1)
        return float(((batches - EXACT) ** 2).sum(axis=1).mean())

    ratio = mse(8) / mse(4)
    assert 0.39 < ratio < 0.61, ratio


def test_ls_scale_rel_mse_and_cosine_on_hand_computed_vectors():
    ref = np.array([1.0, 0.0])
    g = np.array([1.0, 1.0])
    assert ls_scale(g, ref) == pytest.approx(0.5)          # c = <g, r> / <g, g>
    assert rel_mse(g, ref) == pytest.approx(0.5)           # ||(0.5, 0.5) - (1, 0)||^2 = 0.5
    assert cosine(g, ref) == pytest.approx(2 ** -0.5)
    assert rel_mse(g, ref) == pytest.approx(1 - cosine(g, ref) ** 2)
    assert rel_mse(-ref, ref) == 1.0 and ls_scale(-ref, ref) == 0.0  # pointing away: c = 0
    assert rel_mse(np.zeros(2), ref) == 1.0 and cosine(np.zeros(2), ref) == 0.0
    with pytest.raises(ValueError):
        rel_mse(g, np.zeros(2))


def test_rel_mse_and_cosine_are_invariant_to_positive_scaling():
    rng = np.random.default_rng(3)
    ref, g = rng.normal(size=50), rng.normal(size=50)
    for c in (1e-6, 0.3, 7.0, 1e6):
        assert rel_mse(c * g, ref) == pytest.approx(rel_mse(g, ref), rel=1e-9)
        assert cosine(c * g, ref) == pytest.approx(cosine(g, ref), rel=1e-9)
    assert rel_mse(3.0 * ref, ref) == pytest.approx(0.0, abs=1e-12)


def test_bootstrap_ci_contains_the_mean_and_is_reproducible():
    x = np.random.default_rng(5).normal(2.0, 1.0, size=40)
    mean, lo, hi = bootstrap_ci(x, seed=1)
    assert mean == pytest.approx(x.mean()) and lo < mean < hi
    half = 1.96 * x.std() / np.sqrt(len(x))  # the normal approximation of the percentile CI
    assert lo == pytest.approx(mean - half, abs=0.1) and hi == pytest.approx(mean + half, abs=0.1)
    assert bootstrap_ci(x, seed=1) == (mean, lo, hi)
    assert bootstrap_ci([1.0, 1.0, 1.0]) == (1.0, 1.0, 1.0)


# ----------------------------------------------------------------------------- on a tiny model

def even_length(text, answer, record):
    """A verifier under which a random tiny model's groups have mixed rewards."""
    return float(len(text) % 2 == 0), {"task": "even_length", "correct": len(text) % 2 == 0}


@pytest.fixture(scope="module")
def task_toml(tmp_path_factory):
    from examples.countdown.task import ALPHABET, make_prompts
    from tcli.models.tiny import init_tiny_model

    d = tmp_path_factory.mktemp("graderr")
    init_tiny_model(str(d / "model"), seed=0, alphabet=ALPHABET, hidden=32, layers=2, heads=2,
                    kv_heads=1, intermediate=64)
    (d / "train.jsonl").write_bytes(b"".join(orjson.dumps(r) + b"\n"
                                             for r in make_prompts(6, 0, "train")))
    (d / "task.toml").write_text(f"""
model = "{d / 'model'}"
train_data = "{d / 'train.jsonl'}"
threads = 1
[sample]
n = 4
max_new_tokens = 10
prompt_template = "plain"
[verify]
task = "python:tests.unit.test_gradient_error:even_length"
workers = 0
""")
    return d / "task.toml"


def test_loss_gradient_takes_no_step_is_linear_in_the_advantages_and_subsets_slice(task_toml):
    import torch

    from examples import gradient_error as ge
    from tcli.stages.advantages import stage_group
    from tcli.train.gradient import select_parameters

    a = ge.parse_args(["--config", str(task_toml), "--prompts", "2", "--methods", "rloo"])
    a.log = lambda s: None
    s = ge.open_setup(a)
    groups, _ = ge.draw(s, s.cfgs["rloo"], s.prompts, 60, seed=1)
    before = {k: v.clone() for k, v in s.trainer.model.state_dict().items()}
    g = ge.gradient(s, s.cfgs["rloo"], groups)
    assert all(torch.equal(v, s.trainer.model.state_dict()[k]) for k, v in before.items())
    assert s.trainer.optimizer_steps == 0 and np.abs(g).max() > 0
    for grp in groups:
        stage_group(grp, s.cfgs["rloo"].advantages)
    recs = [dict(r) for grp in groups for r in grp]
    doubled = [{**r, "advantages": [2 * x for x in r["advantages"]]} for r in recs]
    g2 = s.trainer.loss_gradient(doubled, s.params)
    assert g2 == pytest.approx(2 * s.trainer.loss_gradient(recs, s.params), rel=1e-5, abs=1e-9)
    # the last block alone: the same numbers as those coordinates of the whole gradient
    named = select_parameters(s.trainer.model, "all")
    sub = select_parameters(s.trainer.model, "last:1")
    assert 0 < len(sub) < len(named) and not any(".layers.0." in n for n, _ in sub)
    offsets, at = {}, 0
    for n, p in named:
        offsets[n] = (at, at + p.numel())
        at += p.numel()
    part = s.trainer.loss_gradient(recs, [p for _, p in sub])
    whole = s.trainer.loss_gradient(recs, s.params)
    assert part == pytest.approx(np.concatenate([whole[slice(*offsets[n])] for n, _ in sub]),
                                 rel=1e-5, abs=1e-9)


def test_cli_prints_one_line_per_method_and_budget_and_writes_json(task_toml, tmp_path, capsys):
    from examples import gradient_error as ge

    out = tmp_path / "ge.json"
    argv = ["--config", str(task_toml), "--methods", "rloo,grpo,tempo-tree", "--budgets",
            "40,80", "--repeats", "2", "--prompts", "2", "--ref-samples", "8", "--json", str(out),
            "--markdown", str(tmp_path / "ge.md")]
    assert ge.main(argv) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    num = r"-?\d+\.\d{4}"
    pat = rf"method (\S+) budget (\d+) rel_mse {num} \[{num}, {num}\] cosine {num} \[{num}, {num}\]"
    got = [re.fullmatch(pat, ln).groups() for ln in lines]
    assert sorted(got) == sorted((m, b) for m in ("rloo", "grpo", "tempo-tree") for b in ("40", "80"))
    data = json.loads(out.read_text())
    assert data["params"] == "all" and data["n_params"] > 0 and data["ref_noise"] >= 0
    for row in data["rows"]:
        assert len(row["per_repeat"]) == 2 and row["tokens_mean"] >= row["budget"]
        assert 0.0 <= row["rel_mse"][0] <= 1.0 and row["rel_mse"][1] <= row["rel_mse"][2]
        # paired with RLOO repeat by repeat: the mean difference is the difference of the means
        if row["method"] != "rloo":
            base = next(r for r in data["rows"]
                        if r["method"] == "rloo" and r["budget"] == row["budget"])
            assert row["d_rel_mse_vs_rloo"][0] == pytest.approx(
                row["rel_mse"][0] - base["rel_mse"][0], abs=1e-12)
    table = (tmp_path / "ge.md").read_text().splitlines()
    if data["ref_noise"] > ge.NOISE_WARN:  # 8 reference samples: said above the table
        assert table[0].startswith("warning: the reference's own relative error is")
        table = table[2:]
    assert len(table) == 2 + 6 and table[0].startswith("| budget | method |")
    assert " *" not in "\n".join(table)  # two repeats mark no difference


def test_a_noisy_reference_is_said():
    from examples import gradient_error as ge

    assert ge.noisy_reference(0.05) == ""
    assert "raise --ref-samples" in ge.noisy_reference(0.5)


def test_regime_options_reshape_every_method_and_expand_adds_verified_leaves(task_toml, capsys):
    from examples import gradient_error as ge

    argv = ["--config", str(task_toml), "--methods", "rloo,tempo-tree,tempo-tree-expand",
            "--n", "4", "--temperature", "0.7", "--prompts", "2", "--ref-samples", "8"]
    a = ge.parse_args(argv)
    a.log = lambda s: None
    s = ge.open_setup(a)
    try:
        rloo, tree, exp = (s.cfgs[m] for m in a.methods)
        assert rloo.sample.n == 4 and s.ref_cfg.sample.n == 8
        assert {c.sample.temperature for c in (rloo, tree, exp, s.ref_cfg)} == {0.7}
        assert (tree.sample.depth, exp.sample.depth) == (2, 1) and not tree.expand.enabled
        assert exp.expand.tokens == 60 and ge.sample_key(exp) != ge.sample_key(tree)
        groups, used = ge.draw(s, exp, s.prompts, 30, seed=1)
        new = [r for g in groups for r in g if "expand_round" in r]
        assert new and all("reward" in r for g in groups for r in g)
        assert all(len(r["node_path"]) == 1 and r["node_path"][0] >= 2 for r in new)  # root's
        assert ge.gradient(s, exp, groups).shape == (s.n_params,)
    finally:
        if s.pool is not None:
            s.pool.close()
    out = ge.run(ge.parse_args(argv + ["--budgets", "30", "--repeats", "2"]))
    assert (out["n"], out["temperature"]) == (4, 0.7)
    num = r"-?\d+\.\d{4}"
    pat = rf"method (\S+) budget 30 rel_mse {num} \[{num}, {num}\] cosine {num} \[{num}, {num}\]"
    got = [re.fullmatch(pat, ln).group(1) for ln in capsys.readouterr().out.strip().splitlines()]
    assert sorted(got) == sorted(a.methods)


@pytest.mark.parametrize("argv, words", [
    (["--task", "arith", "--n", "6"], "power of 2"),
    (["--task", "arith", "--temperature", "0"], "--temperature must be > 0"),
    (["--task", "arith", "--methods", "nope"], "unknown method"),
    (["--methods", "rloo"], "--task or --config"),
    (["--task", "arith", "--budgets", "1k"], "--budgets"),
    (["--task", "arith", "--repeats", "1"], "--repeats >= 2"),
    (["--task", "real", "--params", "last:0"], "all or last:K"),
])
def test_cli_rejects_bad_arguments(argv, words, capsys):
    from examples import gradient_error as ge

    with pytest.raises(SystemExit) as e:
        ge.parse_args(argv)
    assert e.value.code == 2 and words in capsys.readouterr().err
