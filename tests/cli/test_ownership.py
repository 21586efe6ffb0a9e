"""Checkpoint writers replace only what tcli wrote (docs/design.md §5.2).

Every command that writes a checkpoint (init-model, import-gguf, train-step, merge-lora,
init-critic, train-critic) refuses, with exit 2 and nothing changed, a directory that is not a
tcli checkpoint (a downloaded model: config.json and a user's file, no tcli_state.json) and a tcli
checkpoint holding a file tcli did not write there; run again over its own earlier output, it
replaces it.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import orjson
import pytest

from conftest import jsonl, rollouts, run_tcli

pytest.importorskip("torch")


@pytest.fixture(scope="module")
def made(tmp_path_factory, tiny_model) -> dict:
    """The inputs of every writer: rollouts, a LoRA adapter, a critic and GAE records."""
    d = tmp_path_factory.mktemp("own")
    roll = d / "roll.jsonl"
    roll.write_bytes(jsonl(rollouts()))
    adapter, critic = d / "adapter", d / "critic"
    for argv in (["train-step", roll, "-m", tiny_model, "-o", adapter, "--lora-rank", "2", "-q"],
                 ["init-critic", "--from", tiny_model, critic, "-q"]):
        r = run_tcli(argv)
        assert r.returncode == 0, r.stderr.decode()
    r = run_tcli(["values", "--critic", critic, "-q"], input=roll.read_bytes())
    assert r.returncode == 0, r.stderr.decode()
    r = run_tcli(["advantages", "-e", "gae", "-q"], input=r.stdout)
    assert r.returncode == 0, r.stderr.decode()
    gae = d / "gae.jsonl"
    gae.write_bytes(r.stdout)
    return {"tiny": tiny_model, "roll": roll, "adapter": adapter, "critic": critic, "gae": gae}


WRITERS = {
    "init-model": lambda m, out: ["init-model", out, "--hidden", "16", "--layers", "1"],
    "train-step": lambda m, out: ["train-step", m["roll"], "-m", m["tiny"], "-o", out],
    "merge-lora": lambda m, out: ["merge-lora", m["adapter"], out],
    "init-critic": lambda m, out: ["init-critic", "--from", m["tiny"], out],
    "train-critic": lambda m, out: ["train-critic", m["gae"], "--critic", m["critic"], "-o", out],
}


def snapshot(path: Path) -> dict:
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def _refused(argv, target: Path, words: str) -> None:
    """Exit 2, one line naming the target and why, the target byte-identical, nothing beside."""
    before, names = snapshot(target), sorted(os.listdir(target.parent))
    r = run_tcli(argv)
    err = r.stderr.decode()
    assert r.returncode == 2 and r.stdout == b"", err
    assert err.count("\n") == 1 and str(target) in err and words in err, err
    assert snapshot(target) == before
    assert sorted(os.listdir(target.parent)) == names


def _downloaded(where: Path) -> Path:
    """Someone's model directory: config.json and their own file, no tcli_state.json."""
    d = where / "downloaded"
    d.mkdir()
    (d / "config.json").write_text('{"model_type": "qwen3"}')
    (d / "notes.txt").write_text("mine")
    return d


@pytest.mark.parametrize("writer", [*WRITERS, "import-gguf"])
def test_a_directory_tcli_did_not_write_is_refused(writer, made, tmp_path):
    target = _downloaded(tmp_path)
    if writer == "import-gguf":  # refused before the file is read
        src = tmp_path / "model.gguf"
        src.write_bytes(b"GGUF")
        argv = ["import-gguf", src, target]
    else:
        argv = WRITERS[writer](made, target)
    _refused(argv, target, "tcli did not")


@pytest.mark.parametrize("writer", list(WRITERS))
def test_a_previous_output_is_replaced_and_lists_its_files(writer, made, tmp_path):
    from tcli.models.checkpoint import read_state

    out = tmp_path / "out"
    for _ in range(2):
        r = run_tcli([*WRITERS[writer](made, out), "-q"])
        assert r.returncode == 0, r.stderr.decode()
    assert os.listdir(tmp_path) == ["out"]  # no temporary or replaced directory left
    assert read_state(str(out))["files"] == sorted(os.listdir(out))


@pytest.mark.parametrize("writer", ["init-model", "train-step"])
def test_a_users_file_inside_a_tcli_checkpoint_is_refused(writer, made, tmp_path):
    out = tmp_path / "out"
    r = run_tcli([*WRITERS[writer](made, out), "-q"])
    assert r.returncode == 0, r.stderr.decode()
    (out / "notes.txt").write_text("mine")
    _refused(WRITERS[writer](made, out), out, "notes.txt, which tcli did not write")


KINDS = {"init-model": "policy", "train-step": "policy", "merge-lora": "policy",
         "init-critic": "critic", "train-critic": "critic"}


