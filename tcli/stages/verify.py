"""The verify stage: add ``reward`` and ``verdict`` to every rollout record, in input order.

Verifiers run model text through regexes, sympy and users' code, any of which can hang, crash or
try to exit on adversarial input. So verifications run in worker processes
(:class:`tcli.verifiers.pool.DeadlinePool`) with a hard deadline per record: a worker that overruns
is SIGKILLed and replaced, and its record scores 0 with ``verdict.error = "timeout"`` (the
answer's fault: the stream goes on). A verifier that raises anything (``SystemExit`` and
``KeyboardInterrupt`` included), returns something that is not a reward, calls ``os._exit`` or
takes its worker down has crashed: a bug in the verifier, not a wrong answer. Its record scores 0
with ``verdict.crashed = true``; the first few crashes are reported on stderr, and when they are
more than ``max_verifier_errors`` of the records (by default: any) the stage raises
:class:`VerifierCrashed` (exit 1) rather than let a broken verifier hand out rewards of 0. The
stream never hangs; a real Ctrl-C or SIGTERM ends it, after every worker is gone.

Verifiers whose work is bounded by construction (``INLINE_TASKS``: ``arith`` and ``gsm8k`` read
at most the last 16 KB of a response with linear scans; worst adversarial case measured ~40 ms)
run in this process instead, when the gold answer is short too: no message to a worker, no
round trip. Their deadline is checked when they return (an overrun scores 0 with
``verdict.error = "timeout"`` just the same); there is nothing to kill because nothing can hang.

Several tasks (``task=["gsm8k", "python:mod:fmt"]``) score every record in one pass: one payload
per record carries all its verifiers to one worker (or runs here when all are bounded), and
:class:`tcli.verifiers.weighted.Tasks` writes the weighted ``reward``, ``rewards`` and
``verdicts``; crashes are counted per task.

This module prepares records (validation, the verifier's view of a record), turns pool failures
into ``(reward, verdict)`` (one call of a verifier: :mod:`tcli.verifiers.call`) and counts
crashes. Memory stays bounded: at most ``window``
records are held, and workers receive only the fields a verifier reads, never token ids or
log-probs.
"""

from __future__ import annotations

import contextlib
import math
import signal
import sys
import threading
import time
from collections import deque
from decimal import Decimal
from typing import Callable, Iterable, Iterator, Sequence

from tcli.errors import DataError, TcliError
from tcli.prompts import choice_options
from tcli.records import drop_reward_derived
from tcli.verifiers.call import checked, crashed, int_str, is_crash, run_one, timed_out
from tcli.verifiers.pool import DeadlinePool, Failure, default_workers
from tcli.verifiers.pool_worker import one_line
from tcli.verifiers.weighted import Tasks, verdicts_of

__all__ = ["verify_records", "start_pool", "prepare", "run_one", "default_workers", "HEAVY_FIELDS",
           "VerifierCrashed"]

# fields that are large and that no verifier needs: never copied to the workers
HEAVY_FIELDS = frozenset({"token_ids", "prompt_token_ids", "logprobs", "values", "branch",
                          "advantages", "segment_ends", "ref_logprobs", "old_logprobs",
                          "entropies", "loss_mask"})
WINDOW_CHARS = 64 << 20  # characters of response text held at once (besides the record count)
# verifiers that cannot hang: bounded work on a bounded tail of the response, measured on
# adversarial inputs (tests/unit/test_verify_inline.py keeps each under a bound); they run here
INLINE_TASKS = frozenset({"arith", "gsm8k"})
INLINE_ANSWER_CHARS = 1000  # ... when the gold answer is short (gsm8k's exact rationals of a
#                            100,000-digit decimal gold take 0.6 s: those go to a worker)
_FLOAT_EXACT = 2**53     # floats hold every integer below this exactly

# ----------------------------------------------------------------------------- one record


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
        return int_str(v)
    if not math.isfinite(v):
        raise DataError(f"must be finite, got {v}", file=file, line=line, field="answer")
    if v.is_integer() and abs(v) < _FLOAT_EXACT:
        return str(int(v))
    d = Decimal(repr(v))
    return format(d.to_integral_value() if v.is_integer() else d, "f")


