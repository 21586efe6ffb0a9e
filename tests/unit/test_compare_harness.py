"""examples/compare.py: the paired bootstrap against hand-computed distributions, and the harness
end to end on a tiny budget (2 methods x 2 seeds, a tiny model, the countdown task): runs, table,
plot, paired rows, a rejected method skipped with a note, a finished run never rerun."""

from __future__ import annotations

import json
import time

import numpy as np
import orjson
import pytest

from examples import compare  # noqa: E402
from examples.compare import paired_bootstrap  # noqa: E402


def test_paired_bootstrap_exact_on_hand_computed_cases():
    # d = [0.1, 0.3]: resampled means 0.1 (1/4), 0.2 (1/2), 0.3 (1/4)
    assert paired_bootstrap([0.6, 0.8], [0.5, 0.5]) == pytest.approx((0.2, 0.1, 0.3))
    assert paired_bootstrap([0.6, 0.8], [0.5, 0.5], level=0.5) == pytest.approx((0.2, 0.1, 0.2))
    # d = [0, 0, 1]: means 0 (8/27), 1/3 (12/27), 2/3 (6/27), 1 (1/27); the 97.5 % point is 1
    # because P(mean <= 2/3) = 26/27 < 0.975, the 2.5 % point 0
    assert paired_bootstrap([1, 1, 1], [1, 1, 0]) == pytest.approx((1 / 3, 0.0, 1.0))
    # at level 0.9: 5 % -> 0, 95 % -> 2/3 (26/27 = 0.963 >= 0.95)
    assert paired_bootstrap([1, 1, 1], [1, 1, 0], level=0.9) == pytest.approx((1 / 3, 0, 2 / 3))
    # pairing matters: the same accuracies unpaired would vary, paired the difference is constant
    a, b = [0.50, 0.70, 0.90, 0.60], [0.45, 0.65, 0.85, 0.55]
    assert paired_bootstrap(a, b) == pytest.approx((0.05, 0.05, 0.05))


def test_a_difference_is_starred_only_from_five_pairs_on():
    """One seed's interval is a point and two seeds of one sign always exclude 0: neither is
    evidence, so the table marks nothing below five paired seeds."""
    summary = {"equal_tokens": 100.0, "equal_wall_s": {0: 5.0}, "baseline": "grpo", "methods": {
        m: {"seeds": list(range(n)), "initial": 0.1, "acc_tokens": {0: 0.5}, "acc_wall": {0: 0.5},
            "diff_tokens": (0.01, 0.01, 0.01), "diff_wall": (0.02, 0.01, 0.03), "paired": n,
            "branch_share": 0.1, "steps": 3, "wall_s": 5.0} for m, n in (("few", 4), ("five", 5))}}
    rows = {r.split("|")[1].strip(): r for r in compare.table(summary).splitlines()[2:]}
    assert "*" not in rows["few"] and rows["five"].count(" *") == 2


def test_the_default_methods_fit_the_task():
    """Without tools in the config the tool-aware trees are left out (they could not run); with
    tools every method is in."""
    from types import SimpleNamespace

    plain = compare.fitting_methods(SimpleNamespace(sample=SimpleNamespace(tools=())))
    assert "tempo-tool" not in plain and "treerpo-tool" not in plain
    assert {"grpo", "tempo", "tempo-entropy-expand", "ppo"} <= set(plain)
    tools = compare.fitting_methods(SimpleNamespace(sample=SimpleNamespace(tools=("calc",))))
    assert tools == list(compare.METHODS)
    assert compare.parse_args(["--config", "x.toml"]).all_methods


def test_paired_bootstrap_monte_carlo_beyond_eight_pairs_agrees_with_theory():
    rng = np.random.default_rng(1)
    d = rng.normal(0.1, 0.05, size=40)
    mean, lo, hi = paired_bootstrap(d, np.zeros(40), n_boot=20000)
    half = 1.96 * d.std() / np.sqrt(40)   # the bootstrap's normal approximation
    assert mean == pytest.approx(d.mean())
    assert lo == pytest.approx(mean - half, abs=0.004) and hi == pytest.approx(mean + half, abs=0.004)


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    """A tiny countdown-alphabet model, a few train/test prompts and a loop config."""
    from examples.countdown.task import ALPHABET, make_prompts
    from tcli.models.tiny import init_tiny_model

    d = tmp_path_factory.mktemp("compare")
    init_tiny_model(str(d / "model"), seed=0, alphabet=ALPHABET, hidden=32, layers=1, heads=2,
                    kv_heads=1, intermediate=64)
    for name, recs in (("train", make_prompts(8, 0, "train")), ("test", make_prompts(4, 0, "test"))):
        (d / f"{name}.jsonl").write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in recs))
    (d / "task.toml").write_text(f"""
model = "{d / 'model'}"
train_data = "{d / 'train.jsonl'}"
eval_data = "{d / 'test.jsonl'}"
prompts_per_step = 2
threads = 1
[sample]
n = 4
max_new_tokens = 12
prompt_template = "plain"
[verify]
task = "python:examples.countdown.verify:verify_countdown"
workers = 0
[train]
lr = 1e-3
[eval]
limit = 4
""")
    return d


def test_harness_end_to_end_tiny_budget(task_dir, monkeypatch, capsys):
    monkeypatch.setitem(compare.METHODS, "bogus", {"estimator": "grpo", "no_such_setting": 1})
    out = task_dir / "out"
    argv = ["--config", str(task_dir / "task.toml"), "--out", str(out), "--methods",
            "grpo,tempo,bogus", "--seeds", "0,1", "--token-budget", "250", "--eval-every", "2"]
    t0 = time.perf_counter()
    assert compare.main(argv) == 0
    first = time.perf_counter() - t0
    assert first < 90, first
    md = (out / "compare.md").read_text()
    assert "skipped bogus" in md and "'no_such_setting'" in md  # the note says why
    assert "| grpo | 2 |" in md and "| tempo | 2 |" in md
    s = json.loads((out / "compare.json").read_text())
    tempo = s["methods"]["tempo"]
    # the paired row is recomputable from the per-seed accuracies
    g, t = s["methods"]["grpo"]["acc_tokens"], tempo["acc_tokens"]
    assert tempo["diff_tokens"] == pytest.approx(
        list(paired_bootstrap([t["0"], t["1"]], [g["0"], g["1"]])))
    assert "diff_tokens" not in s["methods"]["grpo"] and s["skipped"] == ["bogus"]
    final_wall = {}
    for m in ("grpo", "tempo"):
        for seed in (0, 1):
            ms = [json.loads(x) for x in open(out / f"{m}-s{seed}" / "metrics.jsonl")]
            train = [x for x in ms if x["kind"] == "train"]
            assert 2 <= len(train) <= 6 and train[-1]["sampled_tokens_total"] >= 250
            assert sum(x["kind"] == "eval" for x in ms) >= 2  # step 0 and the last step
            final_wall[str(seed)] = min(final_wall.get(str(seed), 1e9), ms[-1]["wall_time"])
    assert s["equal_wall_s"] == pytest.approx(final_wall)  # per seed: its shortest run
    assert (out / "compare.png").stat().st_size > 10_000
    # rerun: every finished run is reused, nothing is sampled again
    stamp = {p: p.stat().st_mtime_ns for p in out.glob("*-s*/metrics.jsonl")}
    assert compare.main(argv) == 0
    assert {p: p.stat().st_mtime_ns for p in out.glob("*-s*/metrics.jsonl")} == stamp
