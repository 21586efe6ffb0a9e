"""Edges of the built-in verifiers, each written as a model could write it: the forms a human
grader marks right must score 1, and near misses (another option, a hedge, a text that only
starts like an option) must not."""

from __future__ import annotations

import pytest

from tcli.verifiers import TAIL_CHARS, get_verifier, last_boxed, tail
from tcli.verifiers.extract import answer_phrase, gold_answer, nesting_depth

CH = {"A": "Aspirin", "B": "Ibuprofen", "C": "Acetaminophen", "D": "None of the above"}


def score(task: str, text: str, answer: str, rec: dict | None = None) -> float:
    return get_verifier(task)(text, answer, rec or {})[0]


def verdict(task: str, text: str, answer: str, rec: dict | None = None) -> dict:
    return get_verifier(task)(text, answer, rec or {})[1]


# ----------------------------------------------------------------------------- extraction

def test_a_response_exactly_as_long_as_the_tail_is_read_whole():
    text = "x" * (TAIL_CHARS - 7) + "#### 18"
    assert len(text) == TAIL_CHARS and tail(text) == text
    for task in ("gsm8k", "arith"):
        assert score(task, text, "18") == 1.0


def test_the_gold_is_after_the_last_hashes_of_a_solution():
    assert gold_answer("She had #### 5 stamps.\nThen 5 + 67 = 72\n#### 72") == "72"


def test_a_piecewise_box_with_an_escaped_brace_is_read_whole():
    box = r"f(x) = \left\{ x + 1 \right."
    assert last_boxed(rf"so \boxed{{{box}}} done") == box


def test_the_last_of_many_boxes_is_the_answer():
    steps = "".join(f"Step {i}: \\boxed{{{i}}}\n" for i in range(20))
    assert last_boxed(steps + "Final: \\boxed{72}") == "72"
    assert score("gsm8k", steps + "Final: \\boxed{72}", "72") == 1.0
    assert score("math", steps + "Final: \\boxed{72}", "72") == 1.0


def test_a_box_without_braces_drops_its_trailing_punctuation():
    assert last_boxed(r"so the answer is \boxed 5.") == "5"
    assert last_boxed(r"\boxed 18, as shown") == "18"
    # "\boxed" with neither a brace nor a space after it is no box: an earlier one still counts
    assert last_boxed(r"\boxed{18} (written with \boxed.)") == "18"


def test_answer_phrases_in_any_case_and_on_the_next_lines():
    pytest.importorskip("math_verify")
    assert score("math", r"ANSWER: $\frac{1}{2}$", r"\frac12") == 1.0
    assert score("math", r"Final Answer: $\frac{1}{2}$", r"\frac12") == 1.0
    assert score("math", "The answer is:\n\n$$\\frac{1}{2}$$", r"\frac12") == 1.0
    assert score("math", "The answer is:\n\n\\[\\frac{1}{2}\\]", r"\frac12") == 1.0
    assert answer_phrase("Answer:\n\n\\[ x = 3 \\]") == "x = 3"
    assert score("math", "The final answer is:\n\\[\n\\frac{1}{2}\n\\]", r"\frac12") == 1.0


def test_an_answer_sentence_keeps_its_words_when_a_math_span_comes_later():
    """"The answer is 7, since $x = 3$": the answer is 7, not the span after it."""
    assert answer_phrase("The answer is 7, since $x = 3$.") == "7, since $x = 3$"
    assert score("gsm8k", "The answer is 7, since $x = 3$.", "7") == 1.0
    assert score("gsm8k", "The answer is 7, since $x = 3$.", "3") == 0.0


def test_nesting_counts_square_brackets_too():
    from tcli.verifiers.math import too_complex

    assert nesting_depth("[[[1]]]") == 3
    assert too_complex("[" * 7 + "1" + "]" * 7) is not None
    assert too_complex("[(1, 2)]") is None


# ----------------------------------------------------------------------------- gsm8k

def test_a_box_of_two_numbers_in_words_states_no_number():
    """A box must hold one number (§1.8); the first number of a sentence is for answer phrases."""
    v = verdict("gsm8k", r"\boxed{5 \text{ apples and } 3 \text{ pears}}", "5")
    assert v["correct"] is False and v["parsed"] is None and "not a single number" in v["reason"]
    assert score("gsm8k", "The answer is 5 apples and 3 pears.", "5") == 1.0


# ----------------------------------------------------------------------------- choice

def test_choice_reads_option_texts_however_they_are_written():
    rec = {"choices": CH}
    for text in ("The answer is ibuprofen", "<answer>\\text{Ibuprofen}</answer>", "Ibuprofen.",
                 "I compared them all.\n**ibuprofen**", "\\boxed{\\text{B}}", "Answer - B",
                 "Answer = (B)"):
        assert score("choice", text, "B", rec) == 1.0, text
    # the last line must be an option's whole text, not a sentence that starts with one
    assert verdict("choice", "Aspirin would be wrong here.", "A", rec)["parsed"] is None
    assert verdict("choice", "Thinking...\nOK", "A", rec)["parsed"] is None


