"""Runs a user can recover: a run that stopped before its first checkpoint starts again with
--resume, --overwrite replaces a previous run (and only what tcli wrote), a resumed run with nothing
left to do says which setting to change, and a run without evaluation does not report an accuracy.

The loops use the scripted engine of conftest (no model forward when sampling), so each costs a
few tiny train-steps."""

from __future__ import annotations

import fcntl
import os

import pytest

from conftest import LOOP_N, read_metrics, run_tcli, scripted_loop_dir

REWARD = "tcli_test_recovery_reward"
PLUGIN = """
import os


def score(text, answer, record):
    # TCLI_TEST_CRASH=1: the verifier breaks on the first training answer (eval samples one)
    if os.environ.get("TCLI_TEST_CRASH") == "1" and record.get("sample_id") == 3:
        raise RuntimeError("broken on purpose")
    return float(text.split("####")[-1].strip() == str(answer)), {}
"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(directory, model): the arith model, LOOP_PROMPTS and the reward plugin."""
    return scripted_loop_dir(tmp_path_factory, "recovery", REWARD, PLUGIN)


def _args(setup, run, *extra, **flags) -> list[str]:
    """`tcli loop` on the scripted engine: 2 steps of 4 prompts x LOOP_N, evaluation every step."""
    d, model = setup
    base = {"model": model, "train-data": d / "prompts.jsonl", "eval-data": d / "prompts.jsonl",
            "run-dir": run, "steps": 2, "prompts-per-step": 4, "engine": "scripted", "n": LOOP_N,
            "task": f"python:{REWARD}:score", "workers": 0, "prompt-template": "plain",
            "lr": 1e-3, "estimator": "grpo", "eval-every": 1, "keep-last": 5, "seed": 1,
            **{k.replace("_", "-"): v for k, v in flags.items()}}
    return ["loop", *[x for k, v in base.items() for x in (f"--{k}", str(v))], *extra]


def _loop(*args, **env):
    r = run_tcli(list(args), env={"OMP_NUM_THREADS": "1", **env})
    return r.returncode, r.stderr.decode()


def _weights(run, step: int) -> dict:
    from safetensors.numpy import load_file

    return load_file(os.path.join(run, "checkpoints", f"step_{step}", "model.safetensors"))


def _untimed(metrics: list[dict]) -> list[dict]:
    """Metrics without the clocks (the only fields two runs may differ in)."""
    return [{k: v for k, v in m.items()
             if "time" not in k and not k.startswith("seconds_") and "per_s" not in k}
            for m in metrics]


def _tree(root) -> dict[str, bytes | None]:
    """Every path under ``root`` (files with their bytes, folders as None)."""
    out = {}
    for base, dirs, files in os.walk(root):
        for n in dirs:
            out[os.path.relpath(os.path.join(base, n), root)] = None
        for n in files:
            p = os.path.join(base, n)
            out[os.path.relpath(p, root)] = b"<link>" if os.path.islink(p) else open(p, "rb").read()
    return out


@pytest.fixture(scope="module")
def reference(setup, tmp_path_factory):
    """An uninterrupted 2-step run."""
    run = tmp_path_factory.mktemp("ref") / "run"
    code, err = _loop(*_args(setup, run))
    assert code == 0, err
    return run


def _leave_leftovers(run) -> None:
    """What a kill during writes leaves behind (tcli's temporary names), and a user's files."""
    from tcli.models.checkpoint import MARKER, _MAGIC

    part = run / "checkpoints" / "step_1.tmp-abcd1234"
    part.mkdir(parents=True)
    (part / MARKER).write_bytes(_MAGIC)
    (part / "model.safetensors").write_bytes(b"half")
    (run / "rollouts").mkdir(exist_ok=True)
    (run / "rollouts" / "step_1.arrow.tmp-0123abcd").write_bytes(b"half")
    (run / "metrics.png.tmp.png").write_bytes(b"half")