def _choices(v, file: str, line: int):
    """Choices as letter -> text (``choice_options``: a list becomes A, B, C, ...)."""
    try:
        return choice_options(v)
    except DataError as e:
        raise e.located(file, line) from None


def prepare(line: int, rec: dict, file: str, tasks: Tasks):
    """Validate a record and pick its verifiers: (one verifier name per task, text, answer, slim
    record for the worker)."""
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
    names = tasks.pick(slim)
    if "choice" in names:
        _check_gold_option(answer, slim.get("choices"), file, line)
    return names, text, answer, slim


def _check_gold_option(answer: str, choices, file: str, line: int) -> None:
    """A gold answer that names none of the options is the data's fault (exit 65), not a crash
    of the choice verifier."""
    from tcli.verifiers.choice import gold_letter, letters_of

    try:
        gold_letter(answer, choices)
    except ValueError:
        raise DataError(f"{answer[:50]!r} is not one of the options "
                        f"({', '.join(letters_of(choices))}), by letter or text", file=file,
                        line=line, field="answer") from None


# ----------------------------------------------------------------------------- one result

class _InWorker:
    """The ``watch`` of a worker running several verifiers on one record: ``os._exit`` fails
    that verifier only, not the record's other ones (no real signal is ever noted: a worker
    ignores SIGINT and dies of SIGTERM)."""

    arrived = False


def _each(names: tuple[str, ...], soft: float | None, run) -> list:
    """``run(name)`` for every verifier of one record; with several, one that returns after
    ``soft`` seconds scores as a time-out (the hard deadline covers the record's whole pass)."""
    out = []
    for name in names:
        t0 = time.perf_counter()
        result = run(name)
        if soft is not None and time.perf_counter() - t0 > soft and not is_crash(result[1]):
            result = timed_out(name, soft)
        out.append(result)
    return out


def _run_payload(payload) -> list:
    """What a pool worker runs for one record: each of its verifiers, in one pass."""
    names, answer, slim, soft = payload
    watch = _InWorker() if len(names) > 1 else None  # one verifier: its exit is the record's
    return _each(names, soft, lambda n: run_one(n, slim["text"], answer, slim, watch))


def _inline(payload) -> bool:
    """Whether a record is verified in this process (see INLINE_TASKS)."""
    names, answer, _, _ = payload
    return all(n in INLINE_TASKS for n in names) and len(answer) <= INLINE_ANSWER_CHARS


def _run_here(payload) -> list:
    """An inline record: as in a worker, except that only an Exception fails a verifier (these
    verifiers never exit or raise KeyboardInterrupt: one arriving here is the user's Ctrl-C)."""
    from tcli.verifiers.tasks import get_verifier

    names, answer, slim, soft = payload

    def one(task: str) -> tuple[float, dict]:
        try:
            return checked(task, get_verifier(task)(slim["text"], answer, slim))
        except Exception as e:  # noqa: BLE001 - counted as a crash by the stage
            return crashed(task, one_line(e))

    return _each(names, soft, one)


def _failed(names: tuple[str, ...], f: Failure, timeout: float) -> list:
    """A pool failure, for each verifier of the record (the pool cannot tell which one was
    running): a time-out is the answer's (reward 0); a dead worker is a crash."""
    if f.kind == "timeout":
        return [timed_out(n, timeout) for n in names]
    why = "died" if f.kind == "died" else "failed"
    return [crashed(n, f"verifier worker {why} ({f.detail})") for n in names]


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


def _in_process(records, source_name: str, tasks: Tasks) -> Iterator[tuple[int, dict]]:
    with _SignalWatch() as watch:
        for line, rec in records:
            names, text, answer, slim = prepare(line, rec, source_name, tasks)
            watch.arrived = False
            with contextlib.redirect_stdout(sys.stderr):  # stdout carries the records alone
                results = [run_one(n, text, answer, slim, watch) for n in names]
            tasks.apply(rec, results, source_name, line)
            yield line, rec


# ----------------------------------------------------------------------------- crashes

MAX_REPORTED = 3  # crashes reported on stderr one line each; the rest are only counted
_ID_FIELDS = ("id", "prompt_id", "sample_id")


class VerifierCrashed(TcliError):
    """The verifier crashed on more answers than ``max_verifier_errors`` allows (exit 1)."""


