"""``arith``: exact integer answers (the synthetic ``tcli-arith`` task, examples/arith).

The number after the last ``####`` when there is one, else the last number of the response; it
must be an integer (``18``, ``-7``, ``018``, ``18.00``; ``18.5`` is not 18). Integers are
compared as digit strings, so any size compares exactly (``10**30 + 1`` is not ``10**30``) and a
10,000-digit answer needs no big-int conversion (Python refuses int() of strings over 4,300
digits).
"""

from __future__ import annotations

import re

from tcli.verifiers.extract import tail
from tcli.verifiers.registry import VERIFIERS, verdict

_NUMBER = r"(\d+)(?:\.(\d+))?"
_INT = re.compile(r"(?<![\w)\]}])[-\u2212]?" + _NUMBER + "|" + _NUMBER)
_AFTER_HASHES = re.compile(r"\s*[-\u2212]?" + _NUMBER)
_CANONICAL = re.compile(r"\s*([-+\u2212]?)" + _NUMBER + r"\s*")


def canonical(s: str) -> str | None:
    """'-0042' -> '-42', '0' -> '0', '+7' -> '7', '18.00' -> '18'; None if ``s`` is not an
    integer ('18.5', 'x')."""
    m = _CANONICAL.fullmatch(s)
    if not m or (m.group(3) and m.group(3).strip("0")):
        return None
    digits = m.group(2).lstrip("0") or "0"
    neg = m.group(1) in ("-", "\u2212") and digits != "0"
    return ("-" if neg else "") + digits


def extract(text: str) -> tuple[str | None, str | None]:
    t = tail(text)
    k = t.rfind("####")
    if k >= 0:
        m = _AFTER_HASHES.match(t, k + 4)
        return (canonical(m.group()), "####") if m else (None, "####")
    last = None
    for last in _INT.finditer(t):
        pass
    return (canonical(last.group()), "last integer") if last else (None, None)


@VERIFIERS.register("arith")
def verify_arith(text: str, answer: str, record: dict) -> tuple[float, dict]:
    gold = canonical(answer)
    if gold is None:
        raise ValueError(f"gold answer {answer[:50]!r} is not an integer")
    got, how = extract(text)
    if got is None:
        if how is None:
            reason = "no answer found"
        else:
            reason = "no integer after ####" if how == "####" else "the last number is not an integer"
        return verdict("arith", None, False, via=how, reason=reason)
    return verdict("arith", got, got == gold, via=how)
