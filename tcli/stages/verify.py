"""The verify stage: add ``reward`` and ``verdict`` to every rollout record, in input order.

Verifiers run model text through regexes, sympy and users' code, any of which can hang, crash or
try to exit on adversarial input. So verifications run in worker processes
(:class:`tcli.verifiers.pool.DeadlinePool`) with a hard deadline per record: a worker that overruns
is SIGKILLed and replaced, and its record scores 0 with ``verdict.error = "timeout"``. A verifier
that raises anything (``SystemExit`` and ``KeyboardInterrupt`` included), calls ``os._exit`` or
takes its worker down scores 0 with an error saying so. The stream never hangs and a bad record
never ends the run; a real Ctrl-C or SIGTERM does end it, after every worker is gone.

Verifiers whose work is bounded by construction (``INLINE_TASKS``: ``arith`` and ``gsm8k`` read
at most the last 16 KB of a response with linear scans; worst adversarial case measured ~40 ms)
run in this process instead, when the gold answer is short too: no message to a worker, no
round trip. Their deadline is checked when they return (an overrun scores 0 with
``verdict.error = "timeout"`` just the same); there is nothing to kill because nothing can hang.

This module prepares records (validation, the verifier's view of a record) and turns verifier
output or pool failures into ``(reward, verdict)``. Memory stays bounded: at most ``window``
records are held, and workers receive only the fields a verifier reads, never token ids or
log-probs.
"""

from __future__ import annotations

import math
import os
import signal
import threading
from collections import deque
from decimal import Decimal
from typing import Iterable, Iterator

from tcli.errors import DataError
from tcli.verifiers.pool import DeadlinePool, Failure, default_workers
from tcli.verifiers.pool_worker import one_line

__all__ = ["verify_records", "start_pool", "prepare", "run_one", "default_workers", "HEAVY_FIELDS"]

# fields that are large and that no verifier needs: never copied to the workers
HEAVY_FIELDS = frozenset({"token_ids", "prompt_token_ids", "logprobs", "values", "branch",
                          "advantages", "segment_ends", "ref_logprobs", "old_logprobs",
                          "entropies"})
WINDOW_CHARS = 64 << 20  # characters of response text held at once (besides the record count)
# verifiers that cannot hang: bounded work on a bounded tail of the response, measured on
# adversarial inputs (tests/test_verify_inline.py keeps each under a bound); they run here
INLINE_TASKS = frozenset({"arith", "gsm8k"})
INLINE_ANSWER_CHARS = 1000  # ... when the gold answer is short (gsm8k's exact rationals of a
#                            100,000-digit decimal gold take 0.6 s: those go to a worker)
_FLOAT_EXACT = 2**53     # floats hold every integer below this exactly

# ----------------------------------------------------------------------------- one record


def _int_str(v: int) -> str:
    """Digits of an int of any size (``str`` refuses more than 4,300 digits)."""
    try:
        return str(v)
    except ValueError:
        return str(Decimal(v))


def _answer_str(v, file: str, line: int) -> str:
    """A gold answer as text, exactly: ints of any size keep every digit, floats their shortest
    decimal (``1e30`` -> ``1`` and 30 zeros, ``1.95766e-05`` -> ``0.0000195766``)."""
    if isinstance(v, str):
        return v
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        kind = "null" if v is None else type(v).__name__
        raise DataError(f"must be a string (or a number), got {kind}", file=file, line=line,
                        field="answer")
    if isinstance(v, int):
        return _int_str(v)
    if not math.isfinite(v):
        raise DataError(f"must be finite, got {v}", file=file, line=line, field="answer")
    if v.is_integer() and abs(v) < _FLOAT_EXACT:
        return str(int(v))
    d = Decimal(repr(v))
    return format(d.to_integral_value() if v.is_integer() else d, "f")


def _choices(v, file: str, line: int):
    """Choices as letter -> text; a list becomes A, B, C, ..."""
    if v is None:
        return None
    if isinstance(v, list):
        if len(v) > 26:
            raise DataError("a list of choices has at most 26 options", file=file, line=line,
                            field="choices")
        v = {chr(65 + i): x for i, x in enumerate(v)}
    if not isinstance(v, dict) or not all(isinstance(x, (str, int, float)) and not isinstance(x, bool)
                                          for x in v.values()):
        raise DataError("must be an object mapping letters to option texts", file=file, line=line,
                        field="choices")
    return {str(k): str(x) for k, x in v.items()}


