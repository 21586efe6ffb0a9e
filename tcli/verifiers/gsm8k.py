"""``gsm8k``: a numeric final answer (GSM8K, GSM-Hard), compared with a relative tolerance.

The gold answer is a number, or a GSM8K solution as published (its number after ``####``).
The response's answer is taken from the last ``####`` line (never a markdown heading, ``#### Step
2: ...``), else the last ``\\boxed{}``, else "The answer is ...", else the last number in the
response. A ``####`` line or a box must hold one number; a sentence gives its first number
unless that is part of an expression or a list (``3, 5``, ``3 5``: then no answer), and an ``=``
after words belongs to a later clause (``7 because x = 3`` states 7). Thousands separators
(commas or spaces: ``1 234``), ``$``, ``%``, trailing periods and units are ignored; a minus
sign counts only when it is not a binary minus (``12-3`` and ``12 - 3`` end in 3, not -3).
Values are exact: numbers as written are ``Decimal`` (a 10,000-digit number neither overflows
nor loses its digits, and GSM-Hard answers like ``0.0000195766`` compare exactly), fractions are
``Fraction``, and comparisons run on exact rationals, never floats: integers of any size compare
digit for digit (``10**30 + 1`` is not ``10**30``).
"""

from __future__ import annotations

import functools
import re
from decimal import Decimal, InvalidOperation
from fractions import Fraction

from tcli.verifiers.extract import NOT_ONE, final_answer, gold_answer, last_hashes, tail
from tcli.verifiers.registry import VERIFIERS, verdict

REL_TOL = Fraction(1, 10**14)  # float artefacts of GSM-Hard targets: 3244047.0999999996 == 3244047.1
FLOAT_EXACT = 2**53            # ... which only exist where a float still holds fractions
MIN_DECIMALS = 2            # a rounded prediction needs at least this many decimals ...
MIN_SIGNIFICANT = 3         # ... and this many significant digits to count as the gold, rounded

_NUM = re.compile(r"(?<![\d.])\.\d+|(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?(?:[eE][-+]?\d{1,3}(?!\w))?")
_MINUS = "-\u2212\u2013"  # ascii hyphen-minus, unicode minus, en dash
_SKIP_BEFORE_NUM = " $\\"


def _sign(text: str, start: int) -> str:
    """'-' when the number starting at ``start`` is negated by a unary minus, else ''."""
    j = start - 1
    stop = max(-1, start - 4)
    while j > stop and text[j] in _SKIP_BEFORE_NUM:
        j -= 1
    if j < 0 or text[j] not in _MINUS:
        return ""
    before = text[j - 1] if j > 0 else " "
    if before.isalnum() or before in ")]}":
        return ""  # a binary minus: 12-3
    k = j - 1
    while k >= 0 and text[k] == " ":
        k -= 1
    spaced = k < j - 1 and text[j + 1:j + 2] == " "
    if spaced and k >= 0 and (text[k].isdigit() or text[k] in ")]}"):
        return ""  # spaced on both sides after a number: 12 - 3 (but "is -3", "12 -3" negate)
    return "-"


def numbers(text: str):
    """Every number in ``text`` as (start, end, canonical string, Decimal)."""
    for m in _NUM.finditer(text):
        raw = m.group().replace(",", "").lstrip("0")
        if not raw[:1].isdigit():
            raw = "0" + raw  # ".5" -> "0.5", "000" -> "0"
        s = _sign(text, m.start()) + raw
        try:
            yield m.start(), m.end(), s, Decimal(s)
        except InvalidOperation:  # pragma: no cover - the regex only admits valid literals
            continue


def first_number(text: str):
    for n in numbers(text):
        return n[2], n[3]
    return None


def last_number(text: str):
    last = None
    for last in numbers(text):
        pass
    return (last[2], last[3]) if last else None


