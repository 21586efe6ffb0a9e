"""Promises of docs/design.md checked end to end: settings that would change nothing are never
silently ignored."""

from __future__ import annotations

import pytest

from conftest import loop_config, read_metrics


def test_eval_settings_with_eval_every_0_are_said_to_be_ignored(loop_model, tmp_path):
    """With eval_data but every = 0 the other [eval] settings are unread: the loop runs (a config
    file's evaluation turned off by --eval-every 0 is common) and says so, naming them."""
    from tcli.loop import run_loop

    said: list[str] = []
    cfg = loop_config(loop_model, tmp_path / "run", steps=1, eval_every=0, eval_limit=3,
                      eval_temperature=0.5)
    run_loop(cfg, log=said.append)
    warning = [s for s in said if "eval.every" in s]
    assert len(warning) == 1, said
    assert warning[0].startswith("warning: --eval-temperature (eval.temperature), --eval-limit "
                                 "(eval.limit) are set")
    assert "never evaluates" in warning[0]
    assert [m["kind"] for m in read_metrics(tmp_path / "run")] == ["train"]


def test_eval_every_0_alone_says_nothing(loop_model, tmp_path):
    from tcli.loop import run_loop

    said: list[str] = []
    run_loop(loop_config(loop_model, tmp_path / "run", steps=1, eval_every=0), log=said.append)
    assert not [s for s in said if "eval" in s], said


def _documented_metrics() -> dict[str, set[str]]:
    """The key lists of docs/design.md §5.5: 'every record', 'every train record', ..."""
    import re
    from pathlib import Path

    text = (Path(__file__).parents[2] / "docs" / "design.md").read_text()
    lists = {}
    for label in ("every record", "every train record", "some train records",
                  "every eval record"):
        item = re.search(rf"^- {label}: (.*?)(?=^- |^$)", text, re.M | re.S)
        assert item, f"docs/design.md lists no '{label}'"
        lists[label] = set(re.findall(r"`([^`]+)`", item.group(1)))
    return lists


def _is_documented(key: str, names: set[str]) -> bool:
    import re

    pattern = {"critic_*": r"critic_\w+", "rewards/<task>": r"rewards/.+", "pass@k": r"pass@\d+"}
    return key in names or any(re.fullmatch(pattern.get(n, re.escape(n)), key) for n in names)


@pytest.mark.parametrize("flags", [{}, {"estimator": "ppo", "critic_lr": 1e-3}, {"refill": True},
                                   {"task": ["arith", "gsm8k"]},
                                   {"ref_model": "policy", "kl_coef": 0.01, "tis_cap": 2.0}])
def test_metrics_records_hold_the_documented_keys(loop_model, tmp_path, flags):
    """Every key `tcli loop` writes to metrics.jsonl is in docs/design.md's list, and every key
    the list says every record holds is written."""
    from tcli.loop import run_loop

    doc = _documented_metrics()
    flags = {k: loop_model[1] if v == "policy" else v for k, v in flags.items()}
    run_loop(loop_config(loop_model, tmp_path / "run", steps=2, **flags), log=lambda s: None)
    records = read_metrics(tmp_path / "run")
    assert {m["kind"] for m in records} == {"train", "eval"}
    for m in records:
        every = doc["every record"] | doc[f"every {m['kind']} record"]
        allowed = every | (doc["some train records"] if m["kind"] == "train" else set())
        undocumented = [k for k in m if not _is_documented(k, allowed)]
        assert not undocumented, (m["kind"], undocumented)
        missing = [n for n in every if not any(_is_documented(k, {n}) for k in m)]
        assert not missing, (m["kind"], missing)


def test_plot_draws_each_run_in_one_color_and_names_every_curve(tmp_path, monkeypatch):
    """A run without evaluation beside one with it: the second run's accuracy is drawn in its
    own color (not in the first run's, whose place it takes in the eval panels), and a run with
    eval records alone still gets a legend entry."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import orjson

    from tcli.plot import plot_runs

    def run(name, kinds):
        d = tmp_path / name
        d.mkdir()
        d.joinpath("metrics.jsonl").write_bytes(b"".join(
            orjson.dumps({"kind": k, "step": s, "reward_mean": 0.1, "accuracy": 0.5,
                          "wall_time": float(s)}) + b"\n" for s in (1, 2) for k in kinds))
        return str(d)

    figs = []
    subplots = plt.subplots
    monkeypatch.setattr(plt, "subplots", lambda *a, **k: figs.append(subplots(*a, **k)) or figs[-1])
    runs = [run("no_eval", ["train"]), run("both", ["train", "eval"]), run("eval_only", ["eval"])]
    assert plot_runs(runs, str(tmp_path / "fig.png")) == 2 + 2 * 2 + 2
    fig, axes = figs[0]
    colors: dict[str, set] = {}
    for ax in axes.ravel():
        for line in ax.get_lines():
            colors.setdefault(line.get_label(), set()).add(line.get_color())
    assert set(colors) == {"no_eval", "both", "eval_only"}
    assert all(len(c) == 1 for c in colors.values()), colors
    assert len({c.pop() for c in colors.values()}) == 3
    assert sorted(t.get_text() for t in fig.legends[0].get_texts()) == sorted(colors)


NOISY = '''
print("printed on import")


def score(text, answer, record):
    print("printed while scoring")
    return float(text == answer), {}
'''


@pytest.mark.parametrize("workers", ["0", "1"])
def test_what_a_verifier_prints_goes_to_stderr_not_into_the_records(tmp_path, workers):
    """stdout carries records alone: a python: verifier that prints, on import (in tcli's own
    process, where the plugin is checked) or while scoring (in this process with --workers 0),
    prints to stderr."""
    import os

    import orjson

    from conftest import REPO, run_tcli

    (tmp_path / "noisy_verifier.py").write_text(NOISY)
    recs = b"".join(orjson.dumps({"prompt_id": f"p{i}", "sample_id": 0, "text": t, "answer": "1"})
                    + b"\n" for i, t in enumerate(["1", "2"]))
    env = {"PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO)]), "OMP_NUM_THREADS": "1"}
    r = run_tcli(["verify", "--task", "python:noisy_verifier:score", "--workers", workers],
                 input=recs, env=env, fresh=True)
    assert r.returncode == 0, r.stderr.decode()
    assert [orjson.loads(x)["reward"] for x in r.stdout.splitlines()] == [1.0, 0.0]
    err = r.stderr.decode()
    assert err.count("printed on import") == 1 and err.count("printed while scoring") == 2, err
