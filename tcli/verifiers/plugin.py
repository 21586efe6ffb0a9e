"""``python:module:function``: a user's verifier, imported by name and checked before any record.

Whatever can be checked without running the function is a usage error (exit 2) here: a bad spec,
a module that cannot be imported, a missing function, or one that cannot be called as
``fn(text, answer, record)``. What it does when it runs is the verify stage's business.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import inspect
import os
import sys
from typing import Callable

from tcli.errors import UsageError

PREFIX = "python:"


def _import(mod_name: str):
    """Import ``mod_name``, also from the working directory (the `tcli` script leaves it off
    ``sys.path``, unlike ``python -m``)."""
    try:
        return importlib.import_module(mod_name)
    except ModuleNotFoundError as e:
        cwd = os.getcwd()
        if e.name != mod_name.split(".")[0] or cwd in sys.path:
            raise UsageError(f"cannot import verifier module {mod_name!r}: {e}") from None
        sys.path.insert(0, cwd)
        try:
            return importlib.import_module(mod_name)
        except ImportError as e2:
            raise UsageError(f"cannot import verifier module {mod_name!r}: {e2} "
                             "(is it on PYTHONPATH?)") from None
    except Exception as e:  # noqa: BLE001 - a user module that fails at import is a usage problem
        raise UsageError(f"cannot import verifier module {mod_name!r}: "
                         f"{type(e).__name__}: {e}") from None


def _check_signature(spec: str, fn: Callable) -> None:
    """A function that cannot take ``(text, answer, record)`` would fail on every record."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):  # a builtin without a signature: find out when it runs
        return
    try:
        sig.bind("", "", {})
    except TypeError as e:
        raise UsageError(f"verifier {spec} takes {sig}, not (text, answer, record): {e}") from None


@functools.lru_cache(maxsize=64)
def load_plugin(spec: str) -> Callable:
    """The function ``spec`` (``python:module:function``) names, imported once per process."""
    parts = spec.split(":")
    if len(parts) != 3 or not parts[1] or not parts[2]:
        raise UsageError(f"bad verifier {spec!r}; write python:module:function "
                         "(e.g. python:my_rewards:score)")
    _, mod_name, fn_name = parts
    with contextlib.redirect_stdout(sys.stderr):  # what it prints on import is no record
        fn = getattr(_import(mod_name), fn_name, None)
    if not callable(fn):
        raise UsageError(f"verifier module {mod_name!r} has no function {fn_name!r}")
    _check_signature(spec, fn)
    return fn