_WRAPPERS = re.compile(r"\\(?:text|textbf|mathrm|mathbf|boldsymbol|mbox)\{([^{}]*)\}")
# \frac{a}{b}, or the shorthand of one-digit parts: \frac34, \frac3{4}, \frac{3}4
_FRAC = re.compile(r"^([-\u2212]?)\\[dt]?frac\s*(?:\{([^{}]+)\}|(\d))\s*(?:\{([^{}]+)\}|(\d))$"
                   r"|^([-\u2212]?\d+(?:\.\d+)?)\s*/\s*(\d+(?:\.\d+)?)$")


def _frac_value(s: str):
    """``\\frac{a}{b}`` or ``a/b`` as (text, exact Fraction); None if ``s`` is not one."""
    m = _FRAC.match(s)
    if not m:
        return None
    if m.group(6) is None:
        sign, a, b = m.group(1), m.group(2) or m.group(3), m.group(4) or m.group(5)
    else:
        sign, a, b = "", m.group(6), m.group(7)
    a_n, b_n = first_number(a), first_number(b)
    if a_n is None or b_n is None or b_n[1] == 0:
        return None
    value = Fraction(a_n[1]) / Fraction(b_n[1])
    if sign:
        value = -value
    return f"{sign}{a_n[0]}/{b_n[0]}", value


# spaces that group thousands (1 234, 1\ 234, 1~234, thin and no-break spaces) and squared or
# cubed units (cm^2), which a single number may hold; any other power, root or factorial is an
# expression, which states no single number
_SPACES = re.compile(r"\\[;: ]|[~\u00a0\u2009\u202f]")
_GROUPED = re.compile(r"(?<![\d.,])\d{1,3}(?: \d{3})+(?!\d)")
_UNIT_POWER = re.compile(r"(?<![\w\\])([A-Za-z]{1,4})\s*\^\s*(?:\{\s*[23]\s*\}|[23])(?!\w)")
_COMMAND = r"\\(?!left\b|right\b|approx\b|quad\b|qquad\b)[A-Za-z]+"
_EXPRESSION = re.compile(r"[\^!]|" + _COMMAND)
# in a sentence ("The answer is ..."), what makes its first number part of an expression or a
# list: a group or command before it, or an operator, power or command right after it, or another
# number after a space (3 5; thousands' spaces, 1 234, are gone by then)
_BEFORE = re.compile(r"[{^]|" + _COMMAND)
_AFTER = re.compile(r"\s*(?:\^|" + _COMMAND
                    + r"|[-+*/:,\u00d7\u00b7\u2212]\s*[\d({\\.])|\s+\d")


_WORD = re.compile(r"[A-Za-z]{2,}")


def _result_side(s: str, sentence: bool) -> str:
    """What follows the last ``=`` (``2 \\times 9 = 18``, ``x = -5``). In a sentence, only when
    no words come between its first number and the first ``=``: in ``7 because x = 3`` the
    ``=`` belongs to a later clause and the answer is 7, not 3."""
    if "=" not in s:
        return s
    if sentence:
        first = next(numbers(s), None)
        eq = s.index("=")
        between = re.sub(r"\\[A-Za-z]+", " ", s[first[1]:eq]) if first and first[0] < eq else ""
        if _WORD.search(between):
            return s
    return s.rsplit("=", 1)[1]


def _cleaned(answer: str, sentence: bool = False):
    """(exact fraction or None, the answer's text with wrappers, ``=``'s left side and
    thousands' spaces gone)."""
    s = _WRAPPERS.sub(r" \1 ", answer)
    s = s.replace("{,}", ",").replace("\\!", "").replace("\\,", "").replace("\\%", "%")
    s = s.replace("\\$", "$").strip().strip("$").strip()
    frac = _frac_value(s)
    if frac is not None:
        return frac, s
    s = _result_side(s, sentence)
    return None, _GROUPED.sub(lambda m: m.group().replace(" ", ""), _SPACES.sub(" ", s))


def _single(s: str):
    """The one number ``s`` holds, or None (none, several, or an expression)."""
    s = _UNIT_POWER.sub(r"\1", s)
    if _EXPRESSION.search(s):
        return None
    found = [n for _, n in zip(range(2), numbers(s))]
    return (found[0][2], found[0][3]) if len(found) == 1 else None


