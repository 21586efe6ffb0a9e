"""The calc tool: exact answers, and refusals (never eval, never a hang on huge powers)."""

from __future__ import annotations

from fractions import Fraction

import pytest

from tcli.tools import Toolset
from tcli.tools.calc import MAX_BITS, MAX_CHARS, CalcError, calc, evaluate, format_value


@pytest.mark.parametrize("expr, want", [
    ("12*7", "84"), ("1/3 + 1/6", "0.5"), ("0.1 + 0.2", "0.3"), ("(1/3)*3", "1"),
    ("10/4", "2.5"), ("1/7", "1/7"), ("-1/3", "-1/3"), ("-7//2", "-4"), ("-7 % 3", "2"),
    ("7.5 % 2", "1.5"), ("2**-2", "0.25"), ("(-2)**3", "-8"), ("-2**2", "-4"), ("+5", "5"),
    ("2**3**2", "512"), ("1e400 - 1e400 + 1", "1"), ("1_000 * 3", "3000"),
    ("2**64 + 1", "18446744073709551617"), ("10**30 / 10**28", "100"), ("0.000001 * 3", "0.000003"),
    ("-0.5 - 0.25", "-0.75"), ("1/2**60", "1/1152921504606846976"), ("3 * (4 + 5) - 6 / 2", "24"),
])
def test_exact_answers(expr, want):
    assert calc(expr) == want


def test_decimal_literals_are_read_from_their_digits():
    assert evaluate("0.1") == Fraction(1, 10)  # not the float 0.1000000000000000055...
    assert evaluate("1e-3") == Fraction(1, 1000)
    assert evaluate("12345678901234567890.5") == Fraction(24691357802469135781, 2)


def test_format_value():
    assert format_value(Fraction(7, 2)) == "3.5"
    assert format_value(Fraction(-1, 8)) == "-0.125"
    assert format_value(Fraction(1, 3)) == "1/3"
    assert format_value(Fraction(2, 6)) == "1/3"  # reduced
    assert format_value(Fraction(1, 10**51)) == f"1/{10**51}"  # past MAX_DECIMALS places


@pytest.mark.parametrize("expr, why", [
    ("9**9**9", "exponent too large"), ("2**(10**6)", "exponent too large"),
    (f"2**{MAX_BITS + 1}", "too large"), ("(2**5000)**3", "too large"),
    ("(2**9000) * (2**9000)", "too large"), ("1/0", "division by zero"),
    ("5//0", "division by zero"),
    ("5 % 0", "modulo by zero"), ("0**-1", "division by zero"), ("2**0.5", "integer exponents"),
    ("2^3", "use [*][*] for powers"), ("__import__('os').system('true')", "not allowed"),
    ("open('/etc/passwd')", "not allowed"), ("x + 1", "not allowed"), ("(1).real", "not allowed"),
    ("'a' * 3", "not a number"), ("True + 1", "not a number"), ("1j * 2", "not a number"),
    ("1 < 2", "not allowed"), ("lambda: 1", "not allowed"), ("[1, 2]", "not allowed"),
    ("", "empty"), ("   ", "empty"), ("1 +", "cannot parse"), ("1" * (MAX_CHARS + 1), "too long"),
    ("(" * 300 + "1" + ")" * 300, "cannot parse"), ("-" * 990 + "1", "nested|parse"),
    ("9" * 990 + "**4", "too large"),
])
def test_refusals(expr, why):
    with pytest.raises(CalcError, match=why):
        calc(expr)
    with pytest.raises(CalcError):
        evaluate(expr)  # the same refusal without formatting

def test_calc_through_a_toolset_is_an_error_turn_not_an_exception():
    ts = Toolset(["calc"], fmt="tags")
    ok = ts.step("so <calc>12*7</calc>")
    assert (ok.result, ok.error, ok.call) == ("84", None, {"name": "calc",
                                                          "arguments": {"expression": "12*7"}})
    bad = ts.step("<calc>9**9**9</calc>")
    assert bad.error == "tool_error" and "exponent too large" in bad.result
    hermes = Toolset(["calc"], fmt="hermes")
    wrong = hermes.step('<tool_call>{"name": "calc", "arguments": {"expr": "1"}}</tool_call>')
    assert wrong.error == "tool_error" and '"expression"' in wrong.result
    call = '<tool_call>{"name": "calc", "arguments": {"expression": "2/3"}}</tool_call>'
    same = [hermes.step(call).result for _ in range(2)]
    assert same == ["2/3", "2/3"]


def test_exponent_limit_is_inclusive():
    """|exponent| up to MAX_EXPONENT (10,000) is allowed; only larger ones are refused."""
    assert calc("1**10000") == "1" and calc("(-1)**10000") == "1" and calc("1**-10000") == "1"
    with pytest.raises(CalcError, match="exponent too large"):
        calc("1**10001")
