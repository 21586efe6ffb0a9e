"""A process pool with a hard deadline per item, for functions that may hang, crash or exit.

``DeadlinePool(fn, workers, timeout).imap(items, window)`` runs ``fn(payload)`` in worker
processes and yields one result per item, in input order: ``fn``'s return value, or a
:class:`Failure` when the item overran its deadline (``"timeout"``), took its worker down
(``"died"``) or raised (``"error"``). The pool knows nothing else about its payloads.

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
import signal
import sys
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

import orjson

KILL_GRACE = 5.0          # seconds to wait for a SIGKILLed worker to be reaped
STOP_GRACE = 0.5          # seconds an idle worker gets to exit on its own before SIGKILL
MAX_CHUNK = 64            # items per message
MAX_CHUNK_COST = 1 << 20  # summed item cost per message (the verify stage: characters of text)
BELL_BYTES = 32 << 10     # a worker rings after a chunk and after this many bytes of results
POLL_SECONDS = 0.02       # the parent reads busy workers' results at least this often
PIPE_BYTES = 1 << 20      # pipe capacity asked for (Linux F_SETPIPE_SZ)
PIPE_MARGIN = 64          # bytes of message headers allowed for when sending a chunk ahead
CHUNK_SECONDS = 0.005     # a chunk holds at least this much work (once item times are known)
WORKER_NAME = "tcli-verify"
_PARENT_SIGNALS = {signal.SIGINT, signal.SIGTERM}  # held while forking and cleaning up
_FRAME_HEAD = 8           # little-endian byte length before each JSON result


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


def one_line(e: BaseException) -> str:
    """``Type: message`` on one line, at most ~300 characters."""
    msg = " ".join(str(e).split())
    if len(msg) > 300:
        msg = msg[:300] + "..."
    return f"{type(e).__name__}: {msg}" if msg else type(e).__name__


def exit_status(code: int | None) -> str:
    """A worker's end in words: ``exit code 3`` or ``signal SIGSEGV``."""
    if code is None:
        return "no exit code"
    if code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"exit code {code}"


# ----------------------------------------------------------------------------- worker side

_LIBC: list = []  # [libc] once loaded: the parent loads it before forking, so workers need not


def _load_libc():
    if not _LIBC and sys.platform.startswith("linux"):
        try:
            import ctypes

            _LIBC.append(ctypes.CDLL(None, use_errno=True))
        except (OSError, ImportError):  # pragma: no cover - no libc
            _LIBC.append(None)
    return _LIBC[0] if _LIBC else None


def _linux_prctl(option: int, arg) -> None:
    try:
        _load_libc().prctl(option, arg, 0, 0, 0)
    except AttributeError:  # pragma: no cover - no libc prctl
        pass


