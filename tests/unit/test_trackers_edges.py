"""Edges of the experiment trackers (tcli.trackers) that need none of their packages: metric
names, the run-id file, which trackers start and how they end, TensorBoard's own directory and
live flushing, and the W&B / MLflow logic against stand-ins for their clients."""

from __future__ import annotations

import subprocess
import sys
from types import SimpleNamespace

import orjson
import pytest

from tcli.errors import UsageError
from tcli.trackers import (TRACKERS, Tracker, Trackers, git_commit, metric_scalars, require,
                           start_trackers)


# ----------------------------------------------------------------------------- base

def test_metric_names_are_kind_slash_field_numbers_only():
    rec = {"kind": "eval", "step": 3, "pass@1": 0.5, "n": 4, "ok": True, "model": "m",
           "list": [1]}
    assert metric_scalars(rec) == {"eval/pass@1": 0.5, "eval/n": 4}
    assert metric_scalars({"step": 1, "loss": 0.25}) == {"metrics/loss": 0.25}


class Recorder(Tracker):
    name = package = "recorder"
    events: list = []

    def start(self, config, commit, first_step):
        self.events.append(("start", self.where, first_step))

    def log(self, metrics, step):
        self.events.append(("log", metrics, step))

    def finish(self, ok=True):
        self.events.append(("finish", ok))


class Broken(Recorder):
    def start(self, config, commit, first_step):
        raise RuntimeError("cannot start")


@pytest.fixture
def registered(monkeypatch):
    Recorder.events = []
    for name, cls in (("recorder", Recorder), ("broken", Broken), ("tensorboard", Recorder)):
        monkeypatch.setitem(TRACKERS._items, name, cls)
    return Recorder.events


def run_options(tmp_path, trackers=(), tensorboard=""):
    return SimpleNamespace(trackers=list(trackers), tensorboard=tensorboard,
                           run_dir=str(tmp_path / "run"))


def test_no_tracker_named_starts_nothing(tmp_path, registered):
    assert start_trackers(run_options(tmp_path), {}, 1) is None and registered == []


def test_tensorboard_dir_alone_or_named_too_starts_one_tensorboard(tmp_path, registered):
    sink = start_trackers(run_options(tmp_path, ["tensorboard", "recorder"], "TB"), {}, 3)
    assert registered == [("start", "TB", 3), ("start", "", 3)]   # only TensorBoard gets DIR
    sink.write([{"kind": "train", "step": 2, "loss": 1.0}, {"kind": "eval", "acc": 0.5}])
    sink.close()
    logs = [e for e in registered if e[0] == "log"]
    assert logs == [("log", {"train/loss": 1.0}, 2)] * 2 + [("log", {"eval/acc": 0.5}, 0)] * 2
    assert registered[-2:] == [("finish", True)] * 2
    registered.clear()
    start_trackers(run_options(tmp_path, [], "TB"), {}, 1)
    assert registered == [("start", "TB", 1)]


def test_a_tracker_that_fails_to_start_ends_those_started_as_failed(tmp_path, registered):
    with pytest.raises(RuntimeError, match="cannot start"):
        start_trackers(run_options(tmp_path, ["recorder", "broken"]), {}, 1)
    assert registered == [("start", "", 1), ("finish", False)]


def test_trackers_close_passes_the_outcome_on(registered):
    Trackers([Recorder("r")]).close(ok=False)
    assert registered == [("finish", False)]


def test_run_ids_of_several_trackers_share_one_file(tmp_path):
    a, b = Recorder(str(tmp_path)), Recorder(str(tmp_path))
    b.name = "other"
    assert a.stored_id() is None
    a.store_id("1")
    b.store_id("2")
    assert (a.stored_id(), b.stored_id()) == ("1", "2")
    ids = orjson.loads((tmp_path / "trackers" / "runs.json").read_bytes())
    assert ids == {"recorder": "1", "other": "2"}


def test_require_looks_for_the_package_not_the_name(monkeypatch):
    cls = TRACKERS.get("tensorboard")
    monkeypatch.setattr(cls, "package", "tcli_no_such_package")
    with pytest.raises(UsageError, match="tensorboard needs the tcli_no_such_package package"):
        require("tensorboard", "--trackers")
    monkeypatch.setattr(cls, "package", "json")
    require("tensorboard", "--trackers")