@pytest.mark.parametrize("writer", list(WRITERS))
def test_a_checkpoint_of_the_other_kind_is_refused(writer, made, tmp_path):
    """A critic written over a trained policy (or a policy over a critic) loses that work: both
    are tcli's, so only the kind tells the mistake apart from a re-run."""
    other = "critic" if KINDS[writer] == "policy" else "policy"
    target = tmp_path / other
    argv = (["init-critic", "--from", made["tiny"], target] if other == "critic"
            else ["init-model", target, "--hidden", "16", "--layers", "1"])
    r = run_tcli([*argv, "-q"])
    assert r.returncode == 0, r.stderr.decode()
    _refused(WRITERS[writer](made, target), target,
             "init-model replaces only its own output" if writer == "init-model" else
             f"is a {other} checkpoint, and this writes a {KINDS[writer]}")


def test_a_checkpoint_older_than_its_file_list_is_told_apart_by_names(made, tmp_path):
    """A state without ``files``: the names tcli's writers use are tcli's, anything else not."""
    out = tmp_path / "out"
    argv = WRITERS["train-step"](made, out)
    assert run_tcli([*argv, "-q"]).returncode == 0
    state = orjson.loads((out / "tcli_state.json").read_bytes())
    del state["files"]
    (out / "tcli_state.json").write_bytes(orjson.dumps(state))
    (out / "my_model.bin").write_bytes(b"\0")
    _refused(argv, out, "my_model.bin, which tcli did not write")
    (out / "my_model.bin").unlink()
    r = run_tcli([*argv, "-q"])
    assert r.returncode == 0, r.stderr.decode()


# ----------------------------------------------------------------------------- a loop's run

REWARD = "tcli_test_ownership_reward"


@pytest.fixture(scope="module")
def loop_setup(tmp_path_factory):
    """(directory, model): the arith model, LOOP_PROMPTS and a reward plugin."""
    from conftest import scripted_loop_dir

    return scripted_loop_dir(tmp_path_factory, "ownership", REWARD)


def _loop(setup, run, *extra, **flags):
    """`tcli loop` on the scripted engine, evaluating every step (so best/ is written)."""
    from conftest import LOOP_N

    d, model = setup
    base = {"model": model, "train-data": d / "prompts.jsonl", "eval-data": d / "prompts.jsonl",
            "run-dir": run, "steps": 2, "prompts-per-step": 4, "engine": "scripted", "n": LOOP_N,
            "task": f"python:{REWARD}:score", "workers": 0, "prompt-template": "plain",
            "lr": 1e-3, "estimator": "grpo", "eval-every": 1, "keep-last": 5, "seed": 1,
            **{k.replace("_", "-"): v for k, v in flags.items()}}
    r = run_tcli(["loop", *[x for k, v in base.items() for x in (f"--{k}", str(v))], *extra],
                 env={"OMP_NUM_THREADS": "1"})
    return r.returncode, r.stderr.decode()


def test_overwrite_keeps_a_users_file_inside_a_runs_checkpoint(loop_setup, tmp_path):
    """--overwrite removes a previous run, but not a file a user put in one of its checkpoints
    (best/, step_N/) nor a directory named like a checkpoint that is not one: exit 2, naming it,
    nothing removed."""
    run = tmp_path / "run"
    code, err = _loop(loop_setup, run)
    assert code == 0, err
    assert {"best", "step_1", "step_2"} <= set(os.listdir(run / "checkpoints"))
    ckpts = run / "checkpoints"
    for path, named in [(ckpts / "best" / "notes.txt", None), (ckpts / "step_1" / "notes.txt", None),
                        (ckpts / "step_7" / "config.json", ckpts / "step_7")]:  # no state
        path.parent.mkdir(exist_ok=True)
        path.write_text("mine")
        before = snapshot(run)
        code, err = _loop(loop_setup, run, "--overwrite", steps=1)
        assert code == 2 and f"--overwrite: {named or path} was not written by tcli" in err, err
        assert snapshot(run) == before
        path.unlink()
    (ckpts / "step_7").rmdir()
    code, err = _loop(loop_setup, run, "--overwrite", steps=1)
    assert code == 0, err
    assert sorted(os.listdir(ckpts)) == ["best", "step_1"]


def test_pruning_keeps_a_checkpoint_holding_a_users_file(loop_setup, tmp_path):
    run = tmp_path / "run"
    code, err = _loop(loop_setup, run, steps=1, keep_last=1, eval_every=0)
    assert code == 0, err
    (run / "checkpoints" / "step_1" / "notes.txt").write_text("mine")
    r = run_tcli(["loop", "--resume", run, "--steps", "3"], env={"OMP_NUM_THREADS": "1"})
    err = r.stderr.decode()
    assert r.returncode == 0, err
    assert sorted(os.listdir(run / "checkpoints")) == ["step_1", "step_3"]
    assert (run / "checkpoints" / "step_1" / "notes.txt").read_text() == "mine"
    assert err.count(f"keeping {run / 'checkpoints' / 'step_1'}: it holds ") == 1, err