def _set_up_worker(parent_pid: int, inherited) -> None:
    """Runs first in a fresh worker (forked with SIGINT and SIGTERM held)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # Ctrl-C is the parent's to handle
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # not the parent's handler: just die
    signal.pthread_sigmask(signal.SIG_SETMASK, set())
    if sys.platform.startswith("linux"):
        _linux_prctl(1, signal.SIGKILL)          # PR_SET_PDEATHSIG: die with the parent
        _linux_prctl(15, WORKER_NAME.encode())  # PR_SET_NAME: what ps and /proc/PID/comm show
        if os.getppid() != parent_pid:  # the parent died before prctl took effect
            os._exit(1)
    for c in inherited:  # the parent's ends of this and other workers' pipes, copied by fork
        try:
            c.close()
        except OSError:
            pass
    # the parent may write its results to stdout: nothing printed here may land there
    sys.stdout = sys.stderr
    try:
        os.dup2(2, 1)
    except OSError:
        pass


def _result_frame(seq: int, fn: Callable, payload, start: float) -> bytes:
    """``[seq, ok, result or error text, seconds the item took]`` as JSON, length first."""
    try:
        msg = [seq, True, fn(payload)]
    except BaseException as e:  # noqa: BLE001 - even sys.exit() in fn only fails this item
        msg = [seq, False, one_line(e)]
    msg.append(time.monotonic() - start)
    try:  # JSON, not pickle: the parent never unpickles what a worker (user code) sent
        data = orjson.dumps(msg, option=orjson.OPT_SERIALIZE_NUMPY)
    except Exception as e:  # noqa: BLE001 - a result that is not plain data
        data = orjson.dumps((seq, False, f"result could not be sent back ({one_line(e)})", msg[3]))
    return len(data).to_bytes(_FRAME_HEAD, "little") + data


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _run_chunk(chunk, fn: Callable, slot, res_fd: int, bell_fd: int) -> None:
    """Run a chunk's items in order: stamp each in the slot, write each result as it is done,
    ring the bell when the chunk is done (and whenever BELL_BYTES of results wait unread)."""
    unrung = 0
    for seq, payload in chunk:
        slot[1] = math.inf      # between items: the next start time is not valid yet
        slot[0] = seq
        slot[1] = start = time.monotonic()
        frame = _result_frame(seq, fn, payload, start)
        slot[1] = math.inf      # writing: time spent here is not the item's
        _write_all(res_fd, frame)
        unrung += len(frame)
        if unrung >= BELL_BYTES:
            os.write(bell_fd, b"!")
            unrung = 0
    os.write(bell_fd, b".")


def _worker_main(cmd, res, bell, slot, fn: Callable, inherited, parent_pid: int) -> None:
    """Receive chunks [(seq, payload), ...] until None; results go out through ``res``."""
    try:
        _set_up_worker(parent_pid, inherited)
        res_fd, bell_fd = res.fileno(), bell.fileno()
        while True:
            chunk = cmd.recv()
            if chunk is None:
                break
            _run_chunk(chunk, fn, slot, res_fd, bell_fd)
    except BaseException:  # noqa: BLE001 - parent gone or pipe closed: leave without a traceback
        os._exit(1)
    os._exit(0)


# ----------------------------------------------------------------------------- parent side

def _mp_context():
    import multiprocessing as mp

    if sys.platform.startswith("linux"):
        return mp.get_context("fork")  # workers inherit what the parent imported and warmed up
    return mp.get_context()  # pragma: no cover


class _Worker:
    """One worker process: its command pipe, result pipe, bell, slot and the items it holds."""

    def __init__(self, ctx, fn: Callable, others: list):
        cmd_r, self.cmd = ctx.Pipe(duplex=False)
        self.res, res_w = ctx.Pipe(duplex=False)
        self.bell, bell_w = ctx.Pipe(duplex=False)
        self.slot = _shared_slot(ctx)  # [seq of the running item, its start (inf: none)]
        self.slot[0], self.slot[1] = -1.0, math.inf
        ends = [self.cmd, self.res, self.bell]
        self.proc = ctx.Process(target=_worker_main, name=WORKER_NAME, daemon=True,
                                args=(cmd_r, res_w, bell_w, self.slot, fn,
                                      ends + others, os.getpid()))
        self.proc.start()
        for c in (cmd_r, res_w, bell_w):
            c.close()
        for c in (self.res, self.bell):
            os.set_blocking(c.fileno(), False)
        _grow_pipe(self.res.fileno())
        self.capacity = _grow_pipe(self.cmd.fileno())  # bytes the command pipe holds
        self.buf = bytearray()  # result bytes read, not yet a whole frame
        self.items: deque[tuple[int, Any, int]] = deque()  # (seq, payload, cost) unanswered
        self.chunk_ends: deque[int] = deque()  # last seq of each chunk sent and not done
        self.chunk_bytes: deque[int] = deque()  # its message size (at most this sits unread)
        self.since = math.inf   # when the parent last saw it make progress
        self.retire = False     # replace it once its items are done

    def ends(self) -> list:
        return [self.cmd, self.res, self.bell]

    def running(self) -> tuple[int, float]:
        """(seq, start) of the item being run, start = inf when none is."""
        seq = self.slot[0]
        start = self.slot[1]
        if self.slot[0] != seq:  # it moved on while we read: nothing is overdue
            return int(seq), math.inf
        return int(seq), start

    def read(self) -> bool:
        """Append what the result pipe holds to ``buf``; True at end of file (worker gone)."""
        fd = self.res.fileno()
        while True:
            try:
                data = os.read(fd, PIPE_BYTES)
            except BlockingIOError:
                return False
            except OSError:
                return True
            if not data:
                return True
            self.buf += data

    def frames(self) -> Iterator[bytes]:
        """Whole JSON results in ``buf``, oldest first (a partial one stays)."""
        buf, pos = self.buf, 0
        while len(buf) - pos >= _FRAME_HEAD:
            size = int.from_bytes(buf[pos:pos + _FRAME_HEAD], "little")
            if len(buf) - pos - _FRAME_HEAD < size:
                break
            yield bytes(buf[pos + _FRAME_HEAD:pos + _FRAME_HEAD + size])
            pos += _FRAME_HEAD + size
        del buf[:pos]

    def hush(self) -> None:
        try:
            while os.read(self.bell.fileno(), 4096):
                pass
        except OSError:
            pass

    def ask_stop(self) -> None:
        try:
            self.cmd.send(None)  # an idle worker reads this and exits on its own
        except (OSError, ValueError):
            pass

    def sigkill(self) -> None:
        if self.proc.exitcode is None:
            try:
                os.kill(self.proc.pid, signal.SIGKILL)
            except OSError:
                pass

    def reap(self) -> None:
        """Wait for the process to end (SIGKILL it after STOP_GRACE) and release everything."""
        self.proc.join(STOP_GRACE)
        if self.proc.exitcode is None:
            self.sigkill()
            self.proc.join(KILL_GRACE)
        for c in self.ends():
            try:
                c.close()
            except OSError:
                pass
        try:
            self.proc.close()
        except ValueError:  # still running after SIGKILL + grace: leave it to init
            pass

    def status(self) -> str:
        if self.proc.exitcode is None:
            self.proc.join(0.1)
        return exit_status(self.proc.exitcode)


def _shared_slot(ctx):
    """Two doubles shared with a worker: an anonymous shared mapping (fork) or a RawArray."""
    if ctx.get_start_method() == "fork":
        import mmap

        return memoryview(mmap.mmap(-1, 16)).cast("d")
    return ctx.RawArray("d", 2)  # pragma: no cover - spawn / forkserver


def _grow_pipe(fd: int) -> int:
    """Ask for a PIPE_BYTES pipe; return the capacity it has (4 KiB, POSIX's minimum, when the
    system cannot say)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        return 4096
    try:
        fcntl.fcntl(fd, getattr(fcntl, "F_SETPIPE_SZ", 1031), PIPE_BYTES)
    except OSError:  # over /proc/sys/fs/pipe-max-size: keep what it has
        pass
    try:
        return fcntl.fcntl(fd, getattr(fcntl, "F_GETPIPE_SZ", 1032))
    except OSError:  # pragma: no cover - not Linux
        return 4096