def test_git_commit_of_a_repository_without_commits_is_none(tmp_path):
    """``git rev-parse HEAD`` there prints "HEAD" and fails: not a commit."""
    if subprocess.run(["git", "init", "-q", str(tmp_path)], capture_output=True).returncode:
        pytest.skip("no git")
    assert git_commit(str(tmp_path)) is None


# ----------------------------------------------------------------------------- tensorboard

def _tb_read(log_dir) -> tuple[dict, dict]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    scalars = {t: [(e.step, e.value) for e in acc.Scalars(t)] for t in acc.Tags()["scalars"]}
    texts = {t: len(acc.Tensors(t)) for t in acc.Tags()["tensors"]}
    return scalars, texts


def test_tensorboard_own_dir_live_events_and_config_once(tmp_path):
    pytest.importorskip("tensorboard")
    from tcli.trackers.tensorboard import TensorBoardTracker

    tb = tmp_path / "tb"
    t = TensorBoardTracker(str(tmp_path / "run"), str(tb))
    t.start({"a": 1}, "abc123", 1)
    t.log({"train/loss": 0.5}, 1)
    scalars, texts = _tb_read(tb)      # before finish: a running loop is watched live
    assert scalars == {"train/loss": [(1, 0.5)]}
    assert texts == {"config/text_summary": 1, "git_commit/text_summary": 1}
    t.finish()
    assert not (tmp_path / "run" / "trackers").exists()
    again = TensorBoardTracker(str(tmp_path / "run"), str(tb))
    again.start({"a": 1}, "abc123", 2)   # resumed: the config is not logged twice
    again.log({"train/loss": 0.25}, 2)
    again.finish()
    scalars, texts = _tb_read(tb)
    assert scalars == {"train/loss": [(1, 0.5), (2, 0.25)]}
    assert texts == {"config/text_summary": 1, "git_commit/text_summary": 1}


# ----------------------------------------------------------------------------- wandb

class FakeWandbRun:
    def __init__(self, **kw):
        self.kw, self.step, self.logged = kw, 0, []

    def log(self, metrics, step):
        self.logged.append((step, metrics))
        self.step = step + 1   # W&B's counter: the next step

    def finish(self, exit_code=None):
        pass


@pytest.fixture
def fake_wandb(monkeypatch):
    mod = type(sys)("wandb")
    mod.runs = []

    def init(**kw):
        mod.runs.append(FakeWandbRun(**kw))
        return mod.runs[-1]

    mod.init, mod.Settings, mod.teardown = init, lambda **kw: kw, lambda: None
    monkeypatch.setitem(sys.modules, "wandb", mod)
    return mod


def test_wandb_new_run_stores_its_id_and_logs_config_from_step_0(tmp_path, fake_wandb):
    from tcli.trackers.wandb import WandbTracker

    t = WandbTracker(str(tmp_path / "run"))
    t.start({"lr": 1}, "abc", 1)
    run = fake_wandb.runs[0]
    assert run.kw["config"] == {"lr": 1, "git_commit": "abc"} and run.kw["resume"] == "allow"
    assert t.stored_id() == run.kw["id"]
    t.log({"eval/acc": 0.5}, 0)
    t.log({"train/loss": 1.0}, 1)
    assert run.logged == [(0, {"eval/acc": 0.5}), (1, {"train/loss": 1.0})]
    resumed = WandbTracker(str(tmp_path / "run"))
    resumed.start({"lr": 1}, "abc", 2)
    again = fake_wandb.runs[1]
    assert again.kw["id"] == run.kw["id"] and again.kw["config"] is None
    again.step = 2
    resumed.log({"train/loss": 1.0}, 1)   # logged before the kill
    resumed.log({"train/loss": 0.5}, 2)
    assert again.logged == [(2, {"train/loss": 0.5})]


# ----------------------------------------------------------------------------- mlflow

