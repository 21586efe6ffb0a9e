"""Progress as plain lines, for logs: what long commands print when stderr is not a terminal.

Under nohup, Slurm or CI a progress bar is either nothing or a flood of control characters, and a
job that prints nothing for an hour cannot be told from a hung one. :class:`LineProgress` writes
one line at most every ``TCLI_PROGRESS_SECONDS`` seconds (default 15), and one at the end of a job
that lasted that long: done/total, rate, elapsed time and ETA. A shorter job prints nothing, as a
Unix filter should. No torch, no rich: any layer may use it.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Callable, Optional

INTERVAL_ENV = "TCLI_PROGRESS_SECONDS"
DEFAULT_INTERVAL = 15.0


def interval_seconds() -> float:
    """Seconds between lines: $TCLI_PROGRESS_SECONDS when it is a number >= 0, else the default."""
    try:
        v = float(os.environ.get(INTERVAL_ENV, ""))
    except ValueError:
        return DEFAULT_INTERVAL
    return v if v >= 0 and v == v and v != float("inf") else DEFAULT_INTERVAL


def duration(seconds: float) -> str:
    """45s, 6m20s, 2h05m."""
    s = int(round(max(seconds, 0.0)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


class LineProgress:
    """Counts work done and prints a line when ``interval`` seconds passed since the last one."""

    def __init__(self, label: str, total: Optional[int] = None, unit: str = "prompts", *,
                 interval: Optional[float] = None, write: Optional[Callable[[str], None]] = None,
                 clock: Callable[[], float] = time.monotonic):
        self.label, self.total, self.unit = label, total, unit
        self.interval = interval_seconds() if interval is None else interval
        self.write = write or _stderr_line
        self.clock = clock
        self.t0 = self.last = clock()
        self.done = 0
        self.start = 0  # units done before this process began (a resumed run): not in the rate
        self.tokens = 0
        self.note = ""
        self.printed = False

    def advance(self, n: int = 1, tokens: int = 0, note: str | None = None) -> None:
        """``n`` more units done (``tokens`` generated with them); a line when it is time."""
        self.done += n
        self.tokens += tokens
        if note is not None:
            self.note = note
        now = self.clock()
        if now - self.last >= self.interval:
            self.last, self.printed = now, True
            self.write(self.line(now))

    def finish(self) -> None:
        """The last line of a job long enough to have had progress lines (none when there was
        nothing to do)."""
        now = self.clock()
        if self.done > self.start and (self.printed or now - self.t0 >= self.interval):
            self.write(self.line(now, final=True))

    def line(self, now: float, final: bool = False) -> str:
        elapsed = max(now - self.t0, 1e-9)
        rate = (self.done - self.start) / elapsed
        done = f"{self.done}/{self.total}" if self.total else f"{self.done}"
        unit = self.unit[:-1] if done == "1" and self.unit.endswith("s") else self.unit  # 1 prompt
        parts = [f"{self.label}: {'done ' if final else ''}{done} {unit}"]
        if self.total and not final:
            parts[0] += f" ({100 * self.done / self.total:.0f}%)"
        parts.append(f"{rate:.{0 if rate >= 100 else 1 if rate >= 10 else 2}f} {self.unit}/s")
        if self.tokens:
            parts.append(f"{self.tokens / elapsed:.0f} tok/s")
        parts.append(f"elapsed {duration(elapsed)}")
        if self.total and not final and rate > 0:
            parts.append(f"ETA {duration(max(self.total - self.done, 0) / rate)}")
        if self.note:
            parts.append(self.note)
        return ", ".join(parts)


def _stderr_line(text: str) -> None:
    sys.stderr.write(text + "\n")
    sys.stderr.flush()
