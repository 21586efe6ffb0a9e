"""What every experiment tracker is: a registered class with a small interface, the package it
needs, and where it keeps its state inside the run directory.

A tracker is started once per process (``start``), gets every metrics record the loop appends to
metrics.jsonl as ``kind/field`` scalars at the record's step (``log``), and is finished when the
loop ends (``finish``). Its package is imported inside its methods only, so naming, checking and
``tcli loop --help`` never import it.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
from typing import ClassVar

import orjson

from tcli.errors import UsageError
from tcli.io import write_atomic_bytes
from tcli.registry import Registry

DIR = "trackers"          # inside the run directory: every tracker's local files and run ids
RUN_IDS = "runs.json"     # tracker name -> its run id, so that --resume continues that run


class Tracker:
    """One experiment tracker for one run directory (subclasses register in ``TRACKERS``)."""

    name: ClassVar[str] = ""
    package: ClassVar[str] = ""  # the module it imports; missing = exit 2 with the pip command

    def __init__(self, run_dir: str, where: str = ""):
        """``where``: the tracker's own place, when the user chose one (TensorBoard's DIR)."""
        self.run_dir = run_dir
        self.dir = os.path.join(run_dir, DIR)
        self.where = where

    def start(self, config: dict, commit: str | None, first_step: int) -> None:
        """Open the run: a new one logs ``config`` (the resolved TOML) and ``commit`` once; a
        resumed loop (``first_step`` > 1) continues the run it started, where it can."""
        raise NotImplementedError

    def log(self, metrics: dict[str, float], step: int) -> None:
        raise NotImplementedError

    def finish(self, ok: bool = True) -> None:
        """End the run; ``ok`` False marks it failed where the tracker has a run status."""
        raise NotImplementedError

    # -- the run id kept in the run directory --------------------------------------------
    def stored_id(self) -> str | None:
        path = os.path.join(self.dir, RUN_IDS)
        if not os.path.exists(path):
            return None
        with open(path, "rb") as f:
            return orjson.loads(f.read()).get(self.name)

    def store_id(self, run_id: str) -> None:
        path = os.path.join(self.dir, RUN_IDS)
        ids = {}
        if os.path.exists(path):
            with open(path, "rb") as f:
                ids = orjson.loads(f.read())
        os.makedirs(self.dir, exist_ok=True)
        write_atomic_bytes(path, orjson.dumps({**ids, self.name: run_id},
                                              option=orjson.OPT_INDENT_2))


TRACKERS: Registry[type[Tracker]] = Registry("tracker")


def require(name: str, label: str) -> None:
    """Exit 2 (before anything touches disk) when a tracker's package is not installed."""
    cls = TRACKERS.get(name)
    if importlib.util.find_spec(cls.package) is None:
        raise UsageError(f"{label}: {name} needs the {cls.package} package: "
                         f"pip install 'tcli[{name}]'")


def git_commit(cwd: str | None = None) -> str | None:
    """HEAD of the git repository holding ``cwd`` (default: the working directory), or None."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd or os.getcwd(),
                             capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    head = out.stdout.strip()
    return head if out.returncode == 0 and head else None


def metric_scalars(record: dict) -> dict[str, float]:
    """A metrics record's numbers as ``kind/field`` (``train/reward_mean``, ``eval/pass@1``):
    the names TensorBoard, W&B and MLflow all get."""
    kind = record.get("kind", "metrics")
    return {f"{kind}/{k}": v for k, v in record.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step"}
