"""A gold written as a GSM8K solution (``... reasoning ... #### 72``) is read after its last
``####`` by the math verifier too (an explicit ``-t math``), and an answer sentence of numbers
separated by spaces (``3 5``) states no answer, while thousands grouped by spaces (``1 234``) are
one number."""

from __future__ import annotations

import pytest

from tcli.stages.verify import verify_records
from tcli.verifiers.extract import gold_answer
from tcli.verifiers.gsm8k import gold_value, verify_gsm8k

SOLUTION = ("Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 "
            "clips altogether in April and May.\n#### 72")


def _rewards(texts, answer, task):
    rows = [{"prompt_id": "p", "sample_id": i, "text": t, "answer": answer}
            for i, t in enumerate(texts)]
    return [r["reward"] for r in verify_records(enumerate(rows, 1), "<test>", task=task,
                                                workers=0)]


def test_the_shared_reading_of_a_gold():
    assert gold_answer(SOLUTION) == "72"
    assert gold_answer("x\n#### 1,234 \nfootnote") == "1,234"  # that line only
    assert gold_answer("\\frac{1}{2}") == "\\frac{1}{2}"  # any other gold is itself
    assert gold_value(SOLUTION) == 72


def test_math_reads_a_gsm8k_solution_gold_after_its_hashes():
    pytest.importorskip("math_verify")
    texts = ["so \\boxed{72}", "so \\boxed{24}", "The answer is 72.", "so \\boxed{1234}"]
    assert _rewards(texts[:3], SOLUTION, "math") == [1.0, 0.0, 1.0]
    assert _rewards(texts[3:], "He sold 1,000 and 234.\n#### 1,234", "math") == [1.0]
    assert _rewards(["so \\boxed{\\frac{1}{2}}"], "half of it\n#### 0.5", "math") == [1.0]
    assert _rewards(texts[:1], "72", "math") == [1.0]  # a plain gold as before


@pytest.mark.parametrize("text", ["The answer is 3 5", "The answer is 3 5.",
                                  "The answer is 5 3 4 apples", "The answer is 1 2345",
                                  "The answer is 2 1/2"])
def test_numbers_separated_by_spaces_in_a_sentence_state_no_answer(text):
    for gold in ("3", "5", "35", "1", "2", "2345", "12345", "534"):
        reward, v = verify_gsm8k(text, gold, {})
        assert reward == 0.0 and v["parsed"] is None, (gold, v)
        assert v["reason"] == "the final answer (answer is) is not a single number", v


@pytest.mark.parametrize("text,gold", [
    ("The answer is 1 234", "1234"), ("The answer is 1 234 dollars.", "1234"),
    ("The answer is 12 345 678", "12345678"), ("The answer is 18 dollars for 7 days", "18"),
    ("The answer is 3. 5 apples were left.", "3")])
def test_thousands_grouped_by_spaces_are_still_one_number(text, gold):
    reward, v = verify_gsm8k(text, gold, {})
    assert reward == 1.0 and v["parsed"] == gold, v


@pytest.mark.parametrize("task", ["math", "gsm8k"])
def test_an_empty_gold_after_its_hashes_stops_the_run_instead_of_scoring_zero(task):
    from tcli.errors import TcliError

    with pytest.raises(TcliError, match="gold answer"):
        _rewards(["no answer here"], "reasoning\n#### ", task)
