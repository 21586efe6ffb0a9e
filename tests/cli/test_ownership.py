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
