"""Several verifiers on one record: which ones run, and how their results become the record's
``reward`` (the weighted sum), ``rewards`` and ``verdicts`` (each one's, by task name).

One task leaves a record as it always was: ``reward`` and ``verdict`` only, so pipelines and
files made with one verifier stay byte-identical; a weight other than 1 on that task also keeps
its unweighted reward in ``rewards`` (correctness, which eval's accuracy reads). With several,
``verdict`` is the first task's (the one eval's accuracy reads), and ``rewards``/``verdicts`` hold
every task's, keyed by the task as given (``auto`` stays ``auto``; the verdict's ``task`` says
which verifier it picked).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Sequence

from tcli.errors import DataError, UsageError
from tcli.verifiers.auto import pick_task
from tcli.verifiers.tasks import check_task


@dataclass(frozen=True)
class Tasks:
    """The task names of a verify stage and the weight of each one's reward."""

    names: tuple[str, ...]
    weights: tuple[float, ...]

    @classmethod
    def of(cls, task: str | Sequence[str], weights: Sequence[float] | None = None) -> "Tasks":
        """Checked tasks (one name or several) and weights (default 1 each); exit 2 on a name
        that cannot be resolved, a name given twice, or weights that do not fit."""
        names = (task,) if isinstance(task, str) else tuple(task)
        if not names:
            raise UsageError("no task: give at least one verifier")
        if len(set(names)) < len(names):
            raise UsageError(f"a task is given twice: {', '.join(names)}")
        ws = tuple(float(w) for w in weights) if weights else (1.0,) * len(names)
        if len(ws) != len(names):
            raise UsageError(f"weights: one per task ({len(names)}), got {len(ws)}")
        if not all(math.isfinite(w) for w in ws):
            raise UsageError(f"weights must be finite numbers, got {list(ws)}")
        for name in names:
            check_task(name)  # an unknown task fails here, before any record is read
        return cls(names, ws)

    @property
    def several(self) -> bool:
        return len(self.names) > 1

    def pick(self, record: dict) -> tuple[str, ...]:
        """The verifier each task runs on ``record`` (``auto`` picks per record)."""
        return tuple(pick_task(record) if t == "auto" else t for t in self.names)

    def apply(self, rec: dict, results: Sequence, file: str, line: int) -> None:
        """Write one record's results (one ``(reward, verdict)`` per task, in order)."""
        if not self.several:
            (reward, verdict), w = results[0], self.weights[0]
            rec["reward"] = reward if w == 1.0 else _finite(w * reward, file, line)
            rec["verdict"] = verdict
            rec.pop("rewards", None)  # a stale multi-task result (verify run again)
            rec.pop("verdicts", None)
            if w != 1.0:  # the weighted reward no longer says whether the answer was right
                rec["rewards"] = {self.names[0]: reward}
            return
        try:
            total = math.fsum(w * r for w, (r, _) in zip(self.weights, results))
        except OverflowError:
            total = math.inf
        rec["reward"] = _finite(total, file, line)
        rec["verdict"] = results[0][1]
        rec["rewards"] = {n: r for n, (r, _) in zip(self.names, results)}
        rec["verdicts"] = {n: v for n, (_, v) in zip(self.names, results)}


def _finite(reward: float, file: str, line: int) -> float:
    if not math.isfinite(reward):
        raise DataError(f"the weighted reward is not finite ({reward})", file=file, line=line,
                        field="reward")
    return reward


def verdicts_of(rec: dict) -> dict:
    """Every verdict of a verified record, by task name (one task: ``{None: verdict}``)."""
    several = rec.get("verdicts")
    return several if isinstance(several, dict) and several else {None: rec["verdict"]}


def first_reward(rec: dict) -> float:
    """The first task's reward: what a verified record's correctness means (eval's accuracy)."""
    several = rec.get("rewards")
    if isinstance(several, dict) and several:
        return float(next(iter(several.values())))
    return float(rec["reward"])


def reward_means(records: Iterable[dict]) -> dict[str, float]:
    """``rewards/<task>``: each task's mean reward over records scored by several tasks."""
    by_task: dict[str, list[float]] = {}
    for r in records:
        for name, value in (r.get("rewards") or {}).items():
            by_task.setdefault(name, []).append(float(value))
    return {f"rewards/{k}": math.fsum(v) / len(v) for k, v in by_task.items()}
