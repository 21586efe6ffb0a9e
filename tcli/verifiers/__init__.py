"""Verifiers: score one response against a gold answer.

A verifier is ``fn(text, answer, record) -> (reward, verdict)``: reward 1.0 / 0.0 and a small
JSON-able dict saying what was parsed (``parsed``), whether it matched (``correct``) and, when
relevant, why not (``reason``).

This package only re-exports; each job has its module:

- ``extract``: answer extraction from a bounded tail of model text (adversarial input);
- ``registry``: the ``VERIFIERS`` table and the ``verdict`` built-ins return;
- ``arith``, ``choice``, ``gsm8k``, ``math``: the built-ins;
- ``plugin``: ``python:module:function``, a user's function with the same signature;
- ``auto``: ``--task auto`` picks a built-in per record;
- ``tasks``: task names resolved to verifiers (``get_verifier``, ``check_task``);
- ``call``: one call of a verifier, whatever it does, as a reward and verdict;
- ``weighted``: several tasks on one record: the weighted ``reward``, ``rewards``, ``verdicts``;
- ``pool``, ``pool_handle``, ``pool_worker``: worker processes with a hard deadline per item.

Nothing here imports torch: ``tcli verify`` runs without it.
"""

from __future__ import annotations

from tcli.verifiers.auto import pick_task
from tcli.verifiers.extract import (MAX_ANSWER_CHARS, MAX_BOXED_TRIES, MAX_PARSED_CHARS, TAIL_CHARS,
                                    after_last, answer_phrase, final_answer, last_boxed,
                                    nesting_depth, shown, tail)
from tcli.verifiers.registry import VERIFIERS, Verifier, verdict
from tcli.verifiers.tasks import check_task, get_verifier, task_names, uses_math_verify

__all__ = ["MAX_ANSWER_CHARS", "MAX_BOXED_TRIES", "MAX_PARSED_CHARS", "TAIL_CHARS", "VERIFIERS",
           "Verifier", "after_last", "answer_phrase", "check_task", "final_answer", "get_verifier",
           "last_boxed", "nesting_depth", "pick_task", "shown", "tail", "task_names",
           "uses_math_verify", "verdict"]