def prepare(line: int, rec: dict, file: str, task: str):
    """Validate a record and pick its verifier: (task, text, answer, slim record for the worker)."""
    from tcli.verifiers.auto import pick_task

    if not isinstance(rec, dict):
        raise DataError("record is not an object", file=file, line=line)
    try:
        text = rec["text"]
    except KeyError:
        raise DataError("missing required field", file=file, line=line, field="text") from None
    if not isinstance(text, str):
        kind = "null" if text is None else type(text).__name__
        raise DataError(f"must be a string, got {kind}", file=file, line=line, field="text")
    if "answer" not in rec:
        raise DataError("missing required field", file=file, line=line, field="answer")
    answer = _answer_str(rec["answer"], file, line)
    slim = {k: v for k, v in rec.items() if k not in HEAVY_FIELDS}
    if "choices" in slim:
        slim["choices"] = _choices(slim["choices"], file, line)
    name = pick_task(slim) if task == "auto" else task
    return name, text, answer, slim


# ----------------------------------------------------------------------------- one result

_INT64 = 2**63


def _jsonable(v, depth: int = 0):
    """A verdict as JSON can store it (users' verifiers may return sets, numpy, huge ints)."""
    if depth > 8:
        return str(v)
    if v is None or isinstance(v, (bool, str)):
        return v
    if isinstance(v, int):
        return v if -_INT64 <= v < _INT64 else _int_str(v)
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


def _error(task: str, error: str, **extra) -> tuple[float, dict]:
    return 0.0, {"task": task, "parsed": None, "correct": False, "error": error, **extra}


def _checked(task: str, out) -> tuple[float, dict]:
    """A verifier's return value as (reward, verdict); junk raises ValueError/TypeError."""
    if isinstance(out, tuple) and len(out) == 2:
        reward, verdict = out
    else:  # a bare number or bool is accepted as the reward
        reward, verdict = out, {}
    reward = float(reward)
    if not math.isfinite(reward):
        raise ValueError(f"verifier returned a non-finite reward {reward}")
    if not isinstance(verdict, dict):
        raise TypeError(f"verifier returned a {type(verdict).__name__} verdict, not a dict")
    full = {"task": task, "parsed": None, "correct": reward > 0}
    full.update(_jsonable(verdict))
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
    verdict). ``watch`` is for runs in the caller's own process: a :class:`_SignalWatch` (real
    signals re-raise), and ``os._exit`` fails the record instead of ending the process. (In a
    worker, ``os._exit`` ends the worker, which the pool reports as the record's error.)"""
    from tcli.verifiers.tasks import get_verifier

    try:
        fn = get_verifier(task)
        if watch is None:
            out = fn(text, answer, rec)
        else:
            with _NoExit():
                out = fn(text, answer, rec)
        return _checked(task, out)
    except Exception as e:  # noqa: BLE001 - a verifier failure scores 0, never ends the stream
        return _error(task, one_line(e))
    except BaseException as e:  # SystemExit, KeyboardInterrupt, os._exit from the verifier
        if watch is not None and watch.arrived:
            raise  # a real Ctrl-C / SIGTERM while the verifier ran: that ends the stream
        return _error(task, _escape_message(e))


def _run_payload(payload) -> tuple[float, dict]:
    """What a pool worker runs for one record."""
    task, answer, slim = payload
    return run_one(task, slim["text"], answer, slim)


def _inline(payload) -> bool:
    """Whether a record is verified in this process (see INLINE_TASKS)."""
    task, answer, _ = payload
    return task in INLINE_TASKS and len(answer) <= INLINE_ANSWER_CHARS


def _run_here(payload) -> tuple[float, dict]:
    """An inline record: as in a worker, except that only an Exception fails the record (these
    verifiers never exit or raise KeyboardInterrupt: one arriving here is the user's Ctrl-C)."""
    from tcli.verifiers.tasks import get_verifier

    task, answer, slim = payload
    try:
        return _checked(task, get_verifier(task)(slim["text"], answer, slim))
    except Exception as e:  # noqa: BLE001 - a verifier failure scores 0, never ends the stream
        return _error(task, one_line(e))


def _failed(task: str, f: Failure, timeout: float) -> tuple[float, dict]:
    if f.kind == "timeout":
        return _error(task, "timeout", timeout_s=timeout)
    if f.kind == "died":
        return _error(task, f"verifier worker died ({f.detail})")
    return _error(task, f"verifier worker failed ({f.detail})")


# ----------------------------------------------------------------------------- in this process

class _SignalWatch:
    """In-process runs: notes when SIGINT/SIGTERM/SIGHUP really arrive (the installed Python
    handlers are wrapped, then restored), so a real Ctrl-C raised inside a verifier ends the
    stream while a verifier that raises KeyboardInterrupt itself only fails its record."""

    SIGNALS = tuple(getattr(signal, n) for n in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, n))

    def __init__(self):
        self.arrived = False
        self.installed: list[tuple[int, object, object]] = []

    def __enter__(self) -> "_SignalWatch":
        if threading.current_thread() is not threading.main_thread():
            return self  # signals only ever interrupt the main thread
        for sig in self.SIGNALS:
            old = signal.getsignal(sig)
            if callable(old):
                def noted(signum, frame, old=old):
                    self.arrived = True
                    return old(signum, frame)

                signal.signal(sig, noted)
                self.installed.append((sig, old, noted))
        return self

    def __exit__(self, *exc) -> None:
        for sig, old, noted in reversed(self.installed):
            if signal.getsignal(sig) is noted:  # unless someone replaced it meanwhile
                signal.signal(sig, old)
        self.installed = []


