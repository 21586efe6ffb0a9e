"""The Unix-pipe shape end to end on a tiny model, and `tcli eval` (pass@k, CI, every data kind)."""

from __future__ import annotations

import math

import orjson
import pytest

from conftest import DATA, run_tcli
from tcli.stages.evaluate import bootstrap_ci, pass_at_k, summarise


def test_pass_at_k_hand_computed():
    # n = 5 samples, c = 2 correct: pass@1 = 2/5; pass@2 = 1 - C(3,2)/C(5,2) = 1 - 3/10 = 0.7
    assert pass_at_k(5, 2, 1) == pytest.approx(0.4)
    assert pass_at_k(5, 2, 2) == pytest.approx(0.7)
    assert pass_at_k(4, 0, 3) == 0.0
    assert pass_at_k(4, 2, 3) == 1.0  # any 3 of 4 include a correct one
    assert pass_at_k(10, 3, 4) == pytest.approx(1 - math.comb(7, 4) / math.comb(10, 4))
    with pytest.raises(ValueError):
        pass_at_k(2, 1, 3)


def test_summary_pass_at_k_and_ci():
    recs = []
    for pid, rewards in (("a", [1, 0, 0, 0]), ("b", [1, 1, 1, 1]), ("c", [0, 0, 0, 0])):
        recs += [{"prompt_id": pid, "reward": float(r), "token_ids": [1] * (i + 1)} for i, r in enumerate(rewards)]
    s = summarise(recs, ks=(1, 2), seed=0)
    assert s["prompts"] == 3 and s["samples"] == 12
    assert s["accuracy"] == pytest.approx((0.25 + 1 + 0) / 3)
    assert s["pass@2"] == pytest.approx((0.5 + 1 + 0) / 3)  # a: 1 - C(3,2)/C(4,2) = 0.5
    assert s["mean_response_tokens"] == pytest.approx(2.5)
    lo, hi = s["accuracy_ci95"]
    assert 0.0 <= lo <= s["accuracy"] <= hi <= 1.0
    assert bootstrap_ci([1.0] * 5) == (1.0, 1.0)


@pytest.mark.parametrize("data,task", [("gsm8k_test.jsonl", "gsm8k"), ("math500.jsonl", "math"),
                                       ("medqa_usmle4_test.jsonl", "choice")])
def test_eval_cli_on_real_data(tiny, tmp_path, data, task):
    out = tmp_path / "samples.jsonl"
    p = run_tcli(["eval", "--model", tiny, "--data", DATA / data, "--limit", "2", "--n", "2",
                  "--temperature", "1.0", "--k", "1,2", "--max-new-tokens", "8", "-o", out,
                  "--workers", "1", "--no-chat-template"], env={"OMP_NUM_THREADS": "1"}, timeout=300)
    assert p.returncode == 0, p.stderr.decode()
    summary = orjson.loads(p.stdout)
    assert summary["prompts"] == 2 and summary["samples"] == 4
    assert 0.0 <= summary["accuracy"] <= 1.0 and "pass@2" in summary
    recs = [orjson.loads(x) for x in out.read_bytes().splitlines()]
    assert len(recs) == 4 and all(r["verdict"]["task"] == task for r in recs)


def test_eval_fail_under_and_bad_k(tiny, tmp_path):
    args = ["eval", "--model", tiny, "--data", DATA / "gsm8k_test.jsonl", "--limit", "1",
            "--max-new-tokens", "4", "--workers", "1", "--no-chat-template"]
    p = run_tcli([*args, "--fail-under", "1"], env={"OMP_NUM_THREADS": "1"}, timeout=300)
    assert p.returncode == 1 and b"below --fail-under" in p.stderr
    p = run_tcli([*args, "--k", "4"])
    assert p.returncode == 2
