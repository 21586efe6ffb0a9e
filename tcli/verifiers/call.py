"""One call of a verifier: whatever it does, a ``(reward, verdict)``, and whether it crashed.

Two kinds of zero must stay apart. An answer that is wrong, unparseable or too slow to check is
the model's fault: reward 0 and a verdict that says why (``reason``, or ``error = "timeout"``).
A verifier that raises, returns something that is not a reward (None, a string, NaN), or exits
is a bug in the verifier: reward 0 too, but its verdict carries ``crashed: true`` and the
error's last line, so the verify stage can count crashes and stop instead of training on them.
"""

from __future__ import annotations

import math
import os
from decimal import Decimal

from tcli.verifiers.pool_worker import one_line
from tcli.verifiers.tasks import get_verifier

_INT64 = 2**63
CRASHED = "crashed"  # the verdict key that marks a verifier failure (not the answer's)


def int_str(v: int) -> str:
    """Digits of an int of any size (``str`` refuses more than 4,300 digits)."""
    try:
        return str(v)
    except ValueError:
        return str(Decimal(v))


def _jsonable(v, depth: int = 0):
    """A verdict as JSON can store it (users' verifiers may return sets, numpy, huge ints)."""
    if depth > 8:
        return str(v)
    if v is None or isinstance(v, (bool, str)):
        return v
    if isinstance(v, int):
        return v if -_INT64 <= v < _INT64 else int_str(v)
    if isinstance(v, float):
        return v if math.isfinite(v) else str(v)
    if isinstance(v, dict):
        return {str(k): _jsonable(x, depth + 1) for k, x in list(v.items())[:100]}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x, depth + 1) for x in list(v)[:100]]
    item = getattr(v, "item", None)  # numpy scalars
    if callable(item):
        try:
            return _jsonable(item(), depth + 1)
        except Exception:  # noqa: BLE001
            pass
    return str(v)


def crashed(task: str, error: str) -> tuple[float, dict]:
    """The result of a verifier that failed: 0, and a verdict saying it was the verifier."""
    return 0.0, {"task": task, "parsed": None, "correct": False, "error": error, CRASHED: True}


def timed_out(task: str, timeout: float) -> tuple[float, dict]:
    """An answer the verifier could not finish in time: the answer's fault (adversarial text)."""
    return 0.0, {"task": task, "parsed": None, "correct": False, "error": "timeout",
                 "timeout_s": timeout}


def is_crash(verdict: dict) -> bool:
    return verdict.get(CRASHED) is True


def _reward(value) -> float:
    """A verifier's reward as a float; anything that is not a finite number is its bug."""
    if value is None or isinstance(value, (str, bytes, bytearray)):
        raise TypeError(f"verifier returned reward {value!r:.60}, not a number")
    try:
        reward = float(value)
    except (TypeError, ValueError):
        kind = type(value).__name__
        raise TypeError(f"verifier returned a {kind} reward, not a number") from None
    if not math.isfinite(reward):
        raise ValueError(f"verifier returned a non-finite reward {reward}")
    return reward


def checked(task: str, out) -> tuple[float, dict]:
    """A verifier's return value as (reward, verdict); anything else raises TypeError/ValueError.
    ``(reward, verdict_dict)`` or a bare number (a bool counts) is accepted."""
    if out is None:
        raise TypeError("verifier returned None, not (reward, verdict)")
    if isinstance(out, tuple):
        if len(out) != 2:
            raise TypeError(f"verifier returned a tuple of {len(out)}, not (reward, verdict)")
        value, verdict = out
    else:
        value, verdict = out, {}
    reward = _reward(value)
    if not isinstance(verdict, dict):
        raise TypeError(f"verifier returned a {type(verdict).__name__} verdict, not a dict")
    full = {"task": task, "parsed": None, "correct": reward > 0}
    full.update(_jsonable(verdict))
    full.pop(CRASHED, None)  # only a failure says the verifier crashed
    return reward, full


class _Exited(BaseException):
    """``os._exit(code)`` called by a verifier, turned into an exception while it runs."""

    def __init__(self, code):
        super().__init__(code)
        self.code = code


class _NoExit:
    """While a verifier runs, ``os._exit`` raises :class:`_Exited` instead of ending this process
    (a process the verifier forks still exits for real)."""

    __slots__ = ("real", "pid")

    def __enter__(self):
        self.real, self.pid = os._exit, os.getpid()
        real, pid = self.real, self.pid

        def refuse(code):
            if os.getpid() != pid:
                real(code)
            raise _Exited(code)

        os._exit = refuse
        return self

    def __exit__(self, *exc) -> None:
        os._exit = self.real


def _escape_message(e: BaseException) -> str:
    """What a verifier did when it raised something that is not an Exception."""
    if isinstance(e, SystemExit):
        return f"verifier called sys.exit({e.code!r})"
    if isinstance(e, _Exited):
        return f"verifier called os._exit({e.code!r})"
    return f"verifier raised {one_line(e)}"


def run_one(task: str, text: str, answer: str, rec: dict, watch=None) -> tuple[float, dict]:
    """Run one verifier; whatever it does (raise, exit, return junk) the result is (reward,
    verdict), a crash marked as such. ``watch`` is for runs in the caller's own process: an
    object whose ``arrived`` says a real signal came (then it re-raises), and ``os._exit``
    fails the record instead of ending the process. (In a worker, ``os._exit`` ends the
    worker, which the pool reports as the record's failure.)"""
    try:
        fn = get_verifier(task)
        if watch is None:
            out = fn(text, answer, rec)
        else:
            with _NoExit():
                out = fn(text, answer, rec)
        return checked(task, out)
    except Exception as e:  # noqa: BLE001 - counted by the stage, which decides to go on or stop
        return crashed(task, one_line(e))
    except BaseException as e:  # SystemExit, KeyboardInterrupt, os._exit from the verifier
        if watch is not None and watch.arrived:
            raise  # a real Ctrl-C / SIGTERM while the verifier ran: that ends the stream
        return crashed(task, _escape_message(e))
