"""Experiment trackers (`trackers = ["tensorboard", "wandb", "mlflow"]`): a tiny in-process loop
with each tracker writes local files whose metrics, read back from those files, are exactly
metrics.jsonl's (names `kind/field`); the config and the git commit are logged once; a resumed
run continues the same tracker run without logging a step twice. W&B and MLflow are optional
extras: their tests skip where the package is missing."""

from __future__ import annotations

import glob
import os
import shutil
import struct
import subprocess
import sys
import tomllib

import orjson
import pytest

from conftest import REPO, loop_config, read_metrics, run_tcli
from tcli.errors import UsageError


def _expected(run_dir, name=lambda k: k) -> dict:
    """{(step, name): value} of every number in metrics.jsonl, as trackers name them."""
    from tcli.trackers import metric_scalars

    return {(m["step"], name(k)): v for m in read_metrics(run_dir)
            for k, v in metric_scalars(m).items()}


def _timing(key: str) -> bool:
    """A metric that measures time (differs when a resumed run repeats a step)."""
    return any(t in key for t in ("seconds", "wall_time", "time_s", "per_s"))


def _run_and_resume(loop_model, run_dir, trackers: list[str], read, name=lambda k: k,
                    same=lambda a, b: a == b) -> None:
    """2 steps (eval at 0, 1, 2): what ``read(run_dir)`` finds in the tracker's files is
    metrics.jsonl. Then as if killed before step 2's checkpoint: --resume redoes step 2, and the
    tracker holds every step once, with the same values (timings aside: the tracker keeps the
    first run's where it cannot replace a step)."""
    from tcli.loop import resume_config, run_loop

    run_loop(loop_config(loop_model, run_dir, steps=2, eval_every=1, keep_last=5,
                         trackers=trackers), log=lambda s: None)
    got, want = read(run_dir), _expected(run_dir, name)
    assert got.keys() == want.keys() and all(same(got[k], v) for k, v in want.items())
    shutil.rmtree(run_dir / "checkpoints" / "step_2")
    run_loop(resume_config(str(run_dir), {}), resume=True, log=lambda s: None)
    assert [m["step"] for m in read_metrics(run_dir) if m["kind"] == "train"] == [1, 2]
    got, want = read(run_dir), _expected(run_dir, name)
    assert got.keys() == want.keys()
    diff = {k: (got[k], v) for k, v in want.items() if not _timing(k[1]) and not same(got[k], v)}
    assert diff == {}


def _skip_without(package: str):
    return pytest.importorskip(package, reason=f"the {package} extra is not installed (CI has "
                               f"base + test only): pip install 'tcli[{package}]' to run this")


# ----------------------------------------------------------------------------- no extra needed

def test_a_missing_extra_or_unknown_tracker_exits_2_before_anything_touches_disk(tmp_path,
                                                                                monkeypatch):
    from tcli.config.loop import load_config

    run = tmp_path / "run"
    flags = ["loop", "--model", "m", "--train-data", "d", "--run-dir", str(run)]
    p = run_tcli([*flags, "--trackers", "tensorboard,nosuch"])
    assert p.returncode == 2 and not run.exists()
    assert "--trackers (trackers): unknown value 'nosuch'; valid: mlflow, tensorboard, wandb" \
        in p.stderr.decode()
    for name in ("wandb", "mlflow"):
        monkeypatch.setitem(sys.modules, name, None)  # as if not installed
        with pytest.raises(UsageError, match=rf"{name} needs the {name} package: "
                                             rf"pip install 'tcli\[{name}\]'"):
            load_config(None, {"trackers": [name]})
    p = run_tcli([*flags, "--trackers", "wandb"])
    assert p.returncode == 2 and not run.exists()
    assert "pip install 'tcli[wandb]'" in p.stderr.decode()


def test_git_commit_of_the_working_directory(tmp_path):
    from tcli.trackers import git_commit

    assert git_commit(str(tmp_path)) is None
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True)
    if head.returncode != 0:
        pytest.skip("the tests do not run from a git checkout")
    assert git_commit(str(REPO)) == head.stdout.strip()


# ----------------------------------------------------------------------------- tensorboard

