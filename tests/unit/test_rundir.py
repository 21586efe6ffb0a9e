"""A run directory's rules on their own (docs/design.md §5.5): what counts as tcli's, what a resume
refuses and what ``--overwrite`` accepts, without running a loop."""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest


def _ckpt(path, *files):
    os.makedirs(path)
    for name in files:
        (path / name).write_text("{}")


def test_what_tcli_wrote_is_told_apart_by_name_and_kind(tmp_path):
    from tcli.loop.rundir import RunDir
    from tcli.models.ownership import MARKER, STATE_FILE

    ours = ["config.toml", "metrics.jsonl", "metrics.png", "metrics.jsonl.tmp-0123abcd",
            "metrics.png.tmp.png", "checkpoints/step_1", "checkpoints/critic_1",
            "checkpoints/step_3.tmp-abcDEF_1", "checkpoints/best.tmp", "rollouts/step_1.arrow",
            "checkpoints", "rollouts"]
    others = ["notes.txt", "resumes.jsonl", "config.toml.tmp-zzzzzzzz", "tb",
              "checkpoints/step_2", "checkpoints/step_4.tmp-abcDEF_2", "checkpoints/mine",
              "rollouts/step_2.arrow", "rollouts/notes.txt"]
    (tmp_path / "config.toml").write_text(f'tensorboard = "{tmp_path / "tb"}"\n')
    for name in ("metrics.jsonl", "metrics.png", "metrics.jsonl.tmp-0123abcd",
                 "metrics.png.tmp.png", "notes.txt", "config.toml.tmp-zzzzzzzz", ".lock"):
        (tmp_path / name).write_text("")
    os.makedirs(tmp_path / "resumes.jsonl")           # a directory under a file's name
    _ckpt(tmp_path / "tb", "events.out.tfevents.1", "mine.txt")  # not event files only
    c = tmp_path / "checkpoints"
    _ckpt(c / "step_1", STATE_FILE)
    _ckpt(c / "critic_1", STATE_FILE)
    _ckpt(c / "step_2", "model.safetensors")          # no state file: not a checkpoint
    _ckpt(c / "step_3.tmp-abcDEF_1", MARKER)           # a partial write: its writer's marker
    _ckpt(c / "step_4.tmp-abcDEF_2", "model.safetensors")  # neither marker nor state
    _ckpt(c / "best.tmp")
    _ckpt(c / "mine", STATE_FILE)
    _ckpt(tmp_path / "rollouts" / "step_2.arrow")     # a directory under a rollout's name
    for name in ("step_1.arrow", "notes.txt"):
        (tmp_path / "rollouts" / name).write_text("")
    got = RunDir(str(tmp_path)).ours()
    rel = [sorted(os.path.relpath(p, tmp_path) for p in paths) for paths in got]
    assert rel == [sorted(ours), sorted(others)]      # the lock is neither: it stays


def test_overwrite_of_an_empty_directory_is_a_plain_new_run(tmp_path):
    from tcli.loop.rundir import RunDir

    said = []
    run = RunDir(str(tmp_path / "run"), warn=said.append)
    run.acquire()  # as the loop does first: the lock is the only entry
    try:
        run.overwrite()
        run.check_fresh()
    finally:
        run.release()
    assert said == [] and os.listdir(tmp_path / "run") == [".lock"]


@pytest.mark.parametrize("last, wall, tokens, words", [
    (5, 1.0, 1, "already finished: its last checkpoint is step 5 of steps = 5"),
    (2, 10.0, 1, "stopped at step 2 on its wall-clock budget (10.0s of max_wall_seconds = 10)"),
    (2, 9.0, 100, "stopped at step 2 on its sampled-token budget (100 of max_sampled_tokens"),
    (2, 9.999, 99, None),
])
def test_a_resume_refuses_a_run_whose_budget_was_reached(tmp_path, last, wall, tokens, words):
    """Reached means reached: a run whose metrics equal a budget stopped on it (as the loop's
    own check says), so a resume names the setting rather than stopping at once."""
    from tcli.errors import UsageError
    from tcli.loop.rundir import RunDir

    run = SimpleNamespace(steps=5, max_wall_seconds=10.0, max_sampled_tokens=100)
    done = [{"kind": "eval", "step": 0, "wall_time": 0.5, "sampled_tokens_total": 0},
            {"kind": "train", "step": last, "wall_time": wall, "sampled_tokens_total": tokens}]
    rd = RunDir(str(tmp_path))
    if words is None:
        rd.check_can_continue(last, done, run)
        rd.check_can_continue(4, done, SimpleNamespace(steps=5, max_wall_seconds=0,
                                                       max_sampled_tokens=0))  # 0: no limit
        return
    with pytest.raises(UsageError) as e:
        rd.check_can_continue(last, done, run)
    assert words in str(e.value)


