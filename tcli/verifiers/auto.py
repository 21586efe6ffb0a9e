"""``--task auto``: which built-in verifier a record gets, from what the record says of itself."""

from __future__ import annotations

import re

_GSM_SOURCE = re.compile(r"grade-school-math|gsm|\bpal\b", re.IGNORECASE)
# the embedded tasks' records name their source (meta.source); each has its own verifier (the
# countdown one lives with its task in examples/, imported by name where it runs)
SOURCE_TASKS = {"tcli-arith": "arith",
                "tcli-countdown": "python:examples.countdown.verify:verify_countdown"}
# one number (commas only between groups of three digits: `-2,1` is a list of two)
_PLAIN_NUMBER = re.compile(r"\s*[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(\.\d+)?\s*")
# a GSM8K solution as published: reasoning, then the final number on a ``####`` line
_GSM_SOLUTION = re.compile(r"####[ \t]*[-+\u2212]?\$?[ \t]*\d[\d,]*(\.\d+)?\s*\Z")


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
    """``--task auto``: choices -> choice; the embedded tasks' sources (``SOURCE_TASKS``:
    ``tcli-arith`` -> arith, ``tcli-countdown`` -> countdown); GSM8K / GSM-Hard (PAL) sources, or
    a gold that is a GSM8K solution (``... #### 72``) -> gsm8k; a numeric answer to a prompt that
    did not ask for \\boxed{} -> gsm8k (the final number); everything else -> math."""
    if record.get("choices"):
        return "choice"
    meta = record.get("meta")
    source = meta.get("source") if isinstance(meta, dict) else None
    if isinstance(source, str):
        if source.strip().lower() in SOURCE_TASKS:
            return SOURCE_TASKS[source.strip().lower()]
        if _GSM_SOURCE.search(source):
            return "gsm8k"
    answer = record.get("answer")
    if isinstance(answer, str) and _GSM_SOLUTION.search(answer):
        return "gsm8k"
    if not _asks_for_boxed(record) and _numeric(answer):
        return "gsm8k"
    return "math"
