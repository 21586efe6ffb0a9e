"""A record that skipped a stage: show-tree, expand-tree, build-tree, advantages and train-critic
name the stage to run first (as advantages -e gae does for critic values), with file, line and
field, exit 65."""

from __future__ import annotations

import pytest

from conftest import failed, jsonl, rollouts, run_tcli


def _without(field: str, line: int = 2) -> bytes:
    """The shared rollouts, as one-level trees, with ``field`` dropped from the record on ``line``."""
    recs = rollouts()
    for rec in recs:
        rec.update(node_path=[rec["sample_id"]], segment_ends=[len(rec["token_ids"])])
    recs[line - 1].pop(field)
    return jsonl(recs)


def test_show_tree_on_unverified_records_says_run_verify(tmp_path):
    src = tmp_path / "sampled.jsonl"
    src.write_bytes(_without("reward"))
    r = run_tcli(["show-tree", str(src)])
    failed(r, 65, "sampled.jsonl:2: field 'reward'", "run `tcli verify` first")


@pytest.mark.parametrize("cmd", [["build-tree"], ["advantages", "-e", "grpo"],
                                 ["advantages", "-e", "treerpo"]])
def test_group_stages_on_unverified_records_say_run_verify(tmp_path, cmd):
    src = tmp_path / "sampled.jsonl"
    src.write_bytes(_without("reward"))
    r = run_tcli([*cmd, str(src)])
    failed(r, 65, "sampled.jsonl:2: field 'reward'", "run `tcli verify` first")
    assert not r.stdout


def test_expand_tree_on_unverified_records_says_run_verify(tiny, tmp_path):
    src = tmp_path / "sampled.jsonl"
    src.write_bytes(_without("reward"))
    r = run_tcli(["expand-tree", str(src), "-m", tiny, "--expand-tokens", "8"])
    failed(r, 65, "sampled.jsonl:2: field 'reward'", "run `tcli verify` first")
    assert not r.stdout


def test_train_critic_without_critic_values_says_run_values(tiny_model, tmp_path):
    pytest.importorskip("torch")
    crit = tmp_path / "critic"
    r = run_tcli(["init-critic", "--from", tiny_model, str(crit), "-q"])
    assert r.returncode == 0, r.stderr.decode()
    recs = rollouts()
    for rec in recs:
        n = len(rec["token_ids"])
        rec.update(critic_values=[0.0] * (n + 1), returns=[rec["reward"]] * n)
    del recs[2]["critic_values"]
    src = tmp_path / "advantaged.jsonl"
    src.write_bytes(jsonl(recs))
    out = tmp_path / "out"
    r = run_tcli(["train-critic", str(src), "--critic", str(crit), "-o", str(out)])
    failed(r, 65, "advantaged.jsonl:3: field 'critic_values'", "run `tcli values")
    assert not out.exists()
