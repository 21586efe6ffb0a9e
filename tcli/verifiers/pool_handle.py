"""The parent's handle on one pool worker: its pipes, its shared slot, reading its results,
stopping and reaping it; and the signal mask held while forking or cleaning up."""

from __future__ import annotations

import math
import os
import signal
import sys
from collections import deque
from typing import Any, Callable, Iterator

from tcli.verifiers.pool_worker import FRAME_HEAD, WORKER_NAME, worker_main

KILL_GRACE = 5.0          # seconds to wait for a SIGKILLed worker to be reaped
STOP_GRACE = 0.5          # seconds an idle worker gets to exit on its own before SIGKILL
PIPE_BYTES = 1 << 20      # pipe capacity asked for (Linux F_SETPIPE_SZ)
_PARENT_SIGNALS = {signal.SIGINT, signal.SIGTERM}  # held while forking and cleaning up


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


def mp_context():
    import multiprocessing as mp

    if sys.platform.startswith("linux"):
        return mp.get_context("fork")  # workers inherit what the parent imported and warmed up
    return mp.get_context()  # pragma: no cover


class Worker:
    """One worker process: its command pipe, result pipe, bell, slot and the items it holds."""

    def __init__(self, ctx, fn: Callable, others: list):
        cmd_r, self.cmd = ctx.Pipe(duplex=False)
        self.res, res_w = ctx.Pipe(duplex=False)
        self.bell, bell_w = ctx.Pipe(duplex=False)
        self.slot = _shared_slot(ctx)  # [seq of the running item, its start (inf: none)]
        self.slot[0], self.slot[1] = -1.0, math.inf
        ends = [self.cmd, self.res, self.bell]
        self.proc = ctx.Process(target=worker_main, name=WORKER_NAME, daemon=True,
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
        while len(buf) - pos >= FRAME_HEAD:
            size = int.from_bytes(buf[pos:pos + FRAME_HEAD], "little")
            if len(buf) - pos - FRAME_HEAD < size:
                break
            yield bytes(buf[pos + FRAME_HEAD:pos + FRAME_HEAD + size])
            pos += FRAME_HEAD + size
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


class SignalsHeld:
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