def test_choice_takes_the_longest_option_a_text_starts_with():
    ch = {"A": "Aspirin", "B": "Aspirin and clopidogrel", "C": "Clopidogrel"}
    assert score("choice", "The answer is aspirin and clopidogrel.", "B", {"choices": ch}) == 1.0
    assert score("choice", "The answer is aspirin, alone.", "A", {"choices": ch}) == 1.0


def test_choice_text_must_end_where_the_option_ends():
    """"12" is not option "1"; "Hypertensive" is not option "Hyper"."""
    ch = {"A": "1", "B": "2", "C": "3", "D": "4"}
    for gold in "ABCD":
        v = verdict("choice", "The answer is 12", gold, {"choices": ch})
        assert v["correct"] is False and v["parsed"] is None, v
    assert score("choice", "The answer is 2 tablets", "B", {"choices": ch}) == 1.0


def test_choice_duplicate_option_texts_name_no_option():
    ch = {"A": "Both", "B": "Neither", "C": "both", "D": "Aspirin"}
    for gold in "AC":
        assert verdict("choice", "The answer is both.", gold, {"choices": ch})["parsed"] is None


def test_choice_a_letter_wins_over_an_option_whose_text_is_a_letter():
    """Which vitamin ...? (A) K (B) C (C) D: "C" names option C, not the option whose text is C."""
    ch = {"A": "K", "B": "C", "C": "D", "D": "E"}
    for text in ("<answer>C</answer>", "The answer is C", "C"):
        assert verdict("choice", text, "C", {"choices": ch})["parsed"] == "C", text


def test_choice_keys_other_than_letters_are_the_options():
    ch = {"1": "Aspirin", "2": "Ibuprofen", "3": "Acetaminophen"}
    assert score("choice", "The answer is 2", "2", {"choices": ch}) == 1.0
    assert score("choice", "The answer is (3).", "2", {"choices": ch}) == 0.0
    assert verdict("choice", "The answer is (3).", "2", {"choices": ch})["parsed"] == "3"


# ----------------------------------------------------------------------------- fixed readings

@pytest.mark.parametrize("text,right,wrong", [
    ("The answer is 7 because x = 3.", "7", "3"),
    ("The answer is 7, since $x = 3$.", "7", "3"),
    ("The answer is 3, because 10 - 3 = 7.", "3", "7"),
    ("The answer is 18 dollars, so x = 3.", "18", "3"),
    ("The answer is 3 \\times 6 = 18", "18", "3"),          # a chain still ends in its result
    ("The answer is: Janet's earnings = 9 * 2 = 18", "18", "9"),
    ("The answer is x = -5", "-5", "5")])
def test_an_equals_sign_in_a_later_clause_does_not_replace_the_stated_number(text, right, wrong):
    """A sentence's `=` gives its right side only when it ends the answer's own expression."""
    assert score("gsm8k", text, right) == 1.0
    assert score("gsm8k", text, wrong) == 0.0


@pytest.mark.parametrize("text", ["The answer isn't 20, it's 18.", "The answer is not 20; it is 18.",
                                  "The answer is not 20. It is 18."])
def test_a_negated_answer_phrase_states_nothing(text):
    assert score("gsm8k", text, "20") == 0.0
    assert score("gsm8k", text, "18") == 1.0
    assert score("choice", text.replace("20", "A").replace("18", "B"), "A", {"choices": CH}) == 0.0


@pytest.mark.parametrize("text,gold", [
    ("\\boxed{\\frac34}", "0.75"), ("\\boxed{-\\dfrac34}", "-0.75"), ("\\boxed{\\frac3{4}}", "0.75"),
    ("The answer is \\frac12.", "0.5"), ("\\boxed{\\mathbf{18}}", "18"), ("#### \\mathbf{18}", "18")])
def test_gsm8k_reads_latex_shorthands(text, gold):
    assert score("gsm8k", text, gold) == 1.0
    assert score("gsm8k", text, "3") == 0.0


def test_choice_reads_a_lower_case_letter_with_its_punctuation():
    for text in ("The answer is (b).", "b", "(b)", "Answer: b."):
        assert score("choice", text, "B", {"choices": CH}) == 1.0, text
        assert score("choice", text, "A", {"choices": CH}) == 0.0, text
    assert verdict("choice", "The answer is a drug.", "A", {"choices": CH})["parsed"] is None


# ----------------------------------------------------------------------------- gsm8k numbers

