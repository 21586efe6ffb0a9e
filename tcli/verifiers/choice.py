"""``choice``: the option a multiple-choice response picked, compared with the gold letter.

Looked for, strongest first: ``<answer>X</answer>``, ``\\boxed{X}``, "the answer is (X)" /
"Answer: X", a response (or last line) that is just a letter; each of these may also give the
option's text instead of its letter when the record carries ``choices``.
"""

from __future__ import annotations

import re

from tcli.verifiers.extract import NOT_NEGATED, after_last, last_boxed, tail
from tcli.verifiers.registry import VERIFIERS, verdict

DEFAULT_LETTERS = tuple("ABCDEFGHIJ")
TAIL = 8192

_TAG = re.compile(r"<answer>(.*?)</answer>", re.IGNORECASE | re.DOTALL)
_PHRASE = re.compile(r"(?:answer|option|choice)\s*(?:is" + NOT_NEGATED + r"|:)\s*:?|answer\s*[-=]",
                     re.IGNORECASE)
_DECOR = " \t\n*_`$\"'"


def _norm(s: str) -> str:
    s = re.sub(r"\\text\{([^{}]*)\}", r"\1", s)
    s = re.sub(r"[*_`$\"]", "", s)
    s = " ".join(s.lower().split())
    return s.rstrip(" .;:,!")


def letters_of(choices) -> tuple[str, ...]:
    if isinstance(choices, dict) and choices:
        return tuple(str(k) for k in choices)
    return DEFAULT_LETTERS


def _by_text(s: str, choices) -> str | None:
    """The option whose text ``s`` starts with (the longest such option); None when there is none
    or when several options share that text (the data has duplicate options)."""
    if not isinstance(choices, dict) or not choices:
        return None
    ns = _norm(s)
    if not ns:
        return None
    best, best_len, tie = None, -1, False
    for k, v in choices.items():
        nv = _norm(str(v))
        if nv and ns.startswith(nv) and (len(ns) == len(nv) or not ns[len(nv)].isalnum()):
            if len(nv) > best_len:
                best, best_len, tie = str(k), len(nv), False
            elif len(nv) == best_len:
                tie = True
    return None if tie else best


def read_option(s: str, letters: tuple[str, ...], choices) -> str | None:
    """The option stated at the start of ``s``: ``B``, ``(B)``, ``B.``, ``[B] text``, or the text
    of an option.

    Letters written as letters ("(C)", "C.", "C:") win over option texts; a letter followed by a
    space loses to an option text ("A drug that ..." where one option is exactly that text).
    """
    s = s.strip(_DECOR)
    if not s:
        return None
    alt = "|".join(re.escape(x) for x in sorted(letters, key=len, reverse=True))
    m = re.fullmatch(rf"[(\[]?({alt})[)\].:]?", s)
    if m:  # just a letter: even when some option's text is that letter too
        return m.group(1)
    m = re.match(rf"(?:(?i:option|choice)\s+)?(?:[(\[]({alt})[)\]]|({alt})[.):])(?![A-Za-z0-9])", s)
    if m:
        return m.group(1) or m.group(2)
    by_text = _by_text(s, choices)
    if by_text is not None:
        return by_text
    m = re.match(rf"(?:(?i:option|choice)\s+)?({alt})(?![A-Za-z0-9])", s)
    if m:
        return m.group(1)
    # a bare lower-case letter ("b", "(c)", "(c).") but never an article ("a drug ...")
    m = re.fullmatch(rf"[(\[]?({alt})[)\]]?[.:]?", s, re.IGNORECASE)
    return _letter(m.group(1), letters) if m else None


def _letter(x: str, letters: tuple[str, ...]) -> str | None:
    """The option letter ``x`` is, in either case (``b`` is B)."""
    if x in letters:
        return x
    return next((k for k in letters if k.lower() == x.lower()), None)


def extract(text: str, choices) -> tuple[str | None, str | None]:
    """(letter, how) or (None, None)."""
    letters = letters_of(choices)
    t = tail(text, TAIL)
    tags = _TAG.findall(t)
    if tags:
        got = read_option(tags[-1], letters, choices)
        if got is not None:
            return got, "<answer>"
    boxed = last_boxed(t)
    if boxed is not None:
        got = read_option(re.sub(r"\\text\{([^{}]*)\}", r"\1", boxed), letters, choices)
        if got is not None:
            return got, "boxed"
    rest = after_last(_PHRASE, t)
    if rest is not None:
        got = read_option(rest, letters, choices)
        if got is not None:
            return got, "answer is"
    lines = [x for x in t.strip().split("\n") if x.strip(_DECOR)]
    if lines:
        last = lines[-1].strip(_DECOR)
        m = re.fullmatch(r"[(\[]?(\w{1,2})[)\].:]?", last)
        if m and _letter(m.group(1), letters) is not None:
            return _letter(m.group(1), letters), "letter"
        got = _by_text(last, choices)
        if got is not None and _norm(last) == _norm(str(choices[got])):
            return got, "option text"
    return None, None


def gold_letter(answer: str, choices) -> str:
    letters = letters_of(choices)
    a = answer.strip()
    if a in letters:
        return a
    got = read_option(a, letters, choices)
    if got is None:
        raise ValueError(f"gold answer {answer[:50]!r} is not one of the options {list(letters)}")
    return got


@VERIFIERS.register("choice")
def verify_choice(text: str, answer: str, record: dict) -> tuple[float, dict]:
    choices = record.get("choices") if isinstance(record, dict) else None
    gold = gold_letter(answer, choices)
    got, how = extract(text, choices)
    if got is None:
        return verdict("choice", None, False, reason="no answer found")
    return verdict("choice", got, got == gold, via=how)
