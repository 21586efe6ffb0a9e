"""The verify stage: add ``reward`` and ``verdict`` to every rollout record, in input order.

Verifiers run model text through regexes, sympy and users' code, any of which can hang or crash
on adversarial input. So each verification runs in a worker process with a hard deadline: a
worker that overruns is SIGKILLed and replaced, and its record scores 0 with
``verdict.error = "timeout"``. The stream never hangs and a bad record never ends the run.

Memory stays bounded: at most ``window`` records are held (dispatched or waiting to be written in
order), and workers receive only the fields a verifier reads, never token ids or log-probs.
"""

from __future__ import annotations

import math
import os
import signal
import sys
import time
from collections import deque
from decimal import Decimal
from typing import Iterable, Iterator

from tcli.errors import DataError

# fields that are large and that no verifier needs: never copied to the workers
HEAVY_FIELDS = frozenset({"token_ids", "prompt_token_ids", "logprobs", "values", "branch",
                          "advantages", "segment_ends", "ref_logprobs", "old_logprobs"})
KILL_GRACE = 5.0  # seconds to wait for a SIGKILLed worker to be reaped


def default_workers() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


# ----------------------------------------------------------------------------- one record

def _answer_str(v, file: str, line: int) -> str:
    if isinstance(v, str):
        return v
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        kind = "null" if v is None else type(v).__name__
        raise DataError(f"must be a string (or a number), got {kind}", file=file, line=line,
                        field="answer")
    if isinstance(v, int):
        return str(v)
    if not math.isfinite(v):
        raise DataError(f"must be finite, got {v}", file=file, line=line, field="answer")
    if v.is_integer():
        return str(int(v))
    return format(Decimal(repr(v)), "f")  # 1.95766e-05 -> 0.0000195766, as the data README


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
    from tcli.verifiers import pick_task

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


def _one_line(e: BaseException) -> str:
    msg = " ".join(str(e).split())
    if len(msg) > 300:
        msg = msg[:300] + "..."
    return f"{type(e).__name__}: {msg}" if msg else type(e).__name__


_INT64 = 2**63


def _jsonable(v, depth: int = 0):
    """A verdict as JSON can store it (users' verifiers may return sets, numpy, huge ints)."""
    if depth > 8:
        return str(v)
    if v is None or isinstance(v, (bool, str)):
        return v
    if isinstance(v, int):
        return v if -_INT64 <= v < _INT64 else str(v)
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


def run_one(task: str, text: str, answer: str, rec: dict) -> tuple[float, dict]:
    """Run one verifier; whatever it does (raise, return junk) the result is (reward, verdict)."""
    from tcli.verifiers import get_verifier

    try:
        out = get_verifier(task)(text, answer, rec)
        if isinstance(out, tuple) and len(out) == 2:
            reward, verdict = out
        else:  # a bare number or bool is accepted as the reward
            reward, verdict = out, {}
        if isinstance(reward, bool):
            reward = float(reward)
        reward = float(reward)
        if not math.isfinite(reward):
            raise ValueError(f"verifier returned a non-finite reward {reward}")
        if not isinstance(verdict, dict):
            raise TypeError(f"verifier returned a {type(verdict).__name__} verdict, not a dict")
        full = {"task": task, "parsed": None, "correct": reward > 0}
        full.update(_jsonable(verdict))
        return reward, full
    except Exception as e:  # noqa: BLE001 - a verifier failure scores 0, never ends the stream
        return 0.0, {"task": task, "parsed": None, "correct": False, "error": _one_line(e)}


def _timeout_result(task: str, timeout: float) -> tuple[float, dict]:
    return 0.0, {"task": task, "parsed": None, "correct": False, "error": "timeout",
                 "timeout_s": timeout}


# ----------------------------------------------------------------------------- worker processes