class _SignalsHeld:
    """Hold SIGINT/SIGTERM for the parent while it forks or cleans up; they arrive right after."""

    def __enter__(self):
        try:
            self.old = signal.pthread_sigmask(signal.SIG_BLOCK, _PARENT_SIGNALS)
        except (AttributeError, ValueError, OSError):  # pragma: no cover - no sigmask
            self.old = None
        return self

    def __exit__(self, *exc) -> None:
        if self.old is not None:
            signal.pthread_sigmask(signal.SIG_SETMASK, self.old)


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
        self.ctx = _mp_context()
        self.workers: list[_Worker] = []
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
        with _SignalsHeld():
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

    def _next_worker(self) -> _Worker | None:
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

    def _spawn(self) -> _Worker:
        try:  # a forked child may flush a copy of stdout's buffer: empty it first
            sys.stdout.flush()
        except (OSError, ValueError, AttributeError):
            pass
        _load_libc()
        with _SignalsHeld():  # a Ctrl-C now reaches the parent once the worker is listed
            w = _Worker(self.ctx, self.fn, [c for x in self.workers for c in x.ends()])
            self.workers.append(w)
        return w

    def _chunk_size(self, w: _Worker) -> int:
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

    def _take_chunk(self, w: _Worker) -> list[tuple[int, Any, int]]:
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

    def _deadline(self, w: _Worker) -> float:
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

    def _collect(self, w: _Worker) -> bool:
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

    def _check(self, w: _Worker) -> None:
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

    def _died(self, w: _Worker) -> None:
        status = w.status()
        self._collect(w)  # everything it wrote before it ended counts
        self._lost(w, Failure("died", status))

    def _lost(self, w: _Worker, failure: Failure, only: int | None = None) -> None:
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

    def _remove(self, w: _Worker, kill: bool) -> None:
        with _SignalsHeld():
            self.workers.remove(w)
            if kill:
                w.sigkill()
            else:
                w.ask_stop()
            w.reap()