def _warn(msg: str) -> None:
    sys.stderr.write(f"tcli: warning: {msg}\n")
    sys.stderr.flush()


def _where(source_name: str, line: int, rec: dict) -> str:
    """``<stdin>:3 (prompt_id=p1 sample_id=2)``: the record as the user can find it."""
    ids = " ".join(f"{k}={str(rec[k])[:40]}" for k in _ID_FIELDS
                   if isinstance(rec.get(k), (str, int)))
    return f"{source_name}:{line}" + (f" ({ids})" if ids else "")


class _Crashes:
    """A stream's verifier crashes, per task: counted, the first few reported, and an error once
    one task's crashes are more than ``max_share`` of the answers (at the first crash when it is
    0; at the end otherwise, when the share is known; always when every answer crashed)."""

    def __init__(self, source_name: str, max_share: float, report: Callable[[str], None]):
        self.source_name, self.max_share, self.report = source_name, max_share, report
        self.n = self.shown = 0
        self.tasks: dict = {}  # task -> [crashes, its first crash's verifier, "WHERE: ERROR"]

    def see(self, line: int, rec: dict) -> None:
        self.n += 1
        for task, v in verdicts_of(rec).items():
            if is_crash(v):
                self._crash(task, v, _where(self.source_name, line, rec))

    def _crash(self, task, v: dict, where: str) -> None:
        seen = self.tasks.setdefault(task, [0, v.get("task"), f"{where}: {v.get('error')}"])
        seen[0] += 1
        if self.max_share == 0:
            raise self._error(task, " (max-verifier-errors 0 allows none)", first=True)
        self.shown += 1
        if self.shown <= MAX_REPORTED:
            self.report(f"verifier {v.get('task')} crashed at {where}: {v.get('error')}")
        elif self.shown == MAX_REPORTED + 1:
            self.report("more verifier crashes follow: counted, not shown")

    def finish(self) -> None:
        for task, (count, _, _) in self.tasks.items():
            if count == self.n:
                raise self._error(task, " (every answer)")
            if count / self.n > self.max_share:  # exact for 29/100 vs 0.29
                raise self._error(task, f" ({count / self.n:.1%}, more than "
                                  f"max-verifier-errors {self.max_share:g})")

    def _error(self, task, why: str, first: bool = False) -> VerifierCrashed:
        count, name, where = self.tasks[task]
        of = f"{count} of the first {self.n}" if first else f"{count} of {self.n}"
        return VerifierCrashed(f"verifier {name} crashed on {of} answers{why}; first at {where}")


def _guarded(stream: Iterator[tuple[int, dict]], crashes: _Crashes,
             report: Callable[[str], None]) -> Iterator[dict]:
    """The records of ``stream``, without the fields computed from their old rewards (said once,
    at the end); its workers go (the stream is closed) if this stops early."""
    dropped: dict[str, None] = {}  # the fields dropped, in the order first seen
    records = 0
    try:
        for line, rec in stream:
            crashes.see(line, rec)
            gone = drop_reward_derived(rec)
            if gone:
                records += 1
                dropped.update(dict.fromkeys(gone))
            yield rec
        crashes.finish()
        if records:
            report(f"dropped {', '.join(dropped)} from {records} record"
                   f"{'s' if records > 1 else ''}: computed from the old rewards, they would not "
                   "match the new ones; run build-tree or advantages again")
    finally:
        stream.close()


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