def _die_with_parent(parent_pid: int) -> None:
    """Linux: SIGKILL this worker when the parent dies, even if a verifier is stuck in a loop
    (a parent killed by a signal never runs its cleanup)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)


def _worker_main(conn, inherited, parent_pid: int) -> None:
    """Loop: receive (seq, task, text, answer, record), send (seq, reward, verdict)."""
    _die_with_parent(parent_pid)
    for c in inherited:  # other workers' pipe ends, copied by fork: not ours to hold open
        try:
            c.close()
        except OSError:
            pass
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    # the parent writes records to stdout: a verifier's print() must never land there
    sys.stdout = sys.stderr
    try:
        os.dup2(2, 1)
    except OSError:
        pass
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return
        if msg is None:
            return
        seq, task, text, answer, rec = msg
        reward, verdict = run_one(task, text, answer, rec)
        try:
            conn.send((seq, reward, verdict))
        except (OSError, ValueError):
            return


class _Worker:
    def __init__(self, ctx, others: list):
        parent_end, child_end = ctx.Pipe(duplex=True)
        self.proc = ctx.Process(target=_worker_main, args=(child_end, [parent_end, *others], os.getpid()),
                                daemon=True, name="tcli-verify")
        self.proc.start()
        child_end.close()
        self.conn = parent_end
        self.seq: int | None = None
        self.task: str | None = None
        self.deadline = math.inf
        self.retire = False

    @property
    def busy(self) -> bool:
        return self.seq is not None

    def submit(self, seq: int, task: str, payload: tuple, deadline: float) -> None:
        self.seq, self.task, self.deadline = seq, task, deadline
        self.conn.send((seq, *payload))

    def done(self) -> None:
        self.seq, self.task, self.deadline = None, None, math.inf

    def kill(self) -> None:
        try:
            self.conn.close()
        except OSError:
            pass
        if self.proc.is_alive():
            try:
                os.kill(self.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, OSError):
                pass
        self.proc.join(KILL_GRACE)
        try:
            self.proc.close()
        except ValueError:  # still running after SIGKILL + grace: leave it to init
            pass

    def stop(self) -> None:
        """Polite shutdown: ask the worker to exit, then make sure it did."""
        try:
            self.conn.send(None)
        except (OSError, ValueError):
            pass
        self.proc.join(0.5)
        self.kill()


def _mp_context():
    import multiprocessing as mp

    if sys.platform.startswith("linux"):
        return mp.get_context("fork")  # workers inherit imported verifiers: no re-import per worker
    return mp.get_context()


class _Pool:
    """A fixed number of verifier processes with per-item deadlines and in-order results."""

    def __init__(self, n: int, timeout: float):
        self.n = n
        self.timeout = timeout
        self.ctx = _mp_context()
        self.workers: list[_Worker] = []
        self.results: dict[int, tuple[float, dict]] = {}

    def _spawn(self) -> _Worker:
        try:  # a forked child may flush a copy of stdout's buffer: empty it first
            sys.stdout.flush()
        except (OSError, ValueError, AttributeError):
            pass
        w = _Worker(self.ctx, [x.conn for x in self.workers])
        self.workers.append(w)
        return w

    def _replace(self, w: _Worker) -> None:
        w.kill()
        self.workers.remove(w)

    def retire_all(self) -> None:
        """Replace every worker (idle ones now, busy ones when their item is done)."""
        for w in list(self.workers):
            if w.busy:
                w.retire = True
            else:
                w.stop()
                self.workers.remove(w)

    def idle_worker(self) -> _Worker | None:
        for w in self.workers:
            if not w.busy:
                return w
        if len(self.workers) < self.n:
            return self._spawn()
        return None

    def submit(self, w: _Worker, seq: int, task: str, payload: tuple) -> None:
        deadline = time.monotonic() + self.timeout if self.timeout > 0 else math.inf
        try:
            w.submit(seq, task, payload, deadline)
        except (OSError, ValueError) as e:  # the worker died before it could take the item
            self.results[seq] = (0.0, {"task": task, "parsed": None, "correct": False,
                                       "error": f"verifier worker failed ({_one_line(e)})"})
            self._replace(w)

    def wait(self) -> None:
        """Block until at least one busy worker finishes or overruns its deadline."""
        from multiprocessing.connection import wait

        busy = [w for w in self.workers if w.busy]
        if not busy:
            return
        soonest = min(w.deadline for w in busy)
        left = None if soonest == math.inf else max(0.0, soonest - time.monotonic())
        ready = wait([w.conn for w in busy], timeout=left)
        by_conn = {id(w.conn): w for w in busy}
        for conn in ready:
            w = by_conn[id(conn)]
            try:
                seq, reward, verdict = conn.recv()
            except (EOFError, OSError) as e:
                code = w.proc.exitcode
                if code is None:
                    w.proc.join(0.1)
                    code = w.proc.exitcode
                why = f"exit code {code}" if code is not None else _one_line(e)
                self.results[w.seq] = (0.0, {"task": w.task, "parsed": None, "correct": False,
                                             "error": f"verifier worker died ({why})"})
                self._replace(w)
                continue
            self.results[seq] = (reward, verdict)
            w.done()
            if w.retire:
                w.stop()
                self.workers.remove(w)
        now = time.monotonic()
        for w in [w for w in self.workers if w.busy and w.deadline <= now]:
            self.results[w.seq] = _timeout_result(w.task, self.timeout)
            self._replace(w)

    def close(self) -> None:
        for w in self.workers:
            if w.busy:
                w.kill()
            else:
                w.stop()
        self.workers = []


# ----------------------------------------------------------------------------- the stage

_PRELOADED: set[str] = set()


def _preload(task: str) -> bool:
    """Import (and warm up) what a task's verifier needs, in this process, before workers fork
    from it; True when something was loaded just now (workers forked earlier lack it)."""
    from tcli.verifiers import uses_math_verify

    if not uses_math_verify(task) or "math_verify" in _PRELOADED:
        return False
    from tcli.verifiers.math import load_math_verify, warm_up

    load_math_verify()
    warm_up()
    _PRELOADED.add("math_verify")
    return True


def verify_records(records: Iterable[tuple[int, dict]], source_name: str, task: str = "auto",
                   timeout: float = 5.0, workers: int | None = None,
                   window: int | None = None) -> Iterator[dict]:
    """Yield each record with ``reward`` and ``verdict`` added, in input order.

    ``records`` yields ``(line, record)``. ``task`` is a verifier name, ``python:module:function``
    or ``auto`` (chosen per record). ``workers``: processes (default: all cores); ``0`` runs in
    this process without a timeout (for debugging). ``timeout`` is the hard per-record limit in
    seconds. Bad records raise DataError naming ``source_name``, the line and the field.
    """
    from tcli.errors import UsageError
    from tcli.verifiers import check_task

    check_task(task)  # an unknown task fails here, before any record is read
    if timeout is None or not (timeout > 0):
        raise UsageError(f"timeout must be a positive number of seconds, got {timeout}")
    if workers is not None and workers < 0:
        raise UsageError(f"workers must be >= 0, got {workers}")
    n = default_workers() if workers is None else workers
    if n == 0:
        return _in_process(records, source_name, task)
    return _pooled(records, source_name, task, float(timeout), n, window or max(32, 8 * n))


def _in_process(records, source_name: str, task: str) -> Iterator[dict]:
    for line, rec in records:
        name, text, answer, slim = prepare(line, rec, source_name, task)
        rec["reward"], rec["verdict"] = run_one(name, text, answer, slim)
        yield rec


def _pooled(records, source_name: str, task: str, timeout: float, n: int, window: int
            ) -> Iterator[dict]:
    if task != "auto":
        _preload(task)
    pool = _Pool(n, timeout)
    held: dict[int, dict] = {}                 # records read but not yet yielded
    queue: deque[tuple[int, str, tuple]] = deque()  # prepared, waiting for a free worker
    it = iter(records)
    exhausted = False
    next_seq = next_out = 0
    try:
        while True:
            while not exhausted and len(held) < window:
                try:
                    line, rec = next(it)
                except StopIteration:
                    exhausted = True
                    break
                name, text, answer, slim = prepare(line, rec, source_name, task)
                if task == "auto" and _preload(name):
                    pool.retire_all()  # the first math record: new workers fork with math-verify
                held[next_seq] = rec
                queue.append((next_seq, name, (name, text, answer, slim)))
                next_seq += 1
            while queue:
                w = pool.idle_worker()
                if w is None:
                    break
                seq, name, payload = queue.popleft()
                pool.submit(w, seq, name, payload)
            while next_out in pool.results:
                rec = held.pop(next_out)
                rec["reward"], rec["verdict"] = pool.results.pop(next_out)
                next_out += 1
                yield rec
            if exhausted and not held:
                return
            if not queue or all(w.busy for w in pool.workers):
                pool.wait()
    finally:
        pool.close()
