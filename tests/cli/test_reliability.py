"""Reliability II through the real CLI: one writer per run directory (a real loop process holds it),
resume never restarts silently, nothing of the user's is replaced, numeric edges are data errors."""

from __future__ import annotations

import json
import os
import signal
import time

import orjson
import pytest

from conftest import REPO, arith_run_dir, popen_tcli as _popen, run_tcli
from examples.arith.task import make_prompts

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


@pytest.fixture(scope="module")
def arith(tmp_path_factory):
    """(directory, model): an arith model and 16 training prompts."""
    return arith_run_dir(tmp_path_factory, "rel",
                         {"train.jsonl": make_prompts(16, seed=1, split="train")})


# ----------------------------------------------------------------------------- run directories

def _loop_args(d, model, run, *extra):
    return ["loop", "--model", model, "--train-data", d / "train.jsonl", "--run-dir", run,
            "--prompts-per-step", "2", "--n", "2", "--max-new-tokens", "6", "--task", "arith",
            "--prompt-template", "plain", "--eval-every", "0", "--workers", "0", *extra]


def test_one_writer_per_run_directory(arith, tmp_path):
    d, model = arith
    run = tmp_path / "run"
    p = _popen(_loop_args(d, model, run, "--steps", "200"))
    try:
        deadline = time.time() + 120
        while not (run / "config.toml").exists() and time.time() < deadline:
            time.sleep(0.05)
        r = run_tcli(_loop_args(d, model, run, "--steps", "1"), env=ENV)
        assert r.returncode == 2
        assert f"in use by another tcli loop (pid {p.pid})" in r.stderr.decode()
        r = run_tcli(["loop", "--resume", run], env=ENV)
        assert r.returncode == 2 and f"pid {p.pid}" in r.stderr.decode()
    finally:
        os.killpg(p.pid, signal.SIGKILL)
        p.communicate()


def test_resume_without_a_complete_checkpoint_starts_again(arith, tmp_path):
    """Never silently: it says so, and a fresh run never takes over the directory."""
    d, model = arith
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.toml").write_text(
        f'model = "{model}"\ntrain_data = "{d / "train.jsonl"}"\nsteps = 1\nprompts_per_step = 2\n'
        '[sample]\nn = 2\nmax_new_tokens = 6\nprompt_template = "plain"\n'
        '[verify]\ntask = "arith"\nworkers = 0\n[eval]\nevery = 0\n')
    (run / "metrics.jsonl").write_bytes(b'{"kind": "eval", "step": 0, "accuracy": 0.5}\n')
    r = run_tcli(_loop_args(d, model, run, "--steps", "1"), env=ENV)
    assert r.returncode == 2 and "already holds a run" in r.stderr.decode()
    assert (run / "metrics.jsonl").read_bytes() == b'{"kind": "eval", "step": 0, "accuracy": 0.5}\n'
    r = run_tcli(["loop", "--resume", run], env=ENV, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "has no complete checkpoint: starting the run again from step 1" in r.stderr.decode()
    assert [m["kind"] for m in map(json.loads, (run / "metrics.jsonl").read_bytes().splitlines())] \
        == ["train"]


def test_corrupt_metrics_line_keeps_the_lines_after_it_and_corrupt_checkpoint_is_named(arith, tmp_path):
    d, model = arith
    run = tmp_path / "run"
    r = run_tcli(_loop_args(d, model, run, "--steps", "2", "--keep-last", "5"), env=ENV, timeout=300)
    assert r.returncode == 0, r.stderr
    lines = (run / "metrics.jsonl").read_bytes().splitlines()
    assert len(lines) == 2
    (run / "metrics.jsonl").write_bytes(b"\n".join([b'{"kind": "tra', *lines]) + b"\n")
    r = run_tcli(["loop", "--resume", run, "--steps", "3"], env=ENV, timeout=300)
    assert r.returncode == 0, r.stderr
    steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_bytes().splitlines()]
    assert steps == [1, 2, 3]
    (run / "checkpoints" / "step_3" / "model.safetensors").write_bytes(b"\x00garbage" * 10)
    r = run_tcli(["loop", "--resume", run, "--steps", "4"], env=ENV, timeout=300)
    assert r.returncode != 0 and "step_3" in r.stderr.decode() and b"Traceback" not in r.stderr


