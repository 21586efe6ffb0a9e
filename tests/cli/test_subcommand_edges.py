"""The less-travelled commands given what a careless or hostile user gives them: plot into a
directory or through a link, train-step records whose sampling fields no flag could give, a
relative `--model` recorded by sample-tree and expand-tree, and show-tree decoding with another
model's tokenizer. Each failure is one line with the exit code of design §2.5 and no output."""

from __future__ import annotations

import os

import orjson
import pytest

from conftest import REPO, SMALL, failed, jsonl, parse, prompts, rollouts, run_tcli, shared_model

pytest.importorskip("torch")


# ----------------------------------------------------------------------------- plot

def _run_dir(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_bytes(jsonl([
        {"kind": "train", "step": 1, "reward_mean": 0.5, "wall_time": 1.0},
        {"kind": "train", "step": 2, "reward_mean": 0.7, "wall_time": 2.0}]))
    return run


def test_plot_into_a_directory_is_refused_and_leaves_nothing_beside_it(tmp_path):
    run = _run_dir(tmp_path)
    out = tmp_path / "fig.png"
    out.mkdir()
    (out / "keep").write_text("mine")
    failed(run_tcli(["plot", run, "-o", out]), 2, "output is a directory", "fig.png")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fig.png", "run"]  # no temporary file
    assert (out / "keep").read_text() == "mine"


def test_plot_through_a_symlink_writes_its_target_and_keeps_the_link(tmp_path):
    run = _run_dir(tmp_path)
    target, link = tmp_path / "real.svg", tmp_path / "link.svg"
    link.symlink_to(target)
    r = run_tcli(["plot", run, "-o", link])
    assert r.returncode == 0, r.stderr.decode()
    assert link.is_symlink() and target.read_bytes().startswith(b"<?xml")
