"""Verifiers: score one response against a gold answer.

A verifier is ``fn(text, answer, record) -> (reward, verdict)``: reward 1.0 / 0.0 and a small
JSON-able dict saying what was parsed (``parsed``), whether it matched (``correct``) and, when
relevant, why not (``reason``) or what went wrong (``error``).

Built-ins live in the ``VERIFIERS`` registry (math, gsm8k, choice, arith); ``python:module:function``
imports a user's function with the same signature. ``auto`` picks one per record (:func:`pick_task`).

Model text is adversarial input: helpers here only ever look at a bounded tail of it, cap the
length of what they extract, and never eval/exec anything.
"""

from __future__ import annotations

import functools
import importlib
import os
import re
import sys
from typing import Callable

from tcli.errors import UsageError
from tcli.registry import Registry

Verifier = Callable[[str, str, dict], "tuple[float, dict]"]

VERIFIERS: Registry[Verifier] = Registry("verifier")

TAIL_CHARS = 16_384        # answers are at the end: never scan more than this much of a response
MAX_ANSWER_CHARS = 400     # an extracted final answer longer than this is not an answer
MAX_PARSED_CHARS = 200     # what a verdict echoes back of the parsed answer


# ----------------------------------------------------------------------------- text helpers

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


def _balanced(text: str, open_at: int, limit: int) -> int | None:
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
            end = _balanced(text, j, limit)
            if end is not None:
                return text[j + 1:end - 1].strip()
        elif m.group().endswith((" ", "\t")) and j < len(text):
            # "\boxed 5": the next token only
            tok = re.match(r"[^\s$]+", text[j:j + MAX_ANSWER_CHARS])
            if tok:
                return tok.group().rstrip(".,;")
    return None


_ANSWER_IS = re.compile(r"answer\s*(?:is|:|=)\s*:?", re.IGNORECASE)
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


def final_answer(text: str, read: Callable[[str], object] | None = None) -> tuple:
    """The final answer a response states: the last ``\\boxed{}``, else "The answer is ..."
    (:func:`answer_phrase`), as ``(answer, how)`` with how ``"boxed"`` or ``"answer is"``, or
    ``(None, None)``. ``read`` turns a candidate into the answer (e.g. a number); when it returns
    None the next form is tried. Shared by the math and gsm8k verifiers."""
    for how, find in (("boxed", last_boxed), ("answer is", answer_phrase)):
        found = find(text)
        if found is not None:
            got = found if read is None else read(found)
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


def verdict(task: str, parsed: str | None, correct: bool, **extra) -> tuple[float, dict]:
    """The (reward, verdict) pair every built-in verifier returns."""
    v = {"task": task, "parsed": shown(parsed), "correct": bool(correct)}
    v.update({k: x for k, x in extra.items() if x is not None})
    return (1.0 if correct else 0.0), v


# ----------------------------------------------------------------------------- task selection

_GSM_SOURCE = re.compile(r"grade-school-math|gsm|\bpal\b", re.IGNORECASE)


_PLAIN_NUMBER = re.compile(r"\s*[-+]?\d[\d,]*(\.\d+)?\s*")


def _asks_for_boxed(record: dict) -> bool:
    """Whether the prompt asked for \\boxed{} (unknown when the record does not say: assume so)."""
    from tcli.prompts import PROMPT_TEMPLATES

    tmpl = record.get("prompt_template")
    if not isinstance(tmpl, str):
        return True
    return "\\boxed" in PROMPT_TEMPLATES.get(tmpl, tmpl)


def _numeric(answer) -> bool:
    if isinstance(answer, bool):
        return False
    return isinstance(answer, (int, float)) or (isinstance(answer, str)
                                                and _PLAIN_NUMBER.fullmatch(answer) is not None)


def pick_task(record: dict) -> str:
    """``--task auto``: choices -> choice; GSM8K / GSM-Hard (PAL) sources -> gsm8k;
    ``tcli-arith`` -> arith; a numeric answer to a prompt that did not ask for \\boxed{} -> gsm8k
    (the final number); everything else -> math."""
    if record.get("choices"):
        return "choice"
    meta = record.get("meta")
    source = meta.get("source") if isinstance(meta, dict) else None
    if isinstance(source, str):
        if source.strip().lower() == "tcli-arith":
            return "arith"
        if _GSM_SOURCE.search(source):
            return "gsm8k"
    if not _asks_for_boxed(record) and _numeric(record.get("answer")):
        return "gsm8k"
    return "math"


def task_names() -> list[str]:
    return ["auto", *VERIFIERS.names(), "python:module:function"]


@functools.lru_cache(maxsize=64)
def _import_user(spec: str) -> Verifier:
    parts = spec.split(":")
    if len(parts) != 3 or not parts[1] or not parts[2]:
        raise UsageError(f"bad verifier {spec!r}; write python:module:function "
                         "(e.g. python:my_rewards:score)")
    _, mod_name, fn_name = parts
    try:
        mod = importlib.import_module(mod_name)
    except ModuleNotFoundError as e:
        cwd = os.getcwd()
        if e.name != mod_name.split(".")[0] or cwd in sys.path:
            raise UsageError(f"cannot import verifier module {mod_name!r}: {e}") from None
        sys.path.insert(0, cwd)  # the `tcli` script does not put the working directory on the path
        try:
            mod = importlib.import_module(mod_name)
        except ImportError as e2:
            raise UsageError(f"cannot import verifier module {mod_name!r}: {e2} "
                             "(is it on PYTHONPATH?)") from None
    except Exception as e:  # noqa: BLE001 - a user module that fails at import is a usage problem
        raise UsageError(f"cannot import verifier module {mod_name!r}: "
                         f"{type(e).__name__}: {e}") from None
    fn = getattr(mod, fn_name, None)
    if not callable(fn):
        raise UsageError(f"verifier module {mod_name!r} has no function {fn_name!r}")
    return fn


def get_verifier(name: str) -> Verifier:
    """The verifier called ``name`` (a registry name or ``python:module:function``)."""
    if name.startswith("python:"):
        return _import_user(name)
    if name in VERIFIERS:
        return VERIFIERS.get(name)
    raise UsageError(f"unknown task {name!r}; valid: {', '.join(task_names())}")


def check_task(task: str) -> None:
    """Fail early (exit 2) on a task name that cannot be resolved."""
    if task != "auto":
        get_verifier(task)


def uses_math_verify(task: str) -> bool:
    return task in ("auto", "math")


# register the built-ins (their heavy imports stay inside the functions)
from tcli.verifiers import arith as _arith  # noqa: E402,F401
from tcli.verifiers import choice as _choice  # noqa: E402,F401
from tcli.verifiers import gsm8k as _gsm8k  # noqa: E402,F401
from tcli.verifiers import math as _math  # noqa: E402,F401