def _in_process(records, source_name: str, task: str) -> Iterator[dict]:
    with _SignalWatch() as watch:
        for line, rec in records:
            name, text, answer, slim = prepare(line, rec, source_name, task)
            watch.arrived = False
            rec["reward"], rec["verdict"] = run_one(name, text, answer, slim, watch)
            yield rec


# ----------------------------------------------------------------------------- the stage

_PRELOADED: set[str] = set()


def _preload(task: str) -> bool:
    """Import (and warm up) what a task's verifier needs, in this process, before workers fork
    from it; True when something was loaded just now (workers forked earlier lack it)."""
    from tcli.verifiers.tasks import uses_math_verify

    if not uses_math_verify(task) or "math_verify" in _PRELOADED:
        return False
    from tcli.verifiers.math import load_math_verify, warm_up

    load_math_verify()
    warm_up()
    _PRELOADED.add("math_verify")
    return True


def verify_records(records: Iterable[tuple[int, dict]], source_name: str, task: str = "auto",
                   timeout: float = 5.0, workers: int | None = None,
                   window: int | None = None, pool: DeadlinePool | None = None) -> Iterator[dict]:
    """Yield each record with ``reward`` and ``verdict`` added, in input order.

    ``records`` yields ``(line, record)``. ``task`` is a verifier name, ``python:module:function``
    or ``auto`` (chosen per record). ``workers``: processes (default: all cores); ``0`` runs in
    this process without a timeout (for debugging). ``timeout`` is the hard per-record limit in
    seconds. Bad records raise DataError naming ``source_name``, the line and the field.
    ``pool``: workers from :func:`start_pool` to use (and keep) instead of starting new ones.
    """
    from tcli.errors import UsageError
    from tcli.verifiers.tasks import check_task

    check_task(task)  # an unknown task fails here, before any record is read
    if timeout is None or not (timeout > 0):
        raise UsageError(f"timeout must be a positive number of seconds, got {timeout}")
    if workers is not None and workers < 0:
        raise UsageError(f"workers must be >= 0, got {workers}")
    n = (pool.n if pool is not None else default_workers()) if workers is None else workers
    if n == 0:
        return _in_process(records, source_name, task)
    window = window or max(256, 32 * n)
    if pool is not None:
        return _pooled(records, source_name, task, float(timeout), window, pool)
    return _owned_pool(records, source_name, task, float(timeout), window, n)


def start_pool(task: str = "auto", timeout: float = 5.0, workers: int | None = None
               ) -> DeadlinePool | None:
    """Verifier workers to reuse across ``verify_records(..., pool=...)`` calls (a loop's steps),
    started now, with what ``task`` needs already imported. None for ``workers=0``. Close it (or
    use it as a context manager) when done. Workers hold on to the memory of the process they
    were forked from: start the pool before loading a model."""
    from tcli.verifiers.tasks import check_task

    check_task(task)
    n = default_workers() if workers is None else workers
    if n == 0:
        return None
    pool = DeadlinePool(_run_payload, n, timeout, local_fn=_run_here)
    if task in INLINE_TASKS:
        return pool  # records run here; a worker forks only for an over-long gold answer
    _preload(task)
    return pool.start()


def _owned_pool(records, source_name: str, task: str, timeout: float, window: int, n: int
                ) -> Iterator[dict]:
    # every worker is gone when this ends; none starts while every record runs inline
    with DeadlinePool(_run_payload, n, timeout, local_fn=_run_here) as pool:
        yield from _pooled(records, source_name, task, timeout, window, pool)


def _pooled(records, source_name: str, task: str, timeout: float, window: int,
            pool: DeadlinePool) -> Iterator[dict]:
    if task != "auto" and _preload(task):
        pool.refresh()  # workers forked before the import lack it
    pool.timeout = timeout
    held: deque[tuple[dict, str]] = deque()  # records read and not yet yielded, with their task

    def payloads():
        for line, rec in records:
            name, text, answer, slim = prepare(line, rec, source_name, task)
            if task == "auto" and _preload(name):
                pool.refresh()  # the first math record: new workers fork with math-verify
            held.append((rec, name))
            yield (name, answer, slim), len(text) + 1

    for result in pool.imap(payloads(), window, WINDOW_CHARS, here=_inline):
        rec, name = held.popleft()
        if isinstance(result, Failure):
            result = _failed(name, result, timeout)
        rec["reward"], rec["verdict"] = result
        yield rec
