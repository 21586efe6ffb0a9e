"""A run directory and its rules: one writer at a time, complete checkpoints only, metrics that
survive a torn line, and no removal of anything the loop did not write.

    config.toml            resolved configuration
    checkpoints/step_N/    model + tokenizer + optimizer.pt + tcli_state.json (the last k, and best/)
    checkpoints/critic_N/  PPO only: the critic saved with step N (critic_0: made from the policy)
    rollouts/step_N.arrow  every record of step N (inspect with `tcli show-tree`)
    metrics.jsonl          one record per step (and per evaluation)
    metrics.png            reward and eval accuracy vs step and vs wall time
    .lock                  held (flock) by the running loop; holds its pid
"""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass, field
from typing import Callable

import orjson

from tcli.errors import UsageError
from tcli.io import write_atomic_bytes

STEP_DIR = re.compile(r"^step_(\d+)$")
LOCK = ".lock"


@dataclass
class RunDir:
    path: str
    warn: Callable[[str], None] = lambda s: None
    _lock_fd: int | None = field(default=None, repr=False)

    checkpoints = property(lambda self: os.path.join(self.path, "checkpoints"))
    rollouts = property(lambda self: os.path.join(self.path, "rollouts"))
    metrics = property(lambda self: os.path.join(self.path, "metrics.jsonl"))
    config = property(lambda self: os.path.join(self.path, "config.toml"))
    best = property(lambda self: os.path.join(self.path, "checkpoints", "best"))

    def ckpt(self, step: int) -> str:
        return os.path.join(self.checkpoints, f"step_{step}")

    def critic_ckpt(self, step: int) -> str:
        """PPO's critic saved with step N (written just before step_N)."""
        return os.path.join(self.checkpoints, f"critic_{step}")

    def rollout_file(self, step: int) -> str:
        return os.path.join(self.rollouts, f"step_{step}.arrow")

    # -- ownership ---------------------------------------------------------------------
    def acquire(self) -> None:
        """Create the directory and hold its lock for this process's lifetime; a second loop on
        the same directory fails with the holder's pid (the lock dies with its process)."""
        import fcntl

        if os.path.exists(self.path) and not os.path.isdir(self.path):
            raise UsageError(f"run_dir {self.path} exists and is not a directory")
        os.makedirs(self.path, exist_ok=True)
        fd = os.open(os.path.join(self.path, LOCK), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise UsageError(f"{self.path} is in use by another tcli loop (pid {holder})") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._lock_fd = fd

    def release(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing the descriptor drops the flock
            self._lock_fd = None

    def check_fresh(self) -> None:
        """A new run starts only in an empty directory (nothing of another run is replaced)."""
        other = [n for n in os.listdir(self.path) if n != LOCK]
        if other:
            raise UsageError(f"{self.path} already holds a run ({', '.join(sorted(other)[:3])}); "
                             "use --resume RUN_DIR or another run_dir")

    def check_resumable(self) -> int:
        """The last complete step, or a usage error (resume never restarts silently)."""
        if not os.path.exists(self.config):
            raise UsageError(f"{self.path} is not a tcli run directory (no config.toml)")
        done = self.complete_steps()
        if not done:
            raise UsageError(f"{self.path} has no complete checkpoint to resume from; start a new "
                             "run in another run_dir (or delete this one)")
        return done[-1]

    def make_dirs(self) -> None:
        os.makedirs(self.checkpoints, exist_ok=True)
        os.makedirs(self.rollouts, exist_ok=True)

    # -- checkpoints -------------------------------------------------------------------
    def complete_steps(self) -> list[int]:
        """Checkpoints that were completely written (atomic rename + state file present)."""
        from tcli.models.checkpoint import STATE_FILE

        if not os.path.isdir(self.checkpoints):
            return []
        steps = []
        for name in os.listdir(self.checkpoints):
            m = STEP_DIR.match(name)
            if m and os.path.exists(os.path.join(self.checkpoints, name, STATE_FILE)):
                steps.append(int(m.group(1)))
        return sorted(steps)

    def prune(self, keep_last: int) -> None:
        """Delete complete step checkpoints beyond the newest ``keep_last`` (only those)."""
        for s in self.complete_steps()[:-keep_last]:
            shutil.rmtree(self.ckpt(s), ignore_errors=True)
            shutil.rmtree(self.critic_ckpt(s), ignore_errors=True)

    def set_best(self, step: int) -> None:
        """best/ becomes a copy of step_N, swapped in atomically; an existing best/ that is not a
        checkpoint is never replaced."""
        from tcli.models.checkpoint import STATE_FILE

        if os.path.exists(self.best) and not os.path.exists(os.path.join(self.best, STATE_FILE)):
            raise UsageError(f"{self.best} exists and is not a tcli checkpoint; not replacing it")
        tmp = self.best + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)  # a partial copy of a killed run (our own name)
        shutil.copytree(self.ckpt(step), tmp)
        if os.path.exists(self.best):
            shutil.rmtree(self.best)
        os.replace(tmp, self.best)

    # -- metrics -----------------------------------------------------------------------
    def read_metrics(self) -> list[dict]:
        """Every well-formed record; a torn or corrupt line is skipped (with a warning when it is
        not the last), never the valid lines after it."""
        from tcli.plot import read_metrics

        return read_metrics(self.path, warn=self.warn)

    def write_metrics(self, records: list[dict]) -> None:
        write_atomic_bytes(self.metrics, b"".join(orjson.dumps(r) + b"\n" for r in records))

    def append_metrics(self, rec: dict) -> None:
        with open(self.metrics, "ab") as f:
            f.write(orjson.dumps(rec) + b"\n")
            f.flush()
            os.fsync(f.fileno())