def test_resume_without_a_checkpoint_starts_again_and_equals_an_uninterrupted_run(
        setup, reference, tmp_path):
    """A verifier crash in step 1 (exit 1) leaves a run without a checkpoint; --resume says it
    starts again, removes what the run wrote, keeps config.toml and the user's files, and ends
    with the uninterrupted run's weights and rewards."""
    run = tmp_path / "run"
    code, err = _loop(*_args(setup, run), TCLI_TEST_CRASH="1")
    assert code == 1 and "broken on purpose" in err, err
    assert [m["kind"] for m in read_metrics(run)] == ["eval"]  # step 0's evaluation only
    _leave_leftovers(run)
    (run / "notes.txt").write_text("mine")
    config = (run / "config.toml").read_bytes()
    code, err = _loop("loop", "--resume", run)
    assert code == 0, err
    assert f"{run} has no complete checkpoint: starting the run again from step 1" in err
    for gone in ("metrics.jsonl", "checkpoints/step_1.tmp-abcd1234/",
                 "rollouts/step_1.arrow.tmp-0123abcd", "metrics.png.tmp.png"):
        assert gone in err, gone
    assert "left in place: notes.txt" in err
    assert (run / "notes.txt").read_text() == "mine"
    assert (run / "config.toml").read_bytes() == config
    assert sorted(os.listdir(run / "checkpoints")) == ["best", "step_1", "step_2"]
    assert sorted(os.listdir(run / "rollouts")) == ["step_1.arrow", "step_2.arrow"]
    a, b = _weights(reference, 2), _weights(run, 2)
    assert all((a[k] == b[k]).all() for k in a)  # same process, same inputs: the same bits
    assert _untimed(read_metrics(run)) == _untimed(read_metrics(reference))


