"""MLflow (``pip install 'tcli[mlflow]'``): ``MLFLOW_TRACKING_URI`` when set, else a local file
store in RUN_DIR/trackers/mlruns (MLflow 3 keeps that store in maintenance mode; tcli opts in
with ``MLFLOW_ALLOW_FILE_STORE`` unless it is set). The run id is kept in the run directory, so
``--resume`` continues the same MLflow run. MLflow refuses ``@`` in names: ``eval/pass@1`` is
logged as ``eval/pass_at_1``."""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

from tcli.errors import TcliError
from tcli.trackers.base import TRACKERS, Tracker

_REFUSED = re.compile(r"[^\w./\- :]")  # what MLflow allows in a name (Linux)
_PARAMS_PER_CALL = 100                 # MLflow's log_batch limit


def mlflow_name(key: str) -> str:
    return _REFUSED.sub("_", key.replace("@", "_at_"))


def _flat(config: dict, prefix: str = "") -> dict[str, str]:
    """The resolved TOML as MLflow params: ``sample.n`` = "8", lists and booleans as JSON."""
    out = {}
    for k, v in config.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = (v if isinstance(v, str) else json.dumps(v))[:6000]
    return out


@TRACKERS.register("mlflow")
class MlflowTracker(Tracker):
    name = "mlflow"
    package = "mlflow"

    def start(self, config: dict, commit: str | None, first_step: int) -> None:
        from mlflow.tracking import MlflowClient

        uri = os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:
            uri = Path(self.dir, "mlruns").resolve().as_uri()
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.client = MlflowClient(tracking_uri=uri)
        self.run_id, self.logged = self.stored_id(), {}
        try:
            if self.run_id is not None:
                self.client.update_run(self.run_id, status="RUNNING")
                self.logged = self._last_steps()
            else:
                self._create(config, commit)
        except Exception as e:  # noqa: BLE001 - a store that cannot be reached: one line, exit 1
            raise TcliError(f"mlflow ({uri}): {e}") from None

    def _create(self, config: dict, commit: str | None) -> None:
        from mlflow.entities import Param

        name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or "tcli"
        exp = self.client.get_experiment_by_name(name)
        exp_id = exp.experiment_id if exp is not None else self.client.create_experiment(name)
        tags = {"mlflow.source.git.commit": commit} if commit else {}
        run = self.client.create_run(exp_id, run_name=os.path.basename(os.path.abspath(
            self.run_dir)), tags=tags)
        self.run_id = run.info.run_id
        self.store_id(self.run_id)
        params = [Param(k, v) for k, v in {**_flat(config), "git_commit": str(commit)}.items()]
        for i in range(0, len(params), _PARAMS_PER_CALL):
            self.client.log_batch(self.run_id, params=params[i:i + _PARAMS_PER_CALL])

    def _last_steps(self) -> dict[str, int]:
        """The last step of every metric the run holds (a resumed loop repeats steps after its
        last checkpoint, with the same values: they are not logged twice)."""
        keys = self.client.get_run(self.run_id).data.metrics
        return {k: max(m.step for m in self.client.get_metric_history(self.run_id, k))
                for k in keys}

    def log(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(name, float(v), now, step) for name, v in
                 ((mlflow_name(k), v) for k, v in metrics.items())
                 if step > self.logged.get(name, -1)]
        if batch:
            self.client.log_batch(self.run_id, metrics=batch)

    def finish(self, ok: bool = True) -> None:
        self.client.set_terminated(self.run_id, status="FINISHED" if ok else "FAILED")
