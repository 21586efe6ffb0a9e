"""Answer extraction: find the final answer a response states, on a bounded tail of it.

Model text is adversarial input: every helper here looks only at a bounded tail of a response,
caps the length of what it extracts, bounds the work of each scan and never evaluates anything.
Shared by the built-in verifiers (and usable by users' ``python:module:function`` ones).
"""

from __future__ import annotations

import re
from typing import Callable

TAIL_CHARS = 16_384        # answers are at the end: never scan more than this much of a response
MAX_ANSWER_CHARS = 400     # an extracted final answer longer than this is not an answer
MAX_PARSED_CHARS = 200     # what a verdict echoes back of the parsed answer


def tail(text: str, n: int = TAIL_CHARS) -> str:
    """The last ``n`` characters: bounds every regex and scan on absurdly long responses. A word
    (a number) cut in two at the start is dropped, so the tail of a longer number never passes
    for a number of its own."""
    if len(text) <= n:
        return text
    t = text[-n:]
    if text[-n - 1].isalnum():
        i = 0
        while i < len(t) and t[i].isalnum():
            i += 1
        t = t[i:]
    return t


def gold_answer(answer: str) -> str:
    """The gold a record states: a GSM8K solution as published (``... reasoning ... #### 72``)
    states it after its last ``####``, on that line, never in the reasoning before it; any other
    gold is itself."""
    k = answer.rfind("####")
    return answer[k + 4:].split("\n", 1)[0].strip() if k >= 0 else answer


# "#### 72" states an answer; "#### Step 2: ..." and "#### 3. Totals" are markdown headings
_HASHES = re.compile(r"####(?=[ \t]*[-+\u2212$\\\d.(])(?![ \t]*\d+[.)][ \t]+[A-Za-z])")


def last_hashes(text: str) -> int:
    """Index just past the last ``####`` that states an answer (-1 when none does)."""
    last = None
    for last in _HASHES.finditer(text):
        pass
    return last.end() if last else -1


def _uncut(text: str, start: int, end: int) -> str:
    """``text[start:end]`` without a word (a number) that the slice's end cuts in two."""
    part = text[start:end]
    if end < len(text) and text[end].isalnum():
        k = len(part)
        while k and part[k - 1].isalnum():
            k -= 1
        part = part[:k]
    return part


def shown(s: str | None) -> str | None:
    """A parsed answer as echoed in a verdict (bounded, so a 10,000-digit answer stays small)."""
    if s is None or len(s) <= MAX_PARSED_CHARS:
        return s
    return s[:MAX_PARSED_CHARS] + f"...({len(s)} chars)"


def balanced_end(text: str, open_at: int, limit: int) -> int | None:
    """Index just past the ``}`` closing the ``{`` at ``open_at``; None if unclosed within ``limit``."""
    depth = 0
    end = min(len(text), open_at + limit)
    i = open_at
    while i < end:
        c = text[i]
        if c == "\\":
            i += 2  # an escaped character (\{ or \}) never opens or closes a group
            continue
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return i + 1
        i += 1
    return None


_BOXED = re.compile(r"\\(?:boxed|fbox)\s*")
MAX_BOXED_TRIES = 16


def last_boxed(text: str, limit: int = 4 * MAX_ANSWER_CHARS) -> str | None:
    """Content of the last closed ``\\boxed{...}`` (balanced braces) or ``\\boxed x``.

    Only the last few ``\\boxed`` occurrences are tried and each scan stops after ``limit``
    characters, so 10,000 boxes or an unclosed one cost a bounded amount of work.
    """
    starts = [m for m in _BOXED.finditer(text)][-MAX_BOXED_TRIES:]
    for m in reversed(starts):
        j = m.end()
        if j < len(text) and text[j] == "{":
            end = balanced_end(text, j, limit)
            if end is not None:
                return text[j + 1:end - 1].strip()
        elif m.group().endswith((" ", "\t")) and j < len(text):
            # "\boxed 5": the next token only
            tok = re.match(r"[^\s$]+", text[j:j + MAX_ANSWER_CHARS])
            if tok:
                return tok.group().rstrip(".,;")
    return None