def number_in(answer: str, single: bool = False):
    """The number an extracted final answer states: ``\\$1,234``, ``1 234``, ``18 \\text{ eggs}``,
    ``\\frac{3}{4}``, ``x = -5`` all work; None if there is none. ``single``: None also when
    the answer is not one number (``2 \\times 9``, ``10^6``, ``18, 20``), never its first one."""
    frac, s = _cleaned(answer)
    if frac is not None:
        return frac
    return _single(s) if single else first_number(s)


def stated_number(found: str, sentence: bool = False):
    """The number a ``####`` line, a box or (``sentence``) an answer phrase states; None when
    it holds none; ``NOT_ONE`` when it holds an expression or several numbers (no answer,
    rather than one of its numbers). A sentence may say more than its number (``18 dollars for
    7 days`` is 18), but its first number must not be part of an expression
    (``\\frac{3\\sqrt{3}}{4}``, ``3, 5, 7``, ``3 5``, ``12 - 3``; ``1 234`` is one number)."""
    frac, s = _cleaned(found, sentence)
    if frac is not None:
        return frac
    got = _single(s)
    if got is not None:
        return got
    first = next(numbers(s), None)
    if first is None:
        return None
    if sentence and not (_BEFORE.search(s, 0, first[0]) or _AFTER.match(s, first[1])):
        return first[2], first[3]
    return NOT_ONE


def gold_value(answer: str):
    """The gold's number; a GSM8K solution as published (``... reasoning ... #### 72``) is read
    after its last ``####``, never from the reasoning before it (:func:`gold_answer`)."""
    answer = gold_answer(answer)
    got = number_in(answer, single=True)
    if got is None:
        raise ValueError(f"gold answer {answer[:50]!r} is not a number")
    return got[1]


def _integral(x) -> bool:
    if isinstance(x, Fraction):
        return x.denominator == 1
    return x == x.to_integral_value()


def close(pred, gold) -> bool:
    """Equal, equal up to float noise (relative 1e-14, below 2**53 where floats hold
    fractions), or ``pred`` is ``gold`` correctly rounded to the decimals ``pred`` was written
    with (``14053029.67`` for GSM-Hard's ``14053029.666666666``; at least 2 decimals and 3
    significant digits, so ``0.00`` is not "0.0016 rounded"). Integers compare exactly, at any
    size: 70001 is not 70000. ``pred`` and ``gold`` are Decimal or Fraction; all exact."""
    if pred == gold:
        return True
    if _integral(pred) and _integral(gold):
        return False
    p, g = Fraction(pred), Fraction(gold)
    diff, size = abs(p - g), max(abs(p), abs(g))
    if size < FLOAT_EXACT and diff <= REL_TOL * size:
        return True
    if not isinstance(pred, Decimal):
        return False
    exp = pred.as_tuple().exponent
    if not isinstance(exp, int) or -exp < MIN_DECIMALS or pred.adjusted() - exp + 1 < MIN_SIGNIFICANT:
        return False
    return diff <= Fraction(1, 2) * Fraction(10) ** exp  # half a unit of the last printed digit


def extract(text: str):
    """((canonical string, value), how) of the final answer, or (None, None); (None, how) when
    the ``####`` line, the box or the answer sentence holds an expression, not a number."""
    t = tail(text)
    k = last_hashes(t)
    if k >= 0:
        eol = t.find("\n", k)
        got = stated_number(t[k:eol if eol >= 0 else len(t)])  # the whole line: no cut number
        if got is not None:
            return (None if got is NOT_ONE else got), "####"
    got, how = final_answer(t, functools.partial(stated_number, sentence=True), stated_number)
    if got is not None or how is not None:
        return got, how
    got = last_number(t)
    if got is not None:
        return got, "last number"
    return None, None


@VERIFIERS.register("gsm8k")
def verify_gsm8k(text: str, answer: str, record: dict) -> tuple[float, dict]:
    gold = gold_value(answer)
    got, how = extract(text)
    if got is None:
        return verdict("gsm8k", None, False, reason="no answer found" if how is None
                       else f"the final answer ({how}) is not a single number")
    return verdict("gsm8k", got[0], close(got[1], gold), via=how)
