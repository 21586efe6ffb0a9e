"""A run directory and its rules: one writer at a time, complete checkpoints only, metrics that
survive a torn line, and no removal of anything the loop did not write.

    config.toml            resolved configuration
    checkpoints/step_N/    model + tokenizer + optimizer.pt + tcli_state.json (the last k, and best/)
    checkpoints/critic_N/  PPO only: the critic saved with step N (critic_0: made from the policy)
    rollouts/step_N.arrow  every record of step N (inspect with `tcli show-tree`)
    metrics.jsonl          one record per step (and per evaluation)
    metrics.png            reward and eval accuracy vs step and vs wall time
    resumes.jsonl          per --resume: its first step and the settings it changed from config.toml
    .lock                  held (flock) by the running loop; holds its pid
    <tensorboard>/         event files, when config.toml's tensorboard is a folder of the run dir

Besides these, a killed run may leave the temporary siblings of its atomic writes
(``<file>.tmp-XXXXXXXX``, ``metrics.png.tmp.png``, ``checkpoints/<name>.tmp-XXXXXXXX/``,
``checkpoints/best.tmp/``). :meth:`RunDir.ours` tells these apart from everything else, so that a
restart or ``--overwrite`` removes what tcli wrote and never a user's file.
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
RESUMES = "resumes.jsonl"
_TOP_FILES = ("config.toml", "metrics.jsonl", "metrics.png", RESUMES)
_TOP_TEMP = re.compile(r"^(config\.toml|metrics\.jsonl|metrics\.png|resumes\.jsonl)"
                       r"\.tmp-[0-9a-f]{8}$|"
                       r"^metrics\.png\.tmp\.png$")
_CKPT_DIR = re.compile(r"^(step_\d+|critic_\d+|best)$")
_CKPT_TEMP = re.compile(r"^(step_\d+|critic_\d+|best)\.(tmp|old)-[A-Za-z0-9_]{8}$|^best\.tmp$")
_ROLLOUT = re.compile(r"^step_\d+\.arrow(\.tmp-[0-9a-f]{8})?$")
_EVENTS = re.compile(r"^events\.out\.tfevents\.")


@dataclass
class RunDir:
    path: str
    warn: Callable[[str], None] = lambda s: None
    _lock_fd: int | None = field(default=None, repr=False)
    _kept: set = field(default_factory=set, repr=False)  # old checkpoints pruning leaves

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
        """A new run starts only in an empty directory (nothing of another run is replaced
        unless --overwrite says so)."""
        other = [n for n in os.listdir(self.path) if n != LOCK]
        if not other:
            return
        what = "a run" if os.path.exists(self.config) else "files"
        raise UsageError(f"{self.path} already holds {what} ({', '.join(sorted(other)[:3])}); "
                         "use --resume RUN_DIR to continue it, --overwrite to replace a previous "
                         "run, or another run_dir")

    def check_resumable(self) -> int:
        """The last complete step, 0 when there is none (the run starts again: :meth:`restart`),
        or a usage error for a directory that is not a run."""
        if not os.path.exists(self.config):
            raise UsageError(f"{self.path} is not a tcli run directory (no config.toml)")
        done = self.complete_steps()
        return done[-1] if done else 0

    def restart(self) -> None:
        """A run with no complete checkpoint starts again from step 1 with its config.toml: what
        it wrote is removed (metrics, rollouts, partial checkpoints), anything else stays."""
        ours, others = self.ours()
        gone = self._remove([p for p in ours if p != self.config])
        note = f"; removed {gone}" if gone else ""
        kept = f"; left in place: {_names(self.path, others)}" if others else ""
        self.warn(f"{self.path} has no complete checkpoint: starting the run again from step 1 "
                  f"with its config.toml{note}{kept}")

    def overwrite(self) -> None:
        """``--overwrite``: a previous tcli run in this directory is removed before a new one
        starts; anything tcli did not write makes it refuse before anything is removed."""
        ours, others = self.ours()
        if others:
            raise UsageError(f"--overwrite: {others[0]} was not written by tcli; not replacing "
                             f"{self.path} (move it away or use another run_dir)")
        if ours and not os.path.exists(self.config):
            raise UsageError(f"--overwrite: {self.path} is not a tcli run directory (no "
                             "config.toml); not replacing it")
        gone = self._remove([p for p in ours if p != self.config])  # replaced by the new run's
        if gone:
            self.warn(f"--overwrite: removed the previous run in {self.path} ({gone})")

    def check_can_continue(self, last: int, done: list[dict], run) -> None:
        """A resumed run with nothing left to do names the setting to change (exit 2) instead of
        stopping at once; ``done``: the metrics of steps 1..last, ``run``: its RunOptions."""
        if last >= run.steps:
            raise UsageError(f"{self.path} already finished: its last checkpoint is step {last} of "
                             f"steps = {run.steps}; give --steps with a number above {last} to "
                             "train further")
        wall = max((m.get("wall_time", 0.0) for m in done), default=0.0)
        if run.max_wall_seconds and wall >= run.max_wall_seconds:
            raise UsageError(f"{self.path} stopped at step {last} on its wall-clock budget "
                             f"({wall:.1f}s of max_wall_seconds = {run.max_wall_seconds:g}); give "
                             f"--max-wall-seconds above {wall:.1f} (0 = no limit) to continue")
        sampled = max((m.get("sampled_tokens_total", 0) for m in done), default=0)
        if run.max_sampled_tokens and sampled >= run.max_sampled_tokens:
            raise UsageError(f"{self.path} stopped at step {last} on its sampled-token budget "
                             f"({sampled} of max_sampled_tokens = {run.max_sampled_tokens}); give "
                             f"--max-sampled-tokens above {sampled} (0 = no limit) to continue")

    # -- what tcli wrote ---------------------------------------------------------------
    def ours(self) -> tuple[list[str], list[str]]:
        """(tcli's, the rest): the paths in the directory, looking one level into checkpoints/
        and rollouts/ (whose own folder counts as tcli's). The lock is neither: it stays."""
        ours, others = [], []
        for name in sorted(os.listdir(self.path)):
            path = os.path.join(self.path, name)
            if name == LOCK:
                continue
            if name in ("checkpoints", "rollouts") and _is_dir(path):
                ckpts = name == "checkpoints"
                mine = self._own_checkpoint if ckpts else _own_rollout
                for sub in sorted(os.listdir(path)):
                    p = os.path.join(path, sub)
                    if not mine(p):
                        others.append(p)
                    elif ckpts and (foreign := _foreign(p)):
                        others.extend(foreign)  # the checkpoint stays whole, named by them
                    else:
                        ours.append(p)
                ours.append(path)
            elif (_is_file(path) and (name in _TOP_FILES or _TOP_TEMP.match(name))) \
                    or self._own_tensorboard(path):
                ours.append(path)
            else:
                others.append(path)
        return ours, others

    @staticmethod
    def _own_checkpoint(path: str) -> bool:
        """A tcli checkpoint (its state file), or a partial one (the writer's marker), under one
        of the names the loop writes (a file a user put in it is not: :func:`_foreign`)."""
        from tcli.models.checkpoint import MARKER, STATE_FILE

        name = os.path.basename(path)
        if not _is_dir(path):
            return False
        state = os.path.isfile(os.path.join(path, STATE_FILE))
        if _CKPT_TEMP.match(name):
            return state or os.path.isfile(os.path.join(path, MARKER)) or name == "best.tmp"
        return bool(_CKPT_DIR.match(name)) and state

    def _own_tensorboard(self, path: str) -> bool:
        """The folder config.toml's ``tensorboard`` names, when it is in the run directory and
        holds event files only."""
        import tomllib

        try:
            with open(self.config, "rb") as f:
                tb = tomllib.load(f).get("tensorboard")
        except (OSError, ValueError):
            return False
        if not isinstance(tb, str) or not tb or not _is_dir(path) \
                or os.path.realpath(tb) != os.path.realpath(path):
            return False
        return all(_EVENTS.match(n) and _is_file(os.path.join(path, n)) for n in os.listdir(path))

    def _remove(self, paths: list[str]) -> str:
        """Delete ``paths`` (of :meth:`ours`; checkpoints/ and rollouts/ only once empty); what
        was removed, for a one-line message."""
        said = _names(self.path, [p for p in paths if p not in (self.checkpoints, self.rollouts)])
        for p in paths:
            if p in (self.checkpoints, self.rollouts):
                if not os.listdir(p):
                    os.rmdir(p)
            elif _is_dir(p):
                shutil.rmtree(p)
            else:
                os.unlink(p)
        return said

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
        """Delete complete step checkpoints beyond the newest ``keep_last`` (only those); one
        holding a file tcli did not write stays whole, said once."""
        for s in self.complete_steps()[:-keep_last]:
            for path in (self.ckpt(s), self.critic_ckpt(s)):
                foreign = _foreign(path)
                if not foreign:
                    shutil.rmtree(path, ignore_errors=True)
                elif path not in self._kept:
                    self._kept.add(path)
                    self.warn(f"keeping {path}: it holds {foreign[0]}, which tcli did not write")

    def set_best(self, step: int) -> None:
        """best/ becomes a copy of step_N, swapped in atomically; an existing best/ that is not a
        checkpoint is never replaced."""
        from tcli.models.checkpoint import STATE_FILE

        if os.path.exists(self.best) and not os.path.exists(os.path.join(self.best, STATE_FILE)):
            raise UsageError(f"{self.best} exists and is not a tcli checkpoint; not replacing it")
        foreign = _foreign(self.best)
        if foreign:
            raise UsageError(f"{self.best} holds {foreign[0]}, which tcli did not write; not "
                             "replacing it (move that away and --resume)")
        tmp = self.best + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)  # a partial copy of a killed run (our own name)
        shutil.copytree(self.ckpt(step), tmp)
        if os.path.exists(self.best):
            shutil.rmtree(self.best)
        os.replace(tmp, self.best)

    # -- resumes -----------------------------------------------------------------------
    def record_resume(self, step: int, changed: dict) -> None:
        """A resume whose first step is ``step`` ran with ``changed`` ({key: value}: the settings
        its flags changed from config.toml, which keeps its own): one line of resumes.jsonl, so
        the run directory says how each step was made. Lines from ``step`` on are dropped (those
        steps are run again); no file while no resume changed anything."""
        path = os.path.join(self.path, RESUMES)
        kept = [r for r in self.read_resumes() if r["step"] < step]
        lines = (kept + [{"step": step, "changed": changed}]) if changed or kept else []
        if lines:
            write_atomic_bytes(path, b"".join(orjson.dumps(r) + b"\n" for r in lines))
        elif _is_file(path):
            os.unlink(path)

    def read_resumes(self) -> list[dict]:
        """resumes.jsonl's lines ([] without one); a line that is not one of its records is bad
        data naming the file and line."""
        from tcli.errors import DataError

        path = os.path.join(self.path, RESUMES)
        if not _is_file(path):
            return []
        out = []
        with open(path, "rb") as f:
            for no, line in enumerate(f, 1):
                try:
                    r = orjson.loads(line)
                except orjson.JSONDecodeError:
                    r = None
                if not (isinstance(r, dict) and isinstance(r.get("step"), int)
                        and isinstance(r.get("changed"), dict)):
                    raise DataError("not a resume record ({\"step\": N, \"changed\": {...}})",
                                    file=path, line=no)
                out.append(r)
        return out

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


def _is_dir(path: str) -> bool:
    return os.path.isdir(path) and not os.path.islink(path)


def _is_file(path: str) -> bool:
    return os.path.isfile(path) and not os.path.islink(path)


def _foreign(ckpt: str) -> list[str]:
    """What in a checkpoint directory tcli did not write: the files a user put in it, or the
    directory itself when it has no state file; [] for a partial one (its temporary directory
    is all tcli's) or one that is not there."""
    from tcli.models.ownership import STATE_FILE, foreign_files

    if _CKPT_TEMP.match(os.path.basename(ckpt)) or not os.path.lexists(ckpt):
        return []
    if not _is_dir(ckpt) or not os.path.isfile(os.path.join(ckpt, STATE_FILE)):
        return [ckpt]
    return foreign_files(ckpt)


def _own_rollout(path: str) -> bool:
    return _is_file(path) and bool(_ROLLOUT.match(os.path.basename(path)))


def _names(root: str, paths: list[str], most: int = 4) -> str:
    """A few paths relative to the run directory, for a one-line message."""
    rel = [os.path.relpath(p, root) + ("/" if _is_dir(p) else "") for p in paths]
    more = f" and {len(rel) - most} more" if len(rel) > most else ""
    return ", ".join(rel[:most]) + more
