"""Experiment trackers: where the loop's metrics go besides metrics.jsonl (``trackers =
["tensorboard", "wandb", "mlflow"]`` at the top of a loop file, ``--trackers``).

- ``base``: the ``Tracker`` interface (start, log, finish), the ``TRACKERS`` registry, the check
  that a tracker's package is installed, the git commit;
- ``tensorboard``, ``wandb``, ``mlflow``: one class each, their packages imported lazily.

Every tracker gets the metrics under the same names (``kind/field``, as TensorBoard always had
them), the resolved configuration and the git commit once per run, and keeps its local files and
run id under RUN_DIR/trackers/ so that a resumed loop continues the same tracker run.
"""

from __future__ import annotations

# importing a tracker registers it (its package is imported only when it starts)
import tcli.trackers.mlflow  # noqa: F401
import tcli.trackers.tensorboard  # noqa: F401
import tcli.trackers.wandb  # noqa: F401
from tcli.trackers.base import TRACKERS, Tracker, git_commit, metric_scalars, require


class Trackers:
    """The trackers of one run (the run directory's writer only), started together."""

    def __init__(self, trackers: list[Tracker]):
        self.trackers = trackers

    def write(self, records: list[dict]) -> None:
        """Metrics records, as appended to metrics.jsonl, to every tracker."""
        for rec in records:
            scalars, step = metric_scalars(rec), int(rec.get("step", 0))
            for t in self.trackers:
                t.log(scalars, step)

    def close(self, ok: bool = True) -> None:
        """Finish every tracker; ``ok`` False (the loop failed) marks their runs failed."""
        for t in self.trackers:
            t.finish(ok)


def start_trackers(run, config: dict, first_step: int) -> Trackers | None:
    """The trackers ``run`` (the loop's RunOptions) names, started; None when it names none.
    ``--tensorboard DIR`` alone still means TensorBoard in DIR."""
    names = list(run.trackers)
    if run.tensorboard and "tensorboard" not in names:
        names.append("tensorboard")
    if not names:
        return None
    commit = git_commit()
    started = []
    try:
        for name in names:
            t = TRACKERS.get(name)(run.run_dir, run.tensorboard if name == "tensorboard" else "")
            t.start(config, commit, first_step)
            started.append(t)
    except BaseException:
        Trackers(started).close(ok=False)
        raise
    return Trackers(started)


__all__ = ["TRACKERS", "Tracker", "Trackers", "git_commit", "metric_scalars", "require",
           "start_trackers"]
