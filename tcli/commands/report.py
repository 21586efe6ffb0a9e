"""How a failure reaches the user: one line on stderr and an exit code (65 bad data, 2 usage,
1 runtime). ``tcli``'s main and the loop's ranks report the same way."""

from __future__ import annotations

import os
import sys
import traceback

from tcli.errors import EXIT_RUNTIME, TcliError


def report(msg: str) -> None:
    sys.stderr.write(f"tcli: error: {msg}\n")
    sys.stderr.flush()


def stdout_closed() -> None:
    """The reader went away (`| head`): that is success. Point stdout at /dev/null so the
    interpreter's final flush of the buffered data cannot print a BrokenPipeError at exit."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass


def one_line(msg: str, limit: int = 500) -> str:
    """Errors are one line: join a library's multi-line message and cap its length."""
    msg = " ".join(msg.split())
    return msg if len(msg) <= limit else msg[: limit - 1] + "…"


def failure(e: Exception, debug: bool) -> int:
    """One line for a failure (a traceback only with --debug) and its exit code."""
    if debug and not isinstance(e, (BrokenPipeError, MemoryError)):
        traceback.print_exc()
    if isinstance(e, TcliError):
        report(e.one_line())
        return e.exit_code
    if isinstance(e, BrokenPipeError):
        stdout_closed()
        return 0
    if isinstance(e, MemoryError):
        report("out of memory")
    elif isinstance(e, OSError):
        report(f"{e.strerror or e} ({e.filename})" if getattr(e, "filename", None)
               else one_line(str(e)))
    else:
        report(f"{type(e).__name__}: {one_line(str(e))} (run with --debug for a traceback)")
    return EXIT_RUNTIME
