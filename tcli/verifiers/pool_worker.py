"""What a pool worker process runs: set itself up, run chunks of items, write each result.

A worker ignores SIGINT (interrupting is the parent's job), resets SIGTERM to its default, dies
with the parent (Linux ``PR_SET_PDEATHSIG``) and is named ``tcli-verify``. It stamps the item it
is running, with its start time, into a shared-memory slot, and writes each result the moment
the item finishes: ``[seq, ok, result or error text, seconds]`` as JSON (never pickle: the
parent never unpickles what user code sent), its byte length first.
"""

from __future__ import annotations

import math
import os
import signal
import sys
import time
from typing import Callable

import orjson

BELL_BYTES = 32 << 10     # a worker rings after a chunk and after this many bytes of results
WORKER_NAME = "tcli-verify"
FRAME_HEAD = 8            # little-endian byte length before each JSON result


def one_line(e: BaseException) -> str:
    """``Type: message`` on one line, at most ~300 characters."""
    msg = " ".join(str(e).split())
    if len(msg) > 300:
        msg = msg[:300] + "..."
    return f"{type(e).__name__}: {msg}" if msg else type(e).__name__


_LIBC: list = []  # [libc] once loaded: the parent loads it before forking, so workers need not


def load_libc():
    if not _LIBC and sys.platform.startswith("linux"):
        try:
            import ctypes

            _LIBC.append(ctypes.CDLL(None, use_errno=True))
        except (OSError, ImportError):  # pragma: no cover - no libc
            _LIBC.append(None)
    return _LIBC[0] if _LIBC else None


def _linux_prctl(option: int, arg) -> None:
    try:
        load_libc().prctl(option, arg, 0, 0, 0)
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
    return len(data).to_bytes(FRAME_HEAD, "little") + data


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


def worker_main(cmd, res, bell, slot, fn: Callable, inherited, parent_pid: int) -> None:
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