def test_a_directory_without_config_toml_is_not_resumable(tmp_path):
    from tcli.errors import UsageError
    from tcli.loop.rundir import RunDir

    (tmp_path / "checkpoints" / "step_1").mkdir(parents=True)
    with pytest.raises(UsageError, match="is not a tcli run directory \\(no config.toml\\)"):
        RunDir(str(tmp_path)).check_resumable()
    (tmp_path / "config.toml").write_text("")
    assert RunDir(str(tmp_path)).check_resumable() == 0  # no complete checkpoint: step 1 again


def test_a_restart_removes_tcli_s_files_only_and_names_the_rest(tmp_path):
    """A resume with no complete checkpoint keeps config.toml and a user's files, also those in
    checkpoints/ and rollouts/ (their folders stay while they hold one)."""
    from tcli.loop.rundir import RunDir
    from tcli.models.ownership import MARKER

    (tmp_path / "config.toml").write_text("steps = 2\n")
    (tmp_path / "metrics.jsonl").write_text("")
    _ckpt(tmp_path / "checkpoints" / "step_1.tmp-abcDEF_1", MARKER)
    (tmp_path / "checkpoints" / "mine.txt").write_text("mine")
    (tmp_path / "rollouts").mkdir()
    (tmp_path / "rollouts" / "step_1.arrow").write_text("")
    said = []
    RunDir(str(tmp_path), warn=said.append).restart()
    left = sorted(os.path.relpath(os.path.join(d, f), tmp_path)
                  for d, _, files in os.walk(tmp_path) for f in files)
    assert left == ["checkpoints/mine.txt", "config.toml"]
    assert not (tmp_path / "rollouts").exists()
    assert len(said) == 1 and said[0].endswith("; left in place: checkpoints/mine.txt"), said


def test_a_step_resumed_twice_keeps_the_last_resumes_record_only(tmp_path):
    import orjson

    from tcli.loop.rundir import RunDir

    rd = RunDir(str(tmp_path))
    rd.record_resume(3, {"train.lr": 0.5})
    rd.record_resume(3, {"train.lr": 0.25})  # killed before step 3's checkpoint, resumed again
    lines = (tmp_path / "resumes.jsonl").read_bytes().splitlines()
    assert [orjson.loads(x) for x in lines] == [{"step": 3, "changed": {"train.lr": 0.25}}]


def test_a_copy_to_best_left_by_a_killed_run_is_replaced(tmp_path):
    from tcli.loop.rundir import RunDir
    from tcli.models.ownership import STATE_FILE

    rd = RunDir(str(tmp_path))
    _ckpt(tmp_path / "checkpoints" / "step_2", STATE_FILE, "model.safetensors")
    _ckpt(tmp_path / "checkpoints" / "best.tmp", "model.safetensors")  # a partial copy
    rd.set_best(2)
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["best", "step_2"]
    assert sorted(os.listdir(rd.best)) == ["model.safetensors", STATE_FILE]


@pytest.mark.parametrize("line", ['{"step": 2, "changed": ["steps"]}', '{"changed": {}}',
                                  '{"step": "2", "changed": {}}', "[2]", "{"])
def test_a_resumes_line_that_is_not_a_record_is_bad_data(tmp_path, line):
    from tcli.errors import DataError
    from tcli.loop.rundir import RunDir

    (tmp_path / "resumes.jsonl").write_text('{"step": 1, "changed": {}}\n' + line + "\n")
    with pytest.raises(DataError) as e:
        RunDir(str(tmp_path)).read_resumes()
    assert (e.value.file, e.value.line) == (str(tmp_path / "resumes.jsonl"), 2)
