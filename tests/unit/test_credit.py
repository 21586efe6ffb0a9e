"""examples/credit.py: where a tree method's credit goes relative to GRPO, checked on a group small
enough to compute by hand."""

from __future__ import annotations

import json
import os

import orjson
import pytest

from examples import credit  # noqa: E402
from tcli.algos.estimators import Group, compute_advantages  # noqa: E402
from tcli.config.stages import AdvantageOptions  # noqa: E402


def _write_run(path: str, estimator: str, extra: dict | None = None) -> None:
    # 3 responses of 5 tokens: two share "1 2" and split at position 2; the third splits at 0
    toks, rewards = [[1, 2, 3, 8, 9], [1, 2, 4, 8, 9], [5, 6, 7, 8, 9]], [1.0, 0.0, 0.0]
    recs = [{"prompt_id": "p", "sample_id": i, "prompt": "q", "token_ids": t, "reward": r,
             **(extra or {})} for i, (t, r) in enumerate(zip(toks, rewards))]
    adv = compute_advantages(Group.from_records(recs), estimator, AdvantageOptions()).per_token
    os.makedirs(os.path.join(path, "rollouts"))
    with open(os.path.join(path, "rollouts", "step_1.jsonl"), "wb") as f:
        for rec, a in zip(recs, adv):
            f.write(orjson.dumps({**rec, "advantages": a.tolist()}) + b"\n")


def test_tempo_moves_credit_only_at_branch_tokens(tmp_path, capsys):
    _write_run(str(tmp_path / "tempo-s0"), "tempo")
    _write_run(str(tmp_path / "grpo-s0"), "grpo")
    assert credit.main([str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "credit.json").read_text())
    # GRPO: sigma = sqrt(1/3); |A| = 1.1547 (winner), 0.5774 (losers) on each of 5 tokens
    # TEMPO adds (V(child) - V(parent)) / sigma at branch tokens: V(root) = 1/3, V("1") = 1/2,
    # V("1 2 3") = 1, V("1 2 4") = 0, V("5") = 0 -> |D| = 0.2887 x 2, 0.5774, 0.8660 x 2
    t = rows["tempo"]
    assert t["branch"] == pytest.approx(5 / 15)
    assert t["moved"] == pytest.approx((2 * 0.28868 + 0.57735 + 2 * 0.86603) / 11.547, rel=1e-4)
    assert t["D@branch"] == pytest.approx(1.0) and t["D@first3"] == pytest.approx(1.0)
    assert t["A@first3"] == pytest.approx(2 / 3)
    assert t["flipped"] == 0.0
    g = rows["grpo"]
    assert g["moved"] == 0.0 and g["A@first3"] == pytest.approx(3 / 5)
    assert "| tempo | 1 |" in capsys.readouterr().out


def test_split_position_and_entropy_at_splits(tmp_path):
    _write_run(str(tmp_path / "treerpo-s0"), "grpo",
               {"segment_ends": [2, 4], "entropies": [0.1, 0.2, 1.5, 0.3, 0.9]})
    assert credit.main([str(tmp_path), "--methods", "treerpo"]) == 0
    row = json.loads((tmp_path / "credit.json").read_text())["treerpo"]
    assert row["split_at"] == 2.0
    assert row["H@split"] == pytest.approx((1.5 + 0.9) / 2)
    assert row["H"] == pytest.approx(3.0 / 5)


def test_no_runs_is_a_usage_error(tmp_path):
    with pytest.raises(SystemExit) as e:
        credit.main([str(tmp_path)])
    assert e.value.code == 2
