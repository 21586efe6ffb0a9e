"""``math``: the final answer from the last ``\\boxed{}`` (or "The answer is ..."), compared with
math-verify against the gold LaTeX answer (so ``\\frac12``, ``0.5`` and ``\\dfrac{1}{2}`` agree);
a gold written as a GSM8K solution (``... reasoning ... #### 72``) is what follows its last
``####``.

LaTeX parsing and sympy simplification are exponential in nesting depth (a ``\\frac`` nested 16
deep takes seconds, 20 deep minutes), so answers that are too long or too deeply nested are
rejected before they reach the parser.
"""

from __future__ import annotations

import functools
import re

from tcli.verifiers.extract import (MAX_ANSWER_CHARS, balanced_end, final_answer, gold_answer,
                                    nesting_depth, tail)
from tcli.verifiers.registry import VERIFIERS, verdict

MAX_DEPTH = 6     # bracket nesting; gold answers of MATH-500 need at most 2
MAX_FRACS = 8     # \frac commands in one answer


@functools.cache
def load_math_verify():
    """Import math-verify once, quietly. Called in the parent before forking workers."""
    import logging

    import math_verify  # noqa: F401
    from math_verify import grader, parser

    # we call it without its signal-based timeouts (the verify stage kills slow workers itself),
    # which makes it warn once per process; the warning and its parse-failure logs are noise here
    for mod in (grader, parser):
        if hasattr(mod, "TIMEOUT_WARNING_SHOWN"):
            mod.TIMEOUT_WARNING_SHOWN = True
    for name in ("math_verify", "latex2sympy2_extended"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    return math_verify


def warm_up() -> None:
    """Build the LaTeX parser once (about 0.3 s) so forked workers do not each pay for it."""
    _gold(r"\frac{1}{2}")
    _parse(r"\boxed{1}")


@functools.cache
def _latex_only():
    from math_verify import LatexExtractionConfig

    return [LatexExtractionConfig()]


def _parse(s: str):
    """LaTeX extraction only: math-verify's plain-expression extractor runs sympy's parse_expr,
    which eval()s its input, and model text must never reach eval."""
    from math_verify import parse

    return parse(s, extraction_config=_latex_only(), parsing_timeout=None)


@functools.lru_cache(maxsize=4096)
def _gold(answer: str):
    """Gold answers repeat across the samples of a prompt: parse each once per process."""
    return tuple(_parse("$" + answer + "$"))


_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_SPACE = re.compile(r"\s+|\\[,;:! ]|\\q?quad")
_WRAP = re.compile(r"\\(?:text|textbf|mathrm|mbox|mathbf)\{([^{}]*)\}")


def normalise(s: str) -> str:
    """A plain-string form for answers math-verify cannot parse (names, words, odd notation)."""
    s = s.strip().strip("$").strip()
    s = _WRAP.sub(r"\1", s)
    s = s.replace("\\left", "").replace("\\right", "").replace("\\dfrac", "\\frac")
    s = s.replace("\\tfrac", "\\frac").replace("^\\circ", "").replace("^{\\circ}", "")
    s = s.replace("\\$", "").replace("\\%", "").replace("%", "")
    s = _SPACE.sub("", s)
    return s.rstrip(".").lower()


def extract(text: str) -> tuple[str | None, str | None]:
    """(answer, how) from the end of a response: last ``\\boxed{}``, else "the answer is"."""
    return final_answer(tail(text))


_BIG_EXPONENT = re.compile(r"\d{5}")
_BIG_FACTORIAL = re.compile(r"\d{6}\s*!|\\[dt]?binom\s*\{[^{}]*\d{6}|\d{6}[^{}]*\}\s*\\choose")
MAX_EXPONENT_DEPTH = 2


def _exponent_problem(s: str) -> str | None:
    """Exponents sympy would evaluate into astronomically large integers: a tower three deep
    (2^{2^{2^{2^{2^{2}}}}}) or an exponent of five or more digits (10^{10^{10}} never finishes)."""
    stack: list[bool] = []  # one entry per open brace: True when it opened an exponent
    i, n = 0, len(s)
    while i < n:
        c = s[i]
        if c == "\\":
            i += 2
            continue
        if c == "^":
            j = i + 1
            while j < n and s[j] == " ":
                j += 1
            if j < n and s[j] == "{":
                if sum(stack) >= MAX_EXPONENT_DEPTH:
                    return "exponent tower too deep"
                stack.append(True)
                i = j + 1
                continue
            m = _BIG_EXPONENT.match(s, j)
            if m:
                return "exponent too large"
        elif c == "{":
            stack.append(False)
        elif c == "}":
            if stack:
                stack.pop()
        elif c.isdigit() and any(stack):
            m = _BIG_EXPONENT.match(s, i)
            if m:
                return "exponent too large"
            while i < n and s[i].isdigit():
                i += 1
            continue
        i += 1
    return None


_EXP_GROUP = re.compile(r"\^\s*\{")
_COMMAND = re.compile(r"\\[A-Za-z]+")


def _numeric_tower(s: str) -> bool:
    """An exponent that itself holds a numeric power (2^{2^{10}}, 9^{9^{9}}): sympy would try to
    compute it exactly. Symbolic ones (e^{x^2}, 2^{2^n}) stay unevaluated and are fine."""
    for m in _EXP_GROUP.finditer(s):
        end = balanced_end(s, m.end() - 1, len(s))
        body = s[m.end():end - 1] if end else s[m.end():]
        if "^" in body and not re.search(r"[A-Za-z]", _COMMAND.sub("", body)):
            return True
    return False


def too_complex(pred: str) -> str | None:
    """Why an answer is not worth handing to the LaTeX parser and sympy (None when it is fine)."""
    if len(pred) > MAX_ANSWER_CHARS:
        return f"answer too long ({len(pred)} chars > {MAX_ANSWER_CHARS})"
    depth = nesting_depth(pred)
    if depth > MAX_DEPTH:
        return f"answer too deeply nested (depth {depth} > {MAX_DEPTH})"
    if pred.count("\\frac") + pred.count("\\dfrac") > MAX_FRACS:
        return f"answer has too many fractions (> {MAX_FRACS})"
    if _BIG_FACTORIAL.search(pred):
        return "factorial or binomial too large"
    if _numeric_tower(pred):
        return "numeric exponent tower"
    return _exponent_problem(pred)


@VERIFIERS.register("math")
def verify_math(text: str, answer: str, record: dict) -> tuple[float, dict]:
    answer = gold_answer(answer).strip()  # a GSM8K solution's gold: after its last ####
    if not answer:  # a bad record, not a wrong response: never a quiet 0
        raise ValueError("gold answer is empty (nothing after its ####)")
    pred, how = extract(text)
    if pred:
        pred = _CONTROL.sub("", pred).strip()
    if not pred:
        return verdict("math", None, False, reason="no answer found")
    problem = too_complex(pred)
    if problem:
        return verdict("math", pred, False, via=how, reason=problem)
    load_math_verify()
    from math_verify import verify

    gold = list(_gold(answer))
    got = _parse("\\boxed{" + pred + "}")
    if gold and got and verify(gold, got, timeout_seconds=None):
        return verdict("math", pred, True, via=how)
    if normalise(pred) == normalise(answer):
        return verdict("math", pred, True, via=how, match="string")
    reason = None if got else "answer could not be parsed"
    return verdict("math", pred, False, via=how, reason=reason)