class FakeMlflowClient:
    """An in-memory tracking store: runs with params, tags, status and metric histories."""

    runs: dict = {}

    def __init__(self, tracking_uri):
        self.uri = tracking_uri

    def get_experiment_by_name(self, name):
        return None

    def create_experiment(self, name):
        return "1"

    def create_run(self, exp_id, run_name, tags):
        rid = f"run{len(self.runs)}"
        self.runs[rid] = {"name": run_name, "tags": tags, "params": [], "metrics": [],
                          "status": "RUNNING", "batches": []}
        return SimpleNamespace(info=SimpleNamespace(run_id=rid))

    def log_batch(self, run_id, metrics=(), params=()):
        r = self.runs[run_id]
        r["batches"].append(len(params) or len(metrics))
        r["params"] += list(params)
        r["metrics"] += list(metrics)

    def update_run(self, run_id, status):
        self.runs[run_id]["status"] = status

    def set_terminated(self, run_id, status):
        self.runs[run_id]["status"] = status

    def get_run(self, run_id):
        keys = {m.key: None for m in self.runs[run_id]["metrics"]}
        return SimpleNamespace(data=SimpleNamespace(metrics=keys))

    def get_metric_history(self, run_id, key):
        return [m for m in self.runs[run_id]["metrics"] if m.key == key]


@pytest.fixture
def fake_mlflow(monkeypatch):
    FakeMlflowClient.runs = {}
    tracking, entities = type(sys)("mlflow.tracking"), type(sys)("mlflow.entities")
    tracking.MlflowClient = FakeMlflowClient
    entities.Param = lambda key, value: SimpleNamespace(key=key, value=value)
    entities.Metric = lambda key, value, timestamp, step: SimpleNamespace(key=key, value=value,
                                                                          step=step)
    monkeypatch.setitem(sys.modules, "mlflow", type(sys)("mlflow"))
    monkeypatch.setitem(sys.modules, "mlflow.tracking", tracking)
    monkeypatch.setitem(sys.modules, "mlflow.entities", entities)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "no")
    return FakeMlflowClient.runs


def test_mlflow_params_names_resume_and_status(tmp_path, fake_mlflow):
    import os

    from tcli.trackers.mlflow import MlflowTracker, mlflow_name

    assert mlflow_name("eval/pass@1") == "eval/pass_at_1"
    assert mlflow_name("train/a*b") == "train/a_b"
    config = {"sample": {"n": 8, "deep": {"x": [1, 2]}}, "long": "y" * 7000,
              **{f"k{i}": i for i in range(240)}}
    t = MlflowTracker(str(tmp_path / "run"))
    t.start(config, "abc", 1)
    assert os.environ["MLFLOW_ALLOW_FILE_STORE"] == "no"   # the user's setting stands
    (rid, run), = fake_mlflow.items()
    params = {p.key: p.value for p in run["params"]}
    assert params["sample.n"] == "8" and params["sample.deep.x"] == "[1, 2]"
    assert len(params["long"]) == 6000 and params["git_commit"] == "abc"
    assert len(params) == 244 and run["batches"] == [100, 100, 44]   # MLflow's batch limit
    assert run["tags"] == {"mlflow.source.git.commit": "abc"}
    t.log({"eval/pass@1": 0.5}, 0)
    t.log({"eval/pass@1": 0.75, "train/loss": 1.0}, 1)
    t.log({"train/loss": 0.5}, 2)
    t.finish(ok=False)
    assert run["status"] == "FAILED" and t.stored_id() == rid
    resumed = MlflowTracker(str(tmp_path / "run"))
    resumed.start(config, "abc", 2)
    assert run["status"] == "RUNNING" and len(fake_mlflow) == 1
    resumed.log({"eval/pass@1": 0.75, "train/loss": 0.5}, 2)   # step 2 of pass@1 is new
    resumed.log({"train/loss": 0.25}, 3)
    resumed.finish()
    got = [(m.key, m.step) for m in run["metrics"]]
    assert got == [("eval/pass_at_1", 0), ("eval/pass_at_1", 1), ("train/loss", 1),
                   ("train/loss", 2), ("eval/pass_at_1", 2), ("train/loss", 3)]
    assert run["status"] == "FINISHED"


def test_mlflow_without_a_commit_tags_none(tmp_path, fake_mlflow):
    from tcli.trackers.mlflow import MlflowTracker

    MlflowTracker(str(tmp_path / "run")).start({}, None, 1)
    (run,) = fake_mlflow.values()
    assert run["tags"] == {} and {p.key: p.value for p in run["params"]} == {"git_commit": "None"}