def verify_records(records: Iterable[tuple[int, dict]], source_name: str,
                   task: str | Sequence[str] = "auto", timeout: float = 5.0,
                   workers: int | None = None, window: int | None = None,
                   pool: DeadlinePool | None = None, max_verifier_errors: float = 0.0,
                   report: Callable[[str], None] = _warn,
                   weights: Sequence[float] | None = None) -> Iterator[dict]:
    """Yield each record with ``reward`` and ``verdict`` added, in input order, and the fields
    computed from its old reward removed (``tcli.records.REWARD_DERIVED``; ``report`` says so once).

    ``records`` yields ``(line, record)``. ``task`` is a verifier name, ``python:module:function``
    or ``auto`` (chosen per record), or several of them: each scores every record, ``reward`` is
    their sum weighted by ``weights`` (default 1 each) and ``rewards``/``verdicts`` hold each
    one's (:mod:`tcli.verifiers.weighted`). ``workers``: processes (default: all cores); ``0``
    runs in this process without a timeout (for debugging). ``timeout`` is the hard limit per
    answer and verifier, in seconds. Bad records raise DataError naming ``source_name``, the
    line and the field. ``pool``: workers from :func:`start_pool` to use (and keep) instead of
    starting new ones. A verifier crash (not a wrong answer, not a time-out) scores 0 with
    ``verdict.crashed``; more than ``max_verifier_errors`` (a share of the records, per task)
    raise :class:`VerifierCrashed`, and ``report`` gets one line for each of the first crashes.
    """
    from tcli.errors import UsageError

    tasks = Tasks.of(task, weights)  # an unknown task fails here, before any record is read
    if timeout is None or not (timeout > 0):
        raise UsageError(f"timeout must be a positive number of seconds, got {timeout}")
    if workers is not None and workers < 0:
        raise UsageError(f"workers must be >= 0, got {workers}")
    if not 0.0 <= max_verifier_errors <= 1.0:
        raise UsageError(f"max_verifier_errors must be in [0, 1], got {max_verifier_errors}")
    crashes = _Crashes(source_name, max_verifier_errors, report)
    n = (pool.n if pool is not None else default_workers()) if workers is None else workers
    if n == 0:
        return _guarded(_in_process(records, source_name, tasks), crashes, report)
    window = window or max(256, 32 * n)
    if pool is not None:
        return _guarded(_pooled(records, source_name, tasks, float(timeout), window, pool),
                        crashes, report)
    return _guarded(_owned_pool(records, source_name, tasks, float(timeout), window, n), crashes,
                    report)


def start_pool(task: str | Sequence[str] = "auto", timeout: float = 5.0,
               workers: int | None = None) -> DeadlinePool | None:
    """Verifier workers to reuse across ``verify_records(..., pool=...)`` calls (a loop's steps),
    started now, with what ``task`` (one or several) needs already imported. None for
    ``workers=0``. Close it (or use it as a context manager) when done. Workers hold on to the
    memory of the process they were forked from: start the pool before loading a model."""
    names = Tasks.of(task).names
    n = default_workers() if workers is None else workers
    if n == 0:
        return None
    pool = DeadlinePool(_run_payload, n, timeout, local_fn=_run_here)
    if all(t in INLINE_TASKS for t in names):
        return pool  # records run here; a worker forks only for an over-long gold answer
    for t in names:
        _preload(t)
    return pool.start()


def _owned_pool(records, source_name: str, tasks: Tasks, timeout: float, window: int, n: int
                ) -> Iterator[tuple[int, dict]]:
    # every worker is gone when this ends; none starts while every record runs inline
    with DeadlinePool(_run_payload, n, timeout, local_fn=_run_here) as pool:
        yield from _pooled(records, source_name, tasks, timeout, window, pool)


def _pooled(records, source_name: str, tasks: Tasks, timeout: float, window: int,
            pool: DeadlinePool) -> Iterator[tuple[int, dict]]:
    if any([_preload(t) for t in tasks.names if t != "auto"]):
        pool.refresh()  # workers forked before the import lack it
    # one pass per record runs all its verifiers: the hard deadline covers them together, and
    # with several each one that returns after ``timeout`` scores as a time-out (_each)
    pool.timeout = timeout * len(tasks.names)
    soft = timeout if tasks.several else None
    held: deque[tuple[int, dict, tuple[str, ...]]] = deque()  # read, not yet yielded

    def payloads():
        for line, rec in records:
            names, text, answer, slim = prepare(line, rec, source_name, tasks)
            if "auto" in tasks.names and any([_preload(n) for n in names]):
                pool.refresh()  # the first math record: new workers fork with math-verify
            held.append((line, rec, names))
            yield (names, answer, slim, soft), len(text) + 1

    for result in pool.imap(payloads(), window, WINDOW_CHARS, here=_inline):
        line, rec, names = held.popleft()
        if isinstance(result, Failure):
            result = _failed(names, result, timeout)
        tasks.apply(rec, result, source_name, line)
        yield line, rec