def test_tensorboard_tracker_logs_every_metric_under_the_run_dir(loop_model, tmp_path):
    _skip_without("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    def read(run) -> dict:
        acc = EventAccumulator(str(run / "trackers" / "tensorboard"))
        acc.Reload()
        assert "config/text_summary" in acc.Tags()["tensors"]
        got = {}
        for tag in acc.Tags()["scalars"]:
            for e in acc.Scalars(tag):
                assert (e.step, tag) not in got, (e.step, tag)  # the resumed step only once
                got[(e.step, tag)] = e.value
        return got

    _run_and_resume(loop_model, tmp_path / "run", ["tensorboard"], read,
                    same=lambda a, b: a == pytest.approx(b, rel=1e-6))  # float32 events


# ----------------------------------------------------------------------------- wandb

def _wandb_records(path: str) -> list:
    """The protobuf records of an offline ``.wandb`` file (a LevelDB-style log: 7-byte header,
    32 KiB blocks of chunks, each with a 7-byte header: crc, length, type)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = open(path, "rb").read()
    assert data[:4] == b":W&B"
    pos, out, buf = 7, [], b""
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        if left < 7:
            pos += left
            continue
        _, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
        buf += data[pos + 7:pos + 7 + n]
        pos += 7 + n
        if kind in (1, 4):  # a whole record, or the last chunk of one
            rec = pb.Record()
            rec.ParseFromString(buf)
            out.append(rec)
            buf = b""
    return out


def test_wandb_offline_run_holds_the_metrics_config_and_commit(loop_model, tmp_path, monkeypatch):
    _skip_without("wandb")
    for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "home"))
    monkeypatch.setenv("WANDB_MODE", "offline")  # no network: files to sync later
    config = {}

    def read(run) -> dict:
        run_id = orjson.loads((run / "trackers" / "runs.json").read_bytes())["wandb"]
        files = sorted(glob.glob(str(run / "trackers" / "wandb" / "offline-run-*" / "*.wandb")))
        assert files and all(f.endswith(f"run-{run_id}.wandb") for f in files)  # one W&B run
        history = {}
        for rec in (r for f in files for r in _wandb_records(f)):
            kind = rec.WhichOneof("record_type")
            if kind == "history":
                for item in rec.history.item:
                    key = item.key or "/".join(item.nested_key)
                    if not key.startswith("_"):  # W&B's own _step, _runtime, _timestamp
                        history.setdefault((rec.history.step.num, key),
                                           orjson.loads(item.value_json))  # the first one counts
            elif kind in ("run", "config"):
                updates = rec.run.config.update if kind == "run" else rec.config.update
                config.update({u.key: orjson.loads(u.value_json) for u in updates})
        return history

    run = tmp_path / "run"
    _run_and_resume(loop_model, run, ["wandb"], read)
    toml = tomllib.loads((run / "config.toml").read_text())
    assert config["verify"] == toml["verify"] and config["steps"] == 2
    assert "git_commit" in config


# ----------------------------------------------------------------------------- mlflow

def test_mlflow_file_store_holds_the_metrics_config_and_commit(loop_model, tmp_path, monkeypatch):
    _skip_without("mlflow")
    from tcli.trackers import git_commit
    from tcli.trackers.mlflow import mlflow_name

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # so that undo removes tcli's opt-in
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE")
    monkeypatch.chdir(REPO)  # the commit logged is this checkout's
    def read(run) -> dict:
        run_id = orjson.loads((run / "trackers" / "runs.json").read_bytes())["mlflow"]
        (store,) = glob.glob(str(run / "trackers" / "mlruns" / "*" / run_id))  # one MLflow run
        got = {}
        for root, _, names in os.walk(os.path.join(store, "metrics")):
            for n in names:
                key = os.path.relpath(os.path.join(root, n), os.path.join(store, "metrics"))
                for line in open(os.path.join(root, n)):
                    _, value, step = line.split()
                    assert (int(step), key) not in got, (step, key)  # the resumed step once
                    got[(int(step), key)] = float(value)
        return got

    run = tmp_path / "run"
    _run_and_resume(loop_model, run, ["mlflow"], read, name=mlflow_name)
    assert (0, "eval/pass_at_1") in read(run)  # MLflow refuses "@"
    run_id = orjson.loads((run / "trackers" / "runs.json").read_bytes())["mlflow"]
    (store,) = glob.glob(str(run / "trackers" / "mlruns" / "*" / run_id))
    params = os.path.join(store, "params")
    assert open(os.path.join(params, "verify.task")).read() == "arith"
    assert open(os.path.join(params, "steps")).read() == "2"
    commit = git_commit(str(REPO))
    tag = os.path.join(store, "tags", "mlflow.source.git.commit")
    assert (open(tag).read() if os.path.exists(tag) else None) == commit


def test_mlflow_run_of_a_failed_loop_is_marked_failed(loop_model, tmp_path, monkeypatch):
    """A loop that ends in an error leaves its tracker run FAILED, not FINISHED."""
    _skip_without("mlflow")
    from mlflow.tracking import MlflowClient

    from tcli.loop import run_loop

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")

    def boom(records):
        raise RuntimeError("stop here")

    run = tmp_path / "run"
    with pytest.raises(RuntimeError, match="stop here"):
        run_loop(loop_config(loop_model, run, steps=2, eval_every=0, trackers=["mlflow"]),
                 log=lambda s: None, on_step=boom)
    run_id = orjson.loads((run / "trackers" / "runs.json").read_bytes())["mlflow"]
    client = MlflowClient(tracking_uri=(run / "trackers" / "mlruns").as_uri())
    assert client.get_run(run_id).info.status == "FAILED"


def test_wandb_run_of_a_failed_loop_finishes_with_exit_code_1(monkeypatch):
    """W&B marks a run failed by its exit code."""
    from tcli.trackers.wandb import WandbTracker

    seen = []

    class Run:
        def finish(self, exit_code=None):
            seen.append(exit_code)

    fake = type(sys)("wandb")
    fake.teardown = lambda: None
    monkeypatch.setitem(sys.modules, "wandb", fake)
    t = WandbTracker.__new__(WandbTracker)
    t.run = Run()
    t.finish(ok=False)
    t.finish()
    assert seen == [1, 0]
