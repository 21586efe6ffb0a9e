"""Task names: the built-in verifiers, ``python:module:function`` plugins and ``auto``, resolved
to a verifier function or refused with the list of valid names (exit 2)."""

from __future__ import annotations

# importing a built-in registers it (their heavy imports stay inside their functions)
import tcli.verifiers.arith  # noqa: F401
import tcli.verifiers.choice  # noqa: F401
import tcli.verifiers.gsm8k  # noqa: F401
import tcli.verifiers.math  # noqa: F401
from tcli.errors import UsageError
from tcli.verifiers.plugin import PREFIX, load_plugin
from tcli.verifiers.registry import VERIFIERS, Verifier


def task_names() -> list[str]:
    return ["auto", *VERIFIERS.names(), "python:module:function"]


def get_verifier(name: str) -> Verifier:
    """The verifier called ``name`` (a registry name or ``python:module:function``)."""
    if name.startswith(PREFIX):
        return load_plugin(name)
    if name in VERIFIERS:
        return VERIFIERS.get(name)
    raise UsageError(f"unknown task {name!r}; valid: {', '.join(task_names())}")


def check_task(task: str) -> None:
    """Fail early (exit 2) on a task name that cannot be resolved."""
    if task != "auto":
        get_verifier(task)


def is_plugin(task: str) -> bool:
    """Whether ``task`` is a user's function rather than a built-in."""
    return task.startswith(PREFIX)


def uses_math_verify(task: str) -> bool:
    return task in ("auto", "math")