def test_resume_of_a_directory_without_config_changes_nothing(setup, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("{}\n")
    code, err = _loop("loop", "--resume", run)
    assert code == 2 and "not a tcli run directory (no config.toml)" in err
    assert os.listdir(run) == ["metrics.jsonl"]  # checked before the lock is taken


def test_overwrite_replaces_a_previous_run_and_nothing_else(setup, reference, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(reference, run)
    code, err = _loop(*_args(setup, run, steps=1))
    assert code == 2 and "already holds a run" in err and "--overwrite" in err, err
    before = _tree(run)
    for name, make in [("notes.txt", lambda p: p.write_text("mine")),
                       ("checkpoints/mine", lambda p: p.mkdir()),
                       ("rollouts/step_1.jsonl", lambda p: p.write_text("{}")),
                       ("checkpoints/step_9", lambda p: p.mkdir()),  # not a checkpoint
                       ("metrics.png", lambda p: (p.unlink(), p.symlink_to(run / "config.toml")))]:
        make(run / name)
        code, err = _loop(*_args(setup, run, "--overwrite", steps=1))
        assert code == 2 and f"--overwrite: {run / name} was not written by tcli" in err, err
        assert all(os.path.lexists(run / p) for p in before), name  # nothing removed
        if os.path.islink(run / name):
            (run / name).unlink()
            (run / name).write_bytes(before[name])
        elif (run / name).is_dir():
            (run / name).rmdir()
        else:
            (run / name).unlink()
    assert _tree(run) == before
    _leave_leftovers(run)
    code, err = _loop(*_args(setup, run, "--overwrite", steps=1, eval_every=0))
    assert code == 0, err
    assert f"--overwrite: removed the previous run in {run}" in err
    assert sorted(os.listdir(run / "checkpoints")) == ["step_1"]
    assert sorted(os.listdir(run / "rollouts")) == ["step_1.arrow"]
    assert [(m["kind"], m["step"]) for m in read_metrics(run)] == [("train", 1)]
    assert "every = 0" in (run / "config.toml").read_text()  # the new run's settings


def test_overwrite_refuses_a_directory_that_is_not_a_run(setup, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("{}\n")
    code, err = _loop(*_args(setup, run, "--overwrite"))
    assert code == 2 and "not a tcli run directory (no config.toml)" in err, err
    assert (run / "metrics.jsonl").read_text() == "{}\n"
    code, err = _loop(*_args(setup, run, "--overwrite", "--resume", run))
    assert code == 2 and "not both" in err
    empty = tmp_path / "new"
    code, err = _loop(*_args(setup, empty, "--overwrite", steps=1, eval_every=0))
    assert code == 0 and "removed" not in err, err  # nothing to replace: a plain new run


def test_overwrite_never_touches_a_running_loops_directory(setup, reference, tmp_path):
    """A loop that holds the run directory's lock: --overwrite exits 2 naming its pid and removes
    nothing (the lock is taken before anything is looked at)."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(reference, run)
    before = _tree(run)
    fd = os.open(run / ".lock", os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.ftruncate(fd, 0)
        os.write(fd, b"4242\n")
        for extra in (["--overwrite"], []):
            code, err = _loop(*_args(setup, run, *extra))
            assert code == 2 and "in use by another tcli loop (pid 4242)" in err, err
        code, err = _loop("loop", "--resume", run, "--steps", "3")
        assert code == 2 and "pid 4242" in err
    finally:
        os.close(fd)
    assert {k: v for k, v in _tree(run).items() if k != ".lock"} == \
        {k: v for k, v in before.items() if k != ".lock"}


def test_resume_of_a_finished_run_names_steps(setup, tmp_path):
    """A run that did all its steps: --resume exits 2 naming --steps and changes nothing; with
    more steps it continues. Without evaluation the summary reports none (not -1)."""
    run = tmp_path / "run"
    code, err = _loop(*_args(setup, run, eval_every=0))
    assert code == 0 and "no evaluation" in err and "-1.000" not in err, err
    before = _tree(run)
    code, err = _loop("loop", "--resume", run)
    assert code == 2, err
    assert f"{run} already finished: its last checkpoint is step 2 of steps = 2; give --steps " \
           "with a number above 2 to train further" in err
    assert _tree(run) == before
    other = tmp_path / "other"
    code, err = _loop("loop", "--resume", run, "--steps", "3", "--run-dir", other)
    assert code == 2 and "a resumed run stays in its own directory" in err, err
    assert not other.exists() and _tree(run) == before
    code, err = _loop("loop", "--resume", run, "--steps", "3", "--run-dir", run)
    assert code == 0, err
    assert [m["step"] for m in read_metrics(run)] == [1, 2, 3]
    # config.toml keeps steps = 2 for the next resume, and the log says so
    assert "for this invocation only: --steps (steps) 3 (config.toml: 2)" in err, err


def test_more_steps_than_a_decaying_schedule_spans_are_refused(setup, tmp_path):
    """A linear schedule spans the first run's steps (config.toml keeps the span): resumed with
    more steps, the new ones would train at lr 0, so the resume names schedule_steps instead;
    with a longer span it trains on at an lr above 0."""
    run = tmp_path / "run"
    code, err = _loop(*_args(setup, run, eval_every=0, lr_schedule="linear"))
    assert code == 0, err
    before = _tree(run)
    code, err = _loop("loop", "--resume", run, "--steps", "3")
    assert code == 2 and "--schedule-steps (train.schedule_steps) 2" in err, err
    assert "lr 0" in err and _tree(run) == before
    code, err = _loop("loop", "--resume", run, "--steps", "3", "--schedule-steps", "3")
    assert code == 0, err
    lrs = [m["train_lr"] for m in read_metrics(run)]
    assert lrs[0] > lrs[1] > lrs[2] > 0, lrs


def test_resume_after_the_wall_budget_names_max_wall_seconds(setup, tmp_path):
    run = tmp_path / "run"
    code, err = _loop(*_args(setup, run, eval_every=0, max_wall_seconds=1e-6))
    assert code == 0 and "wall-clock budget reached" in err, err
    assert [m["step"] for m in read_metrics(run)] == [1]
    before = _tree(run)
    code, err = _loop("loop", "--resume", run)
    assert code == 2 and "stopped at step 1 on its wall-clock budget" in err, err
    assert "give --max-wall-seconds above" in err and "(0 = no limit)" in err
    assert _tree(run) == before
    code, err = _loop("loop", "--resume", run, "--max-wall-seconds", "0")
    assert code == 0, err
    assert [m["step"] for m in read_metrics(run)] == [1, 2]


def test_resume_after_the_token_budget_names_max_sampled_tokens(setup, tmp_path):
    run = tmp_path / "run"
    code, err = _loop(*_args(setup, run, eval_every=0, max_sampled_tokens=1))
    assert code == 0 and "sampled-token budget reached" in err, err
    code, err = _loop("loop", "--resume", run)
    assert code == 2 and "give --max-sampled-tokens above" in err, err


def test_overwrite_knows_the_runs_own_tensorboard_folder(setup, tmp_path):
    """config.toml's tensorboard folder inside the run directory is the run's (event files only);
    a file of the user's in it makes it the user's."""
    pytest.importorskip("tensorboard")
    run = tmp_path / "run"
    tb = run / "tb"
    code, err = _loop(*_args(setup, run, steps=1, eval_every=0, tensorboard=tb))
    assert code == 0, err
    assert os.listdir(tb)
    (tb / "notes.txt").write_text("mine")
    code, err = _loop(*_args(setup, run, "--overwrite", steps=1, eval_every=0))
    assert code == 2 and f"--overwrite: {tb} was not written by tcli" in err, err
    (tb / "notes.txt").unlink()
    code, err = _loop(*_args(setup, run, "--overwrite", steps=1, eval_every=0))
    assert code == 0, err
    assert not tb.exists() and sorted(os.listdir(run / "checkpoints")) == ["step_1"]
