"""The ``countdown`` verifier: every written line is checked exactly, then the final target.

Reward 1 only when the response is a complete legal chain (see ``task.py``): each line
``a op b=c`` is arithmetically right and non-negative, its left operand is the previous result
(the first line's are two of the given numbers), its right operand an unused number, every
number is used exactly once, and the ``#### n`` line repeats the last result, which is the
target. Anything else scores 0 with a ``reason``; model text never raises. Work is bounded: a
response over MAX_CHARS characters is rejected before any parsing, and each line is one
anchored regex match on at most a few dozen characters.

Registered as ``countdown`` when ``examples.countdown`` is imported (library use); from the
command line name it ``python:examples.countdown.verify:verify_countdown``.
"""

from __future__ import annotations

import re

from tcli.verifiers import VERIFIERS, verdict

from examples.countdown.task import apply, parse_prompt

MAX_CHARS = 400                    # a right answer is under 40 characters
_LINE = re.compile(r"(\d{1,6})([-+*])(\d{1,6})=(\d{1,9})")
_FINAL = re.compile(r"#### (\d{1,9})")


def check_chain(text: str, numbers: list[int], target: int) -> tuple[int | None, str | None]:
    """(final number written or None, why the chain is not a solution or None)."""
    if len(text) > MAX_CHARS:
        return None, f"longer than {MAX_CHARS} characters"
    lines = text.strip().split("\n")
    if len(lines) != len(numbers):
        return None, f"{len(lines)} lines, a solution has {len(numbers)}"
    unused, prev = list(numbers), None
    for i, line in enumerate(lines[:-1], 1):
        m = _LINE.fullmatch(line.strip())
        if not m:
            return None, f"line {i} is not 'a op b=c'"
        a, op, b, c = int(m[1]), m[2], int(m[3]), int(m[4])
        operands = [b] if prev is not None else [a, b]
        if prev is not None and a != prev:
            return None, f"line {i} does not start from the previous result {prev}"
        for x in operands:
            if x not in unused:
                return None, f"line {i} uses {x}, which is not an unused given number"
            unused.remove(x)
        if apply(a, op, b) != c:
            return None, f"line {i}: {a}{op}{b} is not {c}"
        prev = c
    m = _FINAL.fullmatch(lines[-1].strip())
    if not m:
        return None, "no final '#### n' line"
    got = int(m[1])
    if got != prev:
        return got, f"the final line says {got}, the last result is {prev}"
    return got, None if got == target else f"reaches {got}, not the target {target}"


def verify_countdown(text: str, answer: str, record: dict) -> tuple[float, dict]:
    """``fn(text, answer, record)``: the numbers come from the record's prompt, the target is
    ``answer`` (and must agree with the prompt's). A bad prompt or gold raises ValueError (a data
    error, not the model's)."""
    numbers, target = parse_prompt(str(record.get("prompt", "")))
    if str(answer).strip() != str(target):
        raise ValueError(f"gold answer {str(answer)[:20]!r} is not the prompt's target {target}")
    got, reason = check_chain(str(text), numbers, target)
    extra = {"reason": reason} if reason else {}
    return verdict("countdown", None if got is None else str(got), reason is None, **extra)


if "countdown" not in VERIFIERS:  # the module may be imported twice (script and package)
    VERIFIERS.register("countdown")(verify_countdown)
