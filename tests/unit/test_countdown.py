"""The countdown task (examples/countdown): generator, disjoint split, decision structure, the
registered verifier's exact checks (malformed model text scores 0, never raises, bounded work)
and the warm start's SFT data."""

from __future__ import annotations

import random
import time

import pytest

from examples.countdown.task import (MAX_GOOD_SHARE, attempt, first_moves, good_moves,  # noqa: E402
                                     make_prompts, parse_prompt, sft_response, solution,
                                     split_of)
from examples.countdown.verify import verify_countdown  # noqa: E402

REC = {"prompt": "3 7 5 -> 26\n", "answer": "26"}


def score(text: str, rec: dict = REC) -> tuple[float, dict]:
    return verify_countdown(text, rec["answer"], rec)


def test_generator_is_deterministic_distinct_and_split_disjoint():
    a, b = make_prompts(60, 3, "train"), make_prompts(60, 3, "train")
    assert a == b and make_prompts(60, 4, "train") != a
    test = make_prompts(60, 3, "test")
    key = lambda r: (tuple(sorted(parse_prompt(r["prompt"])[0])), parse_prompt(r["prompt"])[1])  # noqa: E731
    tr, te = {key(r) for r in a}, {key(r) for r in test}
    assert len(tr) == 60 and len(te) == 60 and not tr & te
    # the split is a function of the instance alone: reordered numbers stay on the same side
    for r in test:
        nums, t = parse_prompt(r["prompt"])
        assert split_of(list(reversed(nums)), t) == "test" == r["meta"]["split"]
    assert {r["meta"]["difficulty"] for r in a} == {3, 4}


def test_every_instance_has_a_decision_a_minority_of_first_moves_reach_the_target():
    for r in make_prompts(80, 0, "train"):
        nums, target = parse_prompt(r["prompt"])
        good, all_moves = good_moves(nums, target), first_moves(nums)
        assert 1 <= len(good) <= max(1, int(len(all_moves) * MAX_GOOD_SHARE))
        assert score(solution(r), r)[0] == 1.0
        bad = [m for m, _ in all_moves if m not in good]
        # a bad first move finishes mechanically into a legal chain that misses the target
        reward, v = score(attempt(nums, target, bad[0]), r)
        assert reward == 0.0 and v["reason"].startswith("reaches ")


def test_verifier_accepts_any_legal_chain_including_other_orders():
    assert score("7*3=21\n21+5=26\n#### 26")[0] == 1.0
    assert score("3*7=21\n21+5=26\n#### 26\n")[0] == 1.0      # operand order, trailing newline
    assert score("5+3=8\n8*7=56\n#### 56", {"prompt": "3 7 5 -> 56\n", "answer": "56"})[0] == 1.0


@pytest.mark.parametrize("text,reason", [
    ("7*3=21\n21+5=27\n#### 27", "is not 27"),                   # wrong arithmetic
    ("7*3=21\n21+3=24\n#### 24", "not an unused given number"),  # 3 used twice
    ("7*3=21\n20+5=25\n#### 25", "previous result"),             # chain broken
    ("7*3=21\n#### 21", "2 lines"),                              # a number left unused
    ("3-7=4\n4*5=20\n#### 20", "is not 4"),                      # negative result disguised
    ("7*3=21\n21+5=26\n#### 25", "the last result is 26"),       # final line disagrees
    ("7*3=21\n21+5=26\n26", "no final"),
    ("7 * 3 = 21\n21+5=26\n#### 26", "not 'a op b=c'"),
    ("7/3=2\n2+5=7\n#### 7", "not 'a op b=c'"),
    ("", "1 lines"),
    ("#" * 10_000, "longer than"),
    ("9" * 300 + "*3=1\n1+5=6\n#### 6", "not 'a op b=c'"),
])
def test_verifier_scores_malformed_or_wrong_chains_zero_with_a_reason(text, reason):
    reward, v = score(text)
    assert reward == 0.0 and v["correct"] is False and reason in v["reason"], v


def test_verifier_work_is_bounded_on_adversarial_text():
    t0 = time.perf_counter()
    for text in ("1+" * 200_000, "\n" * 500_000, ("7*3=21\n" * 50_000) + "#### 26"):
        assert score(text)[0] == 0.0
    assert time.perf_counter() - t0 < 0.5


def test_bad_gold_is_a_data_error_and_the_verifier_is_registered():
    with pytest.raises(ValueError, match="not a countdown prompt"):
        verify_countdown("#### 1", "1", {"prompt": "what?"})
    with pytest.raises(ValueError, match="not the prompt's target"):
        verify_countdown("#### 1", "27", REC)
    import examples.countdown  # noqa: F401
    from tcli.verifiers import get_verifier

    assert get_verifier("countdown") is verify_countdown
    assert get_verifier("python:examples.countdown.verify:verify_countdown") is verify_countdown


def test_sft_responses_are_legal_chains_with_the_requested_share_of_good_first_moves():
    recs = make_prompts(200, 1, "train")
    rng = random.Random(0)
    for rate, lo, hi in ((1.0, 1.0, 1.0), (0.0, 0.05, 0.35)):
        texts = [sft_response(r, rng, rate) for r in recs]
        for t, r in zip(texts, recs):  # always a legal chain: only the target may be missed
            reason = score(t, r)[1].get("reason")
            assert reason is None or reason.startswith("reaches "), (t, reason)
        acc = sum(score(t, r)[0] for t, r in zip(texts, recs)) / len(recs)
        assert lo <= acc <= hi, (rate, acc)
