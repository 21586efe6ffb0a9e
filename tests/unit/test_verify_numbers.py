"""Exact numbers in the verifiers (integers beyond 64 bits, never floats) and the one
"boxed, else 'the answer is'" extraction that gsm8k and math share."""

from __future__ import annotations

import pytest

from tcli import verifiers
from tcli.stages.verify import verify_records
from tcli.verifiers import final_answer, get_verifier, gsm8k, math as math_v, tail

BIG = [10**30, 2**64 + 1, -(2**70), 2**53 + 1, 10**200 + 7]


def score(task: str, text: str, answer) -> float:
    return get_verifier(task)(text, str(answer), {})[0]


@pytest.mark.parametrize("task", ["gsm8k", "arith"])
@pytest.mark.parametrize("gold", BIG)
def test_big_integers_compare_exactly(task, gold):
    for form in (f"#### {gold}", f"so it is {gold}", f"#### {gold}.00"):
        assert score(task, form, gold) == 1.0, form
    for wrong in (gold + 1, gold - 1, -gold):
        assert score(task, f"#### {wrong}", gold) == 0.0, wrong
        assert score(task, f"so it is {wrong}", gold) == 0.0, wrong
    assert score(task, f"#### {gold}.5", gold) == 0.0  # not the integer gold, whatever its size
    assert score(task, f"#### {gold}.01", gold) == 0.0


def test_the_examples_from_the_brief():
    for task in ("gsm8k", "arith"):
        assert score(task, "#### 1000000000000000000000000000001", 10**30) == 0.0
        assert score(task, "#### 1000000000000000000000000000000", 10**30) == 1.0
        assert score(task, f"#### {2**64}", 2**64 + 1) == 0.0
        assert score(task, f"#### {-(2**70) + 1}", -(2**70)) == 0.0
    assert score("gsm8k", "#### 1e30", 10**30) == 1.0  # the same number, written exactly


