"""The table built-in verifiers register into, and the verdict they return.

A verifier is ``fn(text, answer, record) -> (reward, verdict)``: reward 1.0 / 0.0 and a small
JSON-able dict saying what was parsed (``parsed``), whether it matched (``correct``) and, when
relevant, why not (``reason``). This module imports nothing heavy, so a built-in can register
itself by importing it without pulling in the others.
"""

from __future__ import annotations

from typing import Callable

from tcli.registry import Registry
from tcli.verifiers.extract import shown

Verifier = Callable[[str, str, dict], "tuple[float, dict]"]

VERIFIERS: Registry[Verifier] = Registry("verifier")


def verdict(task: str, parsed: str | None, correct: bool, **extra) -> tuple[float, dict]:
    """The (reward, verdict) pair every built-in verifier returns."""
    v = {"task": task, "parsed": shown(parsed), "correct": bool(correct)}
    v.update({k: x for k, x in extra.items() if x is not None})
    return (1.0 if correct else 0.0), v
