"""A process pool with a hard deadline per item, for functions that may hang, crash or exit.

``DeadlinePool(fn, workers, timeout).imap(items, window)`` runs ``fn(payload)`` in worker
processes and yields one result per item, in input order: ``fn``'s return value, or a
:class:`Failure` when the item overran its deadline (``"timeout"``), took its worker down
(``"died"``) or raised (``"error"``). The pool knows nothing else about its payloads.

This module schedules; :mod:`tcli.verifiers.pool_worker` is what a worker process runs and
:mod:`tcli.verifiers.pool_handle` the parent's handle on one worker.

How it stays cheap and exact:

- Items travel in chunks, one message per chunk. A worker writes each item's result to its
  result pipe the moment the item finishes, and stamps the item it is running, with its start
  time, into a small shared-memory slot (no system call). The parent reads result pipes in bulk
  when a worker rings its bell (end of chunk, or ``BELL_BYTES`` of results), every
  ``POLL_SECONDS`` while workers are busy, and when a deadline comes up; not once per item.
- Every item gets its own ``timeout`` seconds from its own start (the slot). A worker that
  overruns is SIGKILLed; the results it wrote before count, the running item fails with
  ``"timeout"`` and the unfinished rest of its chunk goes back to the front of the queue for the
  other (or a fresh) worker. A worker that dies fails its running item the same way.
- Workers ignore SIGINT (a terminal's Ctrl-C reaches the whole process group: interrupting is the
  parent's job), reset SIGTERM to its default, die with the parent (Linux ``PR_SET_PDEATHSIG``)
  and are named ``tcli-verify`` (``/proc/PID/comm``). On any exit from the pool, an exception
  included, every worker is killed and reaped before the exception goes on; SIGINT and SIGTERM
  wait while the parent forks or cleans up.
- Chunks are as large as they can be without hurting balance: one worker takes everything queued
  (up to ``max_chunk``); several workers take a shrinking share of the queue (guided), but never
  less than ``CHUNK_SECONDS`` of work at the measured seconds per item, so cheap items do not pay
  one message and one wake-up each. A busy worker's next chunk is sent ahead when its command
  pipe (measured capacity) holds both chunks, so a send never blocks on a stuck worker.
- Items that ``imap(here=...)`` marks as safe to run here (known-bounded work) run in this
  process instead: no message at all. Their deadline is checked when they return (nothing to
  kill), and busy workers' deadlines are still checked between them.
- At most ``window`` items (and ``window_cost`` of their cost) are held: queued, running, or done
  and waiting for an earlier one.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

import orjson

from tcli.verifiers.pool_handle import KILL_GRACE, SignalsHeld, Worker, mp_context
from tcli.verifiers.pool_worker import load_libc, one_line

MAX_CHUNK = 64            # items per message
MAX_CHUNK_COST = 1 << 20  # summed item cost per message (the verify stage: characters of text)
POLL_SECONDS = 0.02       # the parent reads busy workers' results at least this often
PIPE_MARGIN = 64          # bytes of message headers allowed for when sending a chunk ahead
CHUNK_SECONDS = 0.005     # a chunk holds at least this much work (once item times are known)


@dataclass(frozen=True)
class Failure:
    """An item that produced no result: ``kind`` is timeout | died | error; ``detail`` says more."""

    kind: str
    detail: str = ""


def default_workers() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


class DeadlinePool:
    """``workers`` processes running ``fn(payload)``, each item under a hard ``timeout``.

    Use as a context manager (or call :meth:`close`): leaving it kills and reaps every worker.
    """

    def __init__(self, fn: Callable[[Any], Any], workers: int, timeout: float,
                 max_chunk: int = MAX_CHUNK, max_chunk_cost: int = MAX_CHUNK_COST,
                 local_fn: Callable[[Any], Any] | None = None):
        """``local_fn`` runs the items ``imap(here=...)`` keeps in this process (default ``fn``)."""
        if workers < 1 or not timeout > 0:
            raise ValueError(f"need workers >= 1 and timeout > 0, got {workers}, {timeout}")
        self.fn, self.n, self.timeout = fn, workers, float(timeout)
        self.local_fn = fn if local_fn is None else local_fn
        self.max_chunk, self.max_chunk_cost = max(1, max_chunk), max_chunk_cost
        self.ctx = mp_context()
        self.workers: list[Worker] = []
        self.queue: deque[tuple[int, Any, int]] = deque()  # (seq, payload, cost) not yet sent
        self.results: dict[int, Any] = {}
        self.item_seconds: float | None = None  # running mean of what a worker item takes
        self.next_check = 0.0  # when busy workers are next checked between local items

    def __enter__(self) -> "DeadlinePool":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(kill=exc_type is not None)

    def imap(self, items: Iterable[tuple[Any, int]], window: int = 256,
             window_cost: float = math.inf, here: Callable[[Any], bool] | None = None
             ) -> Iterator[Any]:
        """For each ``(payload, cost)`` of ``items`` (read lazily), yield ``fn(payload)`` or a
        :class:`Failure`, in order. At most ``window`` items and ``window_cost`` summed cost
        (but always one item) are held; ``cost`` also bounds a chunk (e.g. characters of text).
        Items for which ``here(payload)`` is true run in this process (``local_fn``), for work
        known to be fast and safe: an exception fails the item, an overrun is a timeout once it
        returns. A pool serves one ``imap`` at a time, any number in turn; one left early (an
        exception, or the caller stops reading) kills the workers still busy with its items."""
        self._reset()
        try:
            yield from self._imap(iter(items), max(1, window), window_cost, here)
        except BaseException:
            self._reset()
            raise

    def _imap(self, it: Iterator, window: int, window_cost: float, here) -> Iterator[Any]:
        costs: deque[int] = deque()  # cost of each item held, oldest first
        held_cost = next_out = 0
        exhausted = False
        while True:
            while not exhausted and len(costs) < window and (not costs or held_cost < window_cost):
                try:
                    payload, cost = next(it)
                except StopIteration:
                    exhausted = True
                    break
                seq = next_out + len(costs)
                costs.append(cost)
                held_cost += cost
                if here is not None and here(payload):
                    self._run_here(seq, payload)
                    continue
                self.queue.append((seq, payload, cost))
                if len(self.queue) >= self.max_chunk:
                    self._dispatch()  # a long stream: start work before the window is full
            self._dispatch()
            progressed = next_out in self.results
            while next_out in self.results:
                held_cost -= costs.popleft()
                yield self.results.pop(next_out)
                next_out += 1
            if exhausted and not costs:
                return
            if not progressed or exhausted:
                self._wait()

    def _run_here(self, seq: int, payload) -> None:
        """Run one item in this process; its deadline is checked when it returns. Between such
        items (at most every POLL_SECONDS) queued items go out and busy workers are checked."""
        start = time.monotonic()
        try:
            result = self.local_fn(payload)
        except Exception as e:  # noqa: BLE001 - KeyboardInterrupt here is the user's: it goes on
            result = Failure("error", one_line(e))
        end = time.monotonic()
        if end - start > self.timeout:
            result = Failure("timeout", f"over {self.timeout:g} s")
        self.results[seq] = result
        if end >= self.next_check:
            self.next_check = end + POLL_SECONDS
            self._dispatch()
            for w in [w for w in self.workers if w.items]:
                self._check(w)

    def start(self) -> "DeadlinePool":
        """Start every worker now (they otherwise start with the first items)."""
        while len(self.workers) < self.n:
            self._spawn()
        return self

    def _reset(self) -> None:
        """Forget a previous imap: kill workers still busy with its items, drop its queue."""
        for w in [w for w in self.workers if w.items]:
            self._remove(w, kill=True)
        self.queue.clear()
        self.results.clear()

    def refresh(self) -> None:
        """Replace every worker (idle ones now, busy ones when their items are done), e.g. after
        the parent imported something new that workers should inherit."""
        for w in list(self.workers):
            if w.items:
                w.retire = True
            else:
                self._remove(w, kill=False)

    def close(self, kill: bool = False) -> None:
        """End every worker: idle ones are asked to exit, busy ones (all, with ``kill``) are
        SIGKILLed; then all are reaped. SIGINT/SIGTERM wait until this is done."""
        with SignalsHeld():
            workers, self.workers = self.workers, []
            for w in workers:
                if kill or w.items:
                    w.sigkill()
                else:
                    w.ask_stop()
            for w in workers:
                w.reap()
            self.queue.clear()
            self.results.clear()

    # ------------------------------------------------------------------ dispatch

    def _next_worker(self) -> Worker | None:
        """An idle worker, else a new one, else one busy with its last chunk (its next chunk
        waits in its pipe, so it never sits idle while the parent sleeps)."""
        for w in self.workers:
            if not w.items and not w.retire:
                return w
        if len(self.workers) < self.n:
            return self._spawn()
        for w in self.workers:
            if len(w.chunk_ends) == 1 and not w.retire:
                return w
        return None

    def _spawn(self) -> Worker:
        try:  # a forked child may flush a copy of stdout's buffer: empty it first
            sys.stdout.flush()
        except (OSError, ValueError, AttributeError):
            pass
        load_libc()
        with SignalsHeld():  # a Ctrl-C now reaches the parent once the worker is listed
            w = Worker(self.ctx, self.fn, [c for x in self.workers for c in x.ends()])
            self.workers.append(w)
        return w

    def _chunk_size(self, w: Worker) -> int:
        """One worker: everything queued. Several: guided (a share of the queue, smaller as it
        drains, so workers finish together), but at least CHUNK_SECONDS of work at the measured
        seconds per item -- never more than ``w``'s even share of all outstanding items, so a
        stale estimate (cheap items before, slow ones now) cannot leave a worker idle."""
        queued = len(self.queue)
        if self.n == 1:
            return min(self.max_chunk, queued)
        size = -(-queued // (2 * self.n))
        if self.item_seconds is not None:
            floor = math.ceil(CHUNK_SECONDS / max(self.item_seconds, 1e-6))
            outstanding = queued + sum(len(x.items) for x in self.workers)
            size = max(size, min(floor, -(-outstanding // self.n) - len(w.items)))
        return min(self.max_chunk, size)

    def _take_chunk(self, w: Worker) -> list[tuple[int, Any, int]]:
        """``w``'s next chunk: :meth:`_chunk_size` items, at most ``max_chunk_cost`` cost (>= 1)."""
        size = self._chunk_size(w)
        chunk: list[tuple[int, Any, int]] = []
        cost = 0
        while self.queue and len(chunk) < size:
            if chunk and cost + self.queue[0][2] > self.max_chunk_cost:
                break
            chunk.append(self.queue.popleft())
            cost += chunk[-1][2]
        return chunk

    def _dispatch(self) -> None:
        from multiprocessing.reduction import ForkingPickler

        while self.queue:
            w = self._next_worker()
            if w is None:
                return
            idle = not w.items
            chunk = self._take_chunk(w)
            data = ForkingPickler.dumps([(seq, payload) for seq, payload, _ in chunk])
            size = len(data) + PIPE_MARGIN
            if not idle and sum(w.chunk_bytes) + size > w.capacity:
                self.queue.extendleft(reversed(chunk))  # a send could block: wait till idle
                return
            w.items.extend(chunk)
            w.chunk_ends.append(chunk[-1][0])
            w.chunk_bytes.append(size)
            try:
                w.cmd.send_bytes(data)
            except (OSError, ValueError):  # the worker died before it took this chunk
                self._died(w)
                continue
            if idle:
                w.since = time.monotonic()

    # ------------------------------------------------------------------ results

    def _deadline(self, w: Worker) -> float:
        _, start = w.running()
        return (start if start != math.inf else w.since) + self.timeout

    def _wait(self) -> None:
        """Sleep until a busy worker rings or ends, or the soonest deadline; then check them."""
        from multiprocessing.connection import wait

        busy = [w for w in self.workers if w.items]
        if not busy:
            return
        soonest = min(min(self._deadline(w) for w in busy) - time.monotonic(), POLL_SECONDS)
        wait([x for w in busy for x in (w.bell, w.proc.sentinel)], timeout=max(0.0, soonest))
        for w in busy:
            self._check(w)

    def _collect(self, w: Worker) -> bool:
        """Take in the results ``w`` has written; True when it has ended."""
        ended = w.read()
        got = False
        for data in w.frames():
            try:
                seq, ok, value, seconds = orjson.loads(data)
            except Exception as e:  # noqa: BLE001 - not a well-formed result
                seq, ok, value = w.items[0][0], False, f"result could not be read ({one_line(e)})"
                seconds = None
            self._took(seconds)
            first = w.items.popleft()[0]
            assert seq == first, (seq, first)
            if w.chunk_ends and w.chunk_ends[0] == seq:
                w.chunk_ends.popleft()
                w.chunk_bytes.popleft()
            self.results[seq] = value if ok else Failure("error", value)
            got = True
        if got or w.buf:
            w.since = time.monotonic()
        return ended

    def _took(self, seconds) -> None:
        """Fold one item's time into the running mean that sizes chunks."""
        if isinstance(seconds, (int, float)) and math.isfinite(seconds) and seconds >= 0:
            mean = self.item_seconds
            self.item_seconds = seconds if mean is None else 0.9 * mean + 0.1 * seconds

    def _check(self, w: Worker) -> None:
        """Take in ``w``'s results; replace it if it died, retired or overran its deadline."""
        w.hush()
        ended = self._collect(w) or w.proc.exitcode is not None
        if not w.items:
            if w.retire or ended:
                self._remove(w, kill=ended)
            return
        if ended:
            self._died(w)
            return
        seq, start = w.running()  # one reading for both the deadline and the item to blame
        if (start if start != math.inf else w.since) + self.timeout <= time.monotonic():
            running = seq if start != math.inf else w.items[0][0]
            w.sigkill()
            w.proc.join(KILL_GRACE)
            self._collect(w)  # results written before the kill still count
            self._lost(w, Failure("timeout", f"over {self.timeout:g} s"), only=running)

    def _died(self, w: Worker) -> None:
        status = w.status()
        self._collect(w)  # everything it wrote before it ended counts
        self._lost(w, Failure("died", status))

    def _lost(self, w: Worker, failure: Failure, only: int | None = None) -> None:
        """``w`` is dead or being killed: its running item fails (unless ``only`` names another
        item, which then finished in time), the rest of its items go back to the front of the
        queue, and the worker goes (a new one starts on demand)."""
        if w.items and (only is None or w.items[0][0] == only):
            self.results[w.items.popleft()[0]] = failure
        self.queue.extendleft(reversed(w.items))
        w.items.clear()
        w.chunk_ends.clear()
        w.chunk_bytes.clear()
        self._remove(w, kill=True)

    def _remove(self, w: Worker, kill: bool) -> None:
        with SignalsHeld():
            self.workers.remove(w)
            if kill:
                w.sigkill()
            else:
                w.ask_stop()
            w.reap()
