"""What `--task auto` and the gsm8k verifier read: a GSM8K solution as gold (its number after
`####`), a box that is one number written with spaces, a box that is an expression (no answer,
never its first or last number), and countdown records (their own verifier, not gsm8k's final
number)."""

from __future__ import annotations

import pytest

from examples.countdown.task import make_prompts, solution
from tcli.stages.verify import verify_records
from tcli.verifiers import pick_task
from tcli.verifiers.gsm8k import gold_value, verify_gsm8k

SOLUTION = ("Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 "
            "clips altogether in April and May.\n#### 72")
THOUSANDS = "He packs 3 boxes of 1,000 pens, so 3,000 pens.\n#### 3,000\n"


def _verified(recs, task="auto"):
    rows = [{"prompt_id": f"p{i}", "sample_id": 0, **r} for i, r in enumerate(recs)]
    return list(verify_records(enumerate(rows, 1), "<test>", task=task, workers=0))


def test_a_gsm8k_solution_gold_is_its_number_after_the_hashes():
    assert gold_value(SOLUTION) == 72 and gold_value(THOUSANDS) == 3000
    assert pick_task({"answer": SOLUTION}) == "gsm8k"
    assert pick_task({"answer": THOUSANDS, "prompt_template": "boxed"}) == "gsm8k"
    assert pick_task({"answer": "#### x"}) == "math"  # no number after the hashes: not one
    for text, gold, right in (("so \\boxed{72}", SOLUTION, True), ("so \\boxed{24}", SOLUTION, False),
                              ("The answer is 3000.", THOUSANDS, True),
                              ("so \\boxed{3}", THOUSANDS, False)):
        (rec,) = _verified([{"text": text, "answer": gold}])
        assert rec["verdict"]["task"] == "gsm8k" and rec["reward"] == float(right), rec["verdict"]


@pytest.mark.parametrize("text,gold", [
    ("\\boxed{1 234}", "1234"), ("\\boxed{1\\,234}", "1234"), ("\\boxed{1~234}", "1234"),
    ("\\boxed{1\u2009234}", "1234"), ("\\boxed{12 345 678}", "12345678"),
    ("\\boxed{1 234.5}", "1234.5"), ("#### 1 234", "1234"), ("The answer is 1 234.", "1234"),
    ("\\boxed{5 \\text{ cm}^{2}}", "5"), ("\\boxed{2 \\times 9 = 18}", "18"),
    ("\\boxed{18 \\text{ eggs}}", "18"), ("\\boxed{x = -5}", "-5")])
def test_one_number_in_a_box_is_read_whole(text, gold):
    reward, v = verify_gsm8k(text, gold, {})
    assert reward == 1.0, v


@pytest.mark.parametrize("text", ["\\boxed{2 \\times 9}", "\\boxed{2 \\cdot 9}", "\\boxed{10^6}",
                                  "\\boxed{18, 20}", "\\boxed{1 2345}", "\\boxed{\\sqrt{2}}",
                                  "\\boxed{12 - 3}", "#### 2 \\times 9"])
def test_an_expression_in_a_box_states_no_number(text):
    """Neither its first number nor its last (the last-number fallback) is the answer."""
    for gold in ("2", "9", "18", "10", "20", "1", "3", "12", "1234", "12345"):
        reward, v = verify_gsm8k(text, gold, {})
        assert reward == 0.0 and v["parsed"] is None, (gold, v)
        assert v["reason"].endswith("is not a single number")


@pytest.mark.parametrize("text,gold,right", [
    ("The answer is 18 dollars for 7 days.", "18", True), ("The answer is 18, since 2*9=18", "18", True),
    ("The answer is $1 234$.", "1234", True), ("The answer is 3, 5, 7", "3", False),
    ("The answer is \\frac{3\\sqrt{3}}{4}", "3", False), ("The answer is 12 - 3", "12", False),
    ("The answer is \\frac9{19}", "9", False), ("The answer is 10^6", "10", False)])
def test_an_answer_sentence_gives_its_number_unless_it_is_an_expression(text, gold, right):
    reward, v = verify_gsm8k(text, gold, {})
    assert reward == float(right), v


def test_auto_sends_only_one_number_to_gsm8k():
    """A plain prompt's numeric gold goes to gsm8k; `-2,1` (two roots) is no number, so math."""
    plain = {"prompt_template": "plain"}
    assert pick_task({**plain, "answer": "1,234"}) == pick_task({**plain, "answer": "-7.5"}) == "gsm8k"
    assert pick_task({**plain, "answer": "-2,1"}) == pick_task({**plain, "answer": "1,23"}) == "math"


def test_countdown_records_get_the_countdown_verifier():
    """A countdown record's gold is the target: gsm8k's final number would pay a bare `#### 13`
    (no chain at all) as a solution."""
    r = make_prompts(1, 0, "test")[0]
    assert r["meta"]["source"] == "tcli-countdown"
    assert pick_task(r).endswith("verify_countdown")
    rec = {k: v for k, v in r.items() if k != "id"}
    bare, solved = _verified([{**rec, "text": f"#### {r['answer']}", "prompt_template": "plain"},
                              {**rec, "text": solution(r), "prompt_template": "plain"}])
    assert bare["verdict"]["task"] == solved["verdict"]["task"] == "countdown"
    assert (bare["reward"], solved["reward"]) == (0.0, 1.0)