def test_gsm8k_number_edges():
    assert score("gsm8k", "So the profit is -\\$18", "-18") == 1.0       # minus before an escaped $
    assert verdict("gsm8k", "#### 018", "18")["parsed"] == "18"            # canonical digits
    for gold in ("1234", "12345", "5", "1"):                              # not thousands, not a number
        assert score("gsm8k", "The answer is 1,2345", gold) == 0.0, gold
    v = verdict("gsm8k", "\\boxed{\\frac{1}{0}}", "1")                   # no ZeroDivisionError
    assert v["correct"] is False and v["parsed"] is None
    assert score("gsm8k", "\\boxed{x = 2 \\times 9 = 18}", "18") == 1.0   # the last = gives the result
    assert score("gsm8k", "\\boxed{2 x^5}", "2") == 0.0                   # a power, not a unit
    assert score("gsm8k", "\\boxed{-\\frac{3}{4}}", "0.75") == 0.0
    assert score("gsm8k", "#### \u221218", "-18") == 1.0                  # a unicode minus
    assert score("gsm8k", "The answer is \u221218.", "-18") == 1.0
    assert score("gsm8k", "\\boxed{1{,}000}", "1000") == 1.0              # LaTeX's grouped comma
    assert score("gsm8k", "\\boxed{\\textbf{18}}", "18") == 1.0
    assert score("gsm8k", "\\boxed{\\left(18\\right)}", "18") == 1.0
    assert score("gsm8k", "\\boxed{\\frac{1}{3}}", "0.5") == 0.0         # a fraction, far off
    # a rounded answer needs decimals: 14053030 is not GSM-Hard's 14053029.666666666
    assert score("gsm8k", "#### 14053030", "14053029.666666666") == 0.0


def test_gsm8k_a_gold_must_be_one_number():
    from tcli.verifiers.gsm8k import gold_value

    with pytest.raises(ValueError, match="not a number"):
        gold_value("3, 5")


@pytest.mark.parametrize("task", ["gsm8k"])
def test_the_last_hashes_line_is_the_answer_and_headings_are_not(task):
    """A later `#### 20` corrects `#### 18`; a markdown heading (`#### Step 2: ...`,
    `#### 3. Totals`) states no answer, whatever number its title holds."""
    assert score(task, "#### 18\nWait, I forgot the tip.\n#### 20", "20") == 1.0
    steps = ("#### Step 1: Eggs per day\nJanet gets 16 eggs.\n#### Step 2: Money\n"
             "16 - 3 - 4 = 9 and 9 * 2 = 18.\n\nThe answer is 18.")
    assert score(task, steps, "18") == 1.0
    assert score(task, steps, "2") == 0.0
    numbered = "#### 1. Eggs\n16 - 3 - 4 = 9\n#### 2. Money\n9 * 2 = 18"
    assert score(task, numbered, "18") == 1.0
    assert score(task, numbered, "2") == 0.0


def test_gsm8k_a_hashes_line_without_a_number_gives_way():
    assert score("gsm8k", "#### (see below)\nso \\boxed{18}", "18") == 1.0


def test_arith_signs():
    assert score("arith", "#### -0", "0") == 1.0
    assert score("arith", "#### 18\nWait, I forgot the tip.\n#### 20", "20") == 1.0
    assert score("arith", "The total is (10+5)-3", "3") == 1.0   # a minus after a bracket is binary
    assert score("arith", "The total is (10+5)-3", "-3") == 0.0


def test_auto_reads_an_embedded_source_in_any_case():
    from tcli.verifiers import pick_task

    assert pick_task({"meta": {"source": " TCLI-Arith "}, "answer": "5"}) == "arith"


# ----------------------------------------------------------------------------- math

def test_math_words_fall_back_to_a_normalised_string():
    """Answers math-verify cannot parse (names, phrases) match as text: case, spaces, wrappers
    and percent signs aside."""
    pytest.importorskip("math_verify")
    for text, gold in ((r"\boxed{devon and eve}", r"\text{Devon and Eve}"),
                       (r"\boxed{north east}", r"\mathrm{north\ east}"),
                       (r"\boxed{50% off}", r"\text{50\% off}")):
        r, v = get_verifier("math")(text, gold, {})
        assert (r, v.get("match")) == (1.0, "string"), (text, v)
    assert score("math", r"\boxed{devon}", r"\text{Devon and Eve}") == 0.0
    v = verdict("math", r"\boxed{\text{}}", "5")
    assert v["correct"] is False and v["reason"] == "answer could not be parsed"


def test_math_control_characters_inside_an_answer_are_dropped():
    pytest.importorskip("math_verify")
    assert score("math", "\\boxed{1\x008}", "18") == 1.0


@pytest.mark.parametrize("pred", ["1" * 401, "(" * 7 + "1" + ")" * 7, "10^{100000}",
                                  "2^{2^{10}}", "2^{x^{y^{z}}}"])
def test_math_refuses_answers_too_costly_to_parse(pred):
    from tcli.verifiers.math import too_complex

    assert too_complex(pred) is not None


@pytest.mark.parametrize("pred", ["e^{x^{2}}", "2^{2^n}", "10^{9}", r"\frac{\sqrt{3}}{2}"])
def test_math_symbolic_exponents_are_fine(pred):
    from tcli.verifiers.math import too_complex

    assert too_complex(pred) is None
