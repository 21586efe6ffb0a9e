"""How a verifier's results become a record's fields, checked where Python callers meet them
(``Tasks``, ``checked``), not only through the command line that validates its flags first."""

from __future__ import annotations

import math

import pytest

from tcli.errors import UsageError
from tcli.verifiers.call import checked, is_crash
from tcli.verifiers.weighted import Tasks, first_reward


@pytest.mark.parametrize("names,weights,words", [
    (["gsm8k", "gsm8k"], None, "given twice"), (["gsm8k", "math"], [1.0], "one per task"),
    (["gsm8k"], [1.0, 2.0], "one per task"), (["gsm8k", "math"], [1.0, math.nan], "finite"),
    (["gsm8k", "math"], [1.0, math.inf], "finite")])
def test_tasks_refuse_names_and_weights_that_do_not_fit(names, weights, words):
    with pytest.raises(UsageError, match=words):
        Tasks.of(names, weights)


def test_the_first_reward_is_the_first_tasks_own_not_the_weighted_sum():
    several = Tasks.of(["arith", "gsm8k"], [0.5, 2.0])
    rec: dict = {}
    several.apply(rec, [(1.0, {"task": "arith"}), (0.0, {"task": "gsm8k"})], "f", 1)
    assert (rec["reward"], first_reward(rec)) == (0.5, 1.0)
    one = Tasks.of("arith", [0.25])
    rec = {}
    one.apply(rec, [(1.0, {"task": "arith"})], "f", 1)
    assert (rec["reward"], first_reward(rec)) == (0.25, 1.0)


def test_a_bare_reward_says_whether_it_was_correct():
    assert checked("p", 0.0)[1]["correct"] is False
    assert checked("p", 1)[1]["correct"] is True
    assert checked("p", (0.0, {"parsed": "7"}))[1] == {"task": "p", "parsed": "7", "correct": False}


def test_a_verdict_cannot_mark_itself_crashed():
    """Only a failure of the verifier says it crashed: a plugin's own `crashed` key is dropped."""
    reward, v = checked("p", (1.0, {"crashed": True}))
    assert reward == 1.0 and "crashed" not in v and not is_crash(v)


def test_a_tuple_must_be_reward_and_verdict():
    with pytest.raises(TypeError, match="tuple of 1"):
        checked("p", (1.0,))
    with pytest.raises(TypeError, match="tuple of 3"):
        checked("p", (1.0, {}, 2))


def test_auto_may_need_math_verify():
    """`auto` can pick `math`: its workers load math-verify once, before they fork."""
    from tcli.verifiers import uses_math_verify

    assert uses_math_verify("auto") and uses_math_verify("math")
    assert not uses_math_verify("gsm8k") and not uses_math_verify("python:m:f")


@pytest.mark.parametrize("spec,words", [("python::score", "write python:module:function"),
                                        ("python:math:", "write python:module:function"),
                                        ("python:math:pi", "no function 'pi'")])
def test_a_plugin_spec_must_name_a_function(spec, words):
    from tcli.verifiers import get_verifier

    with pytest.raises(UsageError, match=words):
        get_verifier(spec)
