"""Interrupts are failures, through real processes: SIGINT (Ctrl-C to the process group) and
SIGTERM end a stream stage, train-step, loop and eval with 130/143 and one line, and leave
nothing half-written; a terminated loop resumes."""

from __future__ import annotations

import os
import signal
import time

import orjson
import pytest

from conftest import REPO, arith_run_dir, popen_tcli as _popen, run_tcli, signal_after as _signal_after
from examples.arith.task import make_prompts

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


@pytest.fixture(scope="module")
def arith(tmp_path_factory):
    """(directory, model): an arith model and 16 training prompts."""
    return arith_run_dir(tmp_path_factory, "rel",
                         {"train.jsonl": make_prompts(16, seed=1, split="train")})


@pytest.mark.parametrize("sig,code,word", [(signal.SIGINT, 130, "interrupted"),
                                           (signal.SIGTERM, 143, "terminated")])
def test_stream_stage_interrupted_fails_and_writes_nothing(tmp_path, sig, code, word):
    out = tmp_path / "out.jsonl"
    p = _popen(["advantages", "-e", "grpo", "-o", out])
    p.stdin.write(b'{"prompt_id": 1, "token_ids": [1], "reward": 1}\n')
    p.stdin.flush()
    time.sleep(1.5)  # started, waiting for more input
    rc, err = _signal_after(p, sig, lambda: True)
    assert rc == code and err.strip() == f"tcli: error: {word}"
    assert os.listdir(tmp_path) == []  # no output, no temporary file


def test_train_step_interrupted_keeps_the_previous_checkpoint(arith, tmp_path):
    d, model = arith
    recs = []
    for i in range(64):
        recs.append({"prompt_id": i, "sample_id": 0, "prompt_token_ids": [3, 4, 5],
                     "token_ids": [6, 7, 8] * 40, "logprobs": [-1.0] * 120,
                     "advantages": [1.0] * 120})
    src = tmp_path / "adv.jsonl"
    src.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in recs))
    out = tmp_path / "ckpt"
    r = run_tcli(["train-step", src, "-m", model, "-o", out, "--lr", "1e-3"], timeout=300)
    assert r.returncode == 0, r.stderr
    before = {f: (out / f).read_bytes() for f in os.listdir(out)}
    p = _popen(["train-step", src, "-m", out, "-o", out, "--overwrite-model", "--lr", "1e-3",
                "--epochs", "1000"])
    rc, err = _signal_after(p, signal.SIGINT, lambda: time.sleep(4) or True)
    assert rc == 130 and "interrupted" in err and "Traceback" not in err
    assert {f: (out / f).read_bytes() for f in os.listdir(out)} == before
    assert sorted(os.listdir(tmp_path)) == ["adv.jsonl", "ckpt"]  # no temporary directory


def test_loop_terminated_exits_143_and_resumes(arith, tmp_path):
    d, model = arith
    run = tmp_path / "run"
    args = ["loop", "--model", model, "--train-data", d / "train.jsonl", "--run-dir", run,
            "--steps", "100000", "--prompts-per-step", "2", "--n", "2", "--max-new-tokens", "8",
            "--task", "arith", "--prompt-template", "plain", "--eval-every", "0",
            "--workers", "1"]
    p = _popen(args)
    # any complete checkpoint: step_1 alone may be pruned (keep_last) before a busy poll sees it,
    # and the run is far too long to end before the signal; a step_N.tmp-XXXXXXXX being written
    # holds a state file too, and the signal removes it
    saved = lambda: any(p.parent.name[5:].isdigit()  # noqa: E731
                        for p in (run / "checkpoints").glob("step_*/tcli_state.json"))
    rc, err = _signal_after(p, signal.SIGTERM, saved)
    assert rc == 143 and "terminated" in err and "Traceback" not in err
    steps = [int(n.split("_")[1]) for n in os.listdir(run / "checkpoints") if n.startswith("step_")]
    for s in steps:  # whatever was written is complete
        assert (run / "checkpoints" / f"step_{s}" / "tcli_state.json").exists()
    r = run_tcli(["loop", "--resume", run, "--steps", str(max(steps) + 1)], env=ENV, timeout=300)
    assert r.returncode == 0, r.stderr


def test_eval_interrupted(arith, tmp_path):
    d, model = arith
    # minutes of sampling uninterrupted (16 prompts x 1024 samples x 256 tokens), so the signal
    # always lands mid-run, however fast the machine
    p = _popen(["eval", "-m", model, "-d", d / "train.jsonl", "--task", "arith", "--n", "1024",
                "--temperature", "1", "--max-new-tokens", "256", "--prompt-template", "plain"])
    rc, err = _signal_after(p, signal.SIGINT, lambda: time.sleep(5) or True)
    assert rc == 130 and err.strip().endswith("tcli: error: interrupted")