# "is" but never "isn't" or "is not": "The answer isn't 20, it's 18" does not state 20
NOT_NEGATED = r"(?![\w'\u2019])(?!\s+not\b)"
_ANSWER_IS = re.compile(r"answer\s*(?:is" + NOT_NEGATED + r"|:|=)\s*:?", re.IGNORECASE)
_MATH_SPAN = re.compile(r"\$\$((?:[^$\\]|\\.)+?)\$\$|\$((?:[^$\\]|\\.)+?)\$|\\\((.+?)\\\)"
                        r"|\\\[(.+?)\\\]", re.DOTALL)  # $...$ may hold \$ (an escaped dollar)


def after_last(pattern: re.Pattern, text: str) -> str | None:
    """The rest of the line after the last match of ``pattern`` (None if it never matches)."""
    last = None
    for last in pattern.finditer(text):
        pass
    if last is None:
        return None
    rest = _uncut(text, last.end(), last.end() + 4 * MAX_ANSWER_CHARS)
    # "The answer is\n\n$$x$$" puts the answer on the next lines: skip blank lines, keep one line
    rest = rest.lstrip()
    if rest.startswith("$$") or rest.startswith("\\["):
        m = _MATH_SPAN.match(rest)
        if m:
            return next(g for g in m.groups() if g is not None).strip()
    return rest.split("\n", 1)[0].strip()


def answer_phrase(text: str) -> str | None:
    """The final answer stated as "The (final) answer is X" / "Answer: X" (the last such phrase).

    A ``$...$`` math span right after the phrase is taken whole; otherwise the sentence up to
    its final period.
    """
    rest = after_last(_ANSWER_IS, text)
    if rest is None:
        return None
    rest = rest.strip().lstrip("*").strip()
    m = _MATH_SPAN.match(rest)
    if m:
        return next(g for g in m.groups() if g is not None).strip()
    m = _MATH_SPAN.search(rest)
    if m and not rest[:m.start()].strip(" :*"):
        return next(g for g in m.groups() if g is not None).strip()
    rest = re.split(r"(?<=[^\d\s])\.\s|\.\s+(?=[A-Z])", rest, maxsplit=1)[0]
    return rest.strip().strip("*").rstrip(".").strip() or None


NOT_ONE = object()  # what a reader returns for a form that states an answer it cannot take


def final_answer(text: str, read: Callable[[str], object] | None = None,
                 read_boxed: Callable[[str], object] | None = None) -> tuple:
    """The final answer a response states: the last ``\\boxed{}``, else "The answer is ..."
    (:func:`answer_phrase`), as ``(answer, how)`` with how ``"boxed"`` or ``"answer is"``, or
    ``(None, None)``. ``read`` turns a candidate into the answer (e.g. a number); when it returns
    None the next form is tried, when it returns ``NOT_ONE`` the search ends with ``(None, how)``
    (a box holding ``2 \\times 9`` states no number, rather than giving way to another one).
    ``read_boxed`` reads a box instead of ``read``. Shared by the math and gsm8k verifiers."""
    for how, find in (("boxed", last_boxed), ("answer is", answer_phrase)):
        found = find(text)
        if found is not None:
            reader = read_boxed if how == "boxed" and read_boxed is not None else read
            got = found if reader is None else reader(found)
            if got is NOT_ONE:
                return None, how
            if got is not None:
                return got, how
    return None, None


def nesting_depth(s: str) -> int:
    """Deepest bracket nesting of ``{}``, ``()`` and ``[]`` (LaTeX parsers are exponential in it)."""
    d = m = 0
    for c in s:
        if c in "{([":
            d += 1
            if d > m:
                m = d
        elif c in "})]":
            d -= 1
    return m
