"""train-critic's explained variance is undefined when the returns do not vary: written as null
(as the loop writes other undefined metrics), never as a 0 that reads as "explains nothing"."""

from __future__ import annotations

import orjson
import pytest

from conftest import jsonl, rollouts, run_tcli

pytest.importorskip("torch")


@pytest.fixture(scope="module")
def critic(tiny_model, tmp_path_factory):
    d = tmp_path_factory.mktemp("critic_metrics")
    r = run_tcli(["init-critic", "--from", tiny_model, str(d / "critic"), "-q"])
    assert r.returncode == 0, r.stderr.decode()
    return str(d / "critic")


def _train(critic, tmp_path, returns) -> dict:
    recs = rollouts()
    for rec, ret in zip(recs, returns):
        n = len(rec["token_ids"])
        rec.update(critic_values=[0.0] * (n + 1), returns=[ret] * n)
    src = tmp_path / "adv.jsonl"
    src.write_bytes(jsonl(recs))
    r = run_tcli(["train-critic", str(src), "--critic", critic, "-o", str(tmp_path / "out")])
    assert r.returncode == 0, r.stderr.decode()
    return orjson.loads(r.stdout)


def test_constant_returns_leave_explained_variance_undefined(critic, tmp_path):
    m = _train(critic, tmp_path, [1.0] * 6)
    assert "explained_variance" in m and m["explained_variance"] is None, m
    assert m["value_loss"] > 0


def test_varying_returns_give_a_number(critic, tmp_path):
    m = _train(critic, tmp_path, [0.0, 1.0, 0.0, 1.0, 1.0, 0.0])
    assert isinstance(m["explained_variance"], float), m