# ----------------------------------------------------------------------------- user data

def test_init_model_never_replaces_what_it_did_not_make(tmp_path):
    mine = tmp_path / "notes"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    r = run_tcli(["init-model", mine, "--hidden", "16", "--layers", "1", "--heads", "2"])
    assert r.returncode == 2 and "not replacing" in r.stderr.decode()
    assert (mine / "thesis.tex").read_text() == "years of work"
    f = tmp_path / "file.txt"
    f.write_text("x")
    r = run_tcli(["init-model", f, "--hidden", "16", "--layers", "1", "--heads", "2"])
    assert r.returncode == 2 and f.read_text() == "x"
    # its own output may be replaced
    m = tmp_path / "m"
    for _ in range(2):
        r = run_tcli(["init-model", m, "--hidden", "16", "--layers", "1", "--heads", "2"])
        assert r.returncode == 0, r.stderr


def test_init_model_never_replaces_a_trained_checkpoint(tmp_path):
    """A tcli checkpoint that holds training (train-step, the loop, a critic) is not init-model's
    to replace with random weights, nor is one whose state file is unreadable."""
    args = ["--hidden", "16", "--layers", "1", "--heads", "2"]
    m = tmp_path / "m"
    assert run_tcli(["init-model", m, *args]).returncode == 0
    weights = (m / "model.safetensors").read_bytes()
    for state in ('{"step": 4, "policy_version": 4}', '{"made_by": "init-critic"}', "{broken"):
        (m / "tcli_state.json").write_text(state)
        r = run_tcli(["init-model", m, *args, "--seed", "1"])
        assert r.returncode == 2 and "replaces only its own output" in r.stderr.decode(), r.stderr
        assert (m / "model.safetensors").read_bytes() == weights
        assert (m / "tcli_state.json").read_text() == state


# ----------------------------------------------------------------------------- numeric edges

def _group(rewards, tokens=([1, 2], [1, 3], [4])):
    return b"".join(orjson.dumps({"prompt_id": "p", "sample_id": i, "token_ids": t, "reward": r})
                    + b"\n" for i, (t, r) in enumerate(zip(tokens, rewards)))


@pytest.mark.parametrize("est", ["grpo", "tempo", "rloo", "dr_grpo"])
def test_huge_rewards_never_give_inf_or_null(est):
    r = run_tcli(["advantages", "-e", est], input=_group([1.7e308, -1.7e308, 1.7e308]))
    if r.returncode == 0:
        for line in r.stdout.splitlines():
            adv = orjson.loads(line)["advantages"]
            assert all(isinstance(a, float) and abs(a) < float("inf") for a in adv)
    else:
        assert r.returncode == 65 and "field 'reward'" in r.stderr.decode()
    if est in ("grpo", "tempo"):  # normalised: computed exactly on rescaled rewards
        assert r.returncode == 0
        small = run_tcli(["advantages", "-e", est], input=_group([1.0, -1.0, 1.0]))
        for a, b in zip(r.stdout.splitlines(), small.stdout.splitlines()):
            assert orjson.loads(a)["advantages"] == pytest.approx(orjson.loads(b)["advantages"],
                                                                 rel=1e-5)


def test_rerun_verify_then_advantages_detects_stale_values(tmp_path):
    tree = run_tcli(["build-tree"], input=_group([1.0, 0.0, 0.0]))
    assert tree.returncode == 0
    recs = [orjson.loads(x) for x in tree.stdout.splitlines()]
    recs[1]["reward"] = 1.0  # verify was re-run with another verifier
    src = b"".join(orjson.dumps(r) + b"\n" for r in recs)
    r = run_tcli(["advantages", "-e", "tempo"], input=src)
    assert r.returncode == 65 and "stale" in r.stderr.decode() and "field 'values'" in r.stderr.decode()