def test_gsm8k_fractions_and_tolerance_are_exact():
    g = 10**30
    assert score("gsm8k", f"\\boxed{{\\frac{{{2 * g + 2}}}{{2}}}}", g) == 0.0
    assert score("gsm8k", f"\\boxed{{\\frac{{{2 * g}}}{{2}}}}", g) == 1.0
    assert score("gsm8k", f"#### {g + 1}/1", g) == 0.0
    assert score("gsm8k", f"#### {g // 10}.01", g // 10) == 0.0  # 1e-14 relative is float noise
    # float noise below 2**53 is still forgiven, as before
    assert score("gsm8k", "#### 3244047.1", "3244047.0999999996") == 1.0
    assert score("gsm8k", "\\boxed{\\frac{1}{3}}", "0.3333333333333333") == 1.0
    assert score("gsm8k", "#### 14053029.67", "14053029.666666666") == 1.0
    assert not gsm8k.close(gsm8k.gold_value(str(2**53 + 1)), gsm8k.gold_value(str(2**53)))


def test_math_integers_compare_exactly():
    g = 10**30
    assert score("math", f"\\boxed{{{g + 1}}}", g) == 0.0
    assert score("math", f"\\boxed{{{g}}}", g) == 1.0
    assert score("math", f"\\boxed{{{2**64}}}", 2**64 + 1) == 0.0


def test_gsm8k_integers_below_2_53_compare_exactly():
    """The float-noise tolerance (1e-14 relative) is for fractions; two integers compare digit
    for digit even where 1e-14 of them exceeds 1: 10**15 + 1 is not 10**15."""
    # 1e-14 * 10**15 = 10 >= the difference 1, and 10**15 < 2**53 ~ 9.0e15
    assert score("gsm8k", "#### 1000000000000001", "1000000000000000") == 0.0
    assert score("gsm8k", "#### 1000000000000000", "1000000000000000") == 1.0


def test_math_string_fallback_matches_the_whole_answer():
    """The string comparison after a failed symbolic match is equality: 1 is not 12 because
    "1" is part of "12"."""
    assert score("math", r"\boxed{1}", "12") == 0.0
    assert score("math", r"\boxed{12}", "12") == 1.0


def test_gsm8k_minus_after_a_closing_bracket_is_binary():
    """(10+5)-3 ends in 3, not -3: a minus after a bracket is an operator, as after a digit."""
    for text in ("The total is (10+5)-3", "The total is [10+5]-3", "The total is {10+5}-3"):
        assert score("gsm8k", text, "3") == 1.0, text
        assert score("gsm8k", text, "-3") == 0.0, text
    assert score("gsm8k", "The total is -3", "-3") == 1.0  # a leading minus still negates


def test_gsm8k_a_spaced_minus_after_a_number_is_binary():
    """12 - 3 is a subtraction, like 12-3; a minus spaced only before its number, or after a
    word, negates it."""
    for text in ("12 - 3", "(10 + 2) - 3", "12  -  3"):
        assert score("gsm8k", text, "3") == 1.0, text
    for text in ("The answer is - 3", "The answer is -3", "from 12 -3"):
        assert score("gsm8k", text, "-3") == 1.0, text


HUGE_DIGITS = "1" + "0" * 4999 + "1"   # 10**5000 + 1: str() refuses ints over 4,300 digits


@pytest.mark.parametrize("workers", [0, 1])
def test_gold_ints_of_any_size_through_the_stage(workers):
    cases = [  # gold (as a record carries it), a right answer, a wrong one
        (10**30, "1" + "0" * 30, "1" + "0" * 29 + "1"),
        (2**64 + 1, str(2**64 + 1), str(2**64)),
        (-(2**70), str(-(2**70)), str(-(2**70) + 1)),
        ("1" + "0" * 30, "1" + "0" * 30, "1" + "0" * 29 + "1"),
        (1e30, "1" + "0" * 30, str(int(1e30))),  # the float's shortest form, not its binary value
        (27.0, "27", "28"),
        (10**5000 + 1, HUGE_DIGITS, HUGE_DIGITS[:-1] + "2"),
    ]
    recs = []
    for gold, right, wrong in cases:
        recs += [{"text": f"#### {right}", "answer": gold}, {"text": f"#### {wrong}", "answer": gold}]
    for task in ("gsm8k", "arith"):
        out = list(verify_records(iter(enumerate([dict(r) for r in recs], 1)), "<t>", task=task,
                                  workers=workers))
        assert [r["reward"] for r in out] == [1.0, 0.0] * len(cases), (task, [r["verdict"] for r in out])


def test_a_number_cut_by_a_window_is_never_an_answer():
    gold = "7" * 2000
    assert score("gsm8k", f"#### {gold}", gold) == 1.0
    assert score("gsm8k", f"#### {gold}9", gold) == 0.0
    assert score("gsm8k", f"The answer is {gold}9", gold) == 0.0
    assert score("gsm8k", f"The answer is {gold}", gold) == 1.0
    long = "9" * 20_000  # longer than the tail that verifiers read
    for task in ("gsm8k", "arith"):
        assert score(task, long, "9" * 16_384) == 0.0
        assert score(task, long, "9" * 16_383) == 0.0


def test_arith_decimals_are_not_integers():
    assert score("arith", "#### 12.5", 12) == 0.0
    v = get_verifier("arith")("#### 12.5", "12", {})[1]
    assert v["reason"] == "no integer after ####"
    assert score("arith", "it is 12.5", 5) == 0.0  # not "the last integer is 5"
    assert score("arith", "#### 18.0", 18) == 1.0
    assert score("arith", "#### \u221218", -18) == 1.0


# ----------------------------------------------------------------------------- shared extraction

TEXTS = [
    "so \\boxed{18}. The answer is 20.",
    "The answer is 20. Then \\boxed{}",
    "The answer is $\\frac{1}{2}$.",
    "\\boxed{x} ... The answer is 7",
    "no answer here",
    "\\boxed{unclosed",
    "Final Answer: The final answer is $5$. I hope it is correct.",
]


def test_one_function_serves_math_and_gsm8k():
    assert gsm8k.final_answer is math_v.final_answer is verifiers.final_answer
    for mod in (gsm8k, math_v):  # neither keeps its own copy of the order
        assert not hasattr(mod, "last_boxed") and not hasattr(mod, "answer_phrase")
    for t in TEXTS:
        assert math_v.extract(t) == final_answer(tail(t))
        got = gsm8k.extract(t)
        if got[1] in ("boxed", "answer is"):
            assert got == final_answer(tail(t), gsm8k.number_in)


def test_final_answer_order():
    assert final_answer("so \\boxed{18}. The answer is 20.") == ("18", "boxed")
    assert final_answer("The answer is 20.") == ("20", "answer is")
    assert final_answer("\\boxed{} The answer is 20.") == ("", "boxed")  # math: an empty box
    # with a reader, a box that holds no number gives way to the phrase (gsm8k)
    assert final_answer("\\boxed{x} The answer is 7", gsm8k.number_in) == (("7", 7), "answer is")
    assert final_answer("nothing") == (None, None)
