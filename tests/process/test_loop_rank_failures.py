"""`tcli loop` under torchrun when a rank fails: rank 1 dies in step 2, or hangs there (the launch
is bounded by a timeout that ends the whole process group). Either way torchrun ends non-zero, the
run directory keeps its last complete checkpoint (step 1) and nothing of step 2, and `--resume`
in one process reaches the uninterrupted run's step 2: the same tokens and rewards, the same
weights up to rounding (conftest.assert_same_update).

The fault is a python: verifier scored in the rank's own process (workers = 0), which breaks on
rank 1 only, at policy version 1 (step 2). Two torchrun launches."""

from __future__ import annotations

import os
import sys
import time

import pytest

from conftest import (REPO, arith_run_dir, assert_same_update, finish_torchrun, read_metrics,
                      run_tcli, run_torchrun, start_torchrun)
from examples.arith.task import make_prompts

MODULE = "tcli_test_rank_fault"
PLUGIN = '''
import os
import signal
import time


def score(text, answer, record):
    """A reward with variance (the parity of the answer's length); TCLI_TEST_FAULT breaks rank 1
    in step 2: kill (SIGKILL to its own process: os._exit would only fail the verifier) or hang
    (after touching TCLI_TEST_MARK)."""
    fault = os.environ.get("TCLI_TEST_FAULT")
    if fault and os.environ.get("RANK") == "1" and record.get("policy_version", 0) >= 1:
        if fault == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        open(os.environ["TCLI_TEST_MARK"], "w").close()
        time.sleep(3600)
    return float(len(text) % 2), {}
'''
CONFIG = """
model = "{model}"
train_data = "{d}/train.jsonl"
steps = 2
prompts_per_step = 2
keep_last = 5
seed = 3
[sample]
n = 4
max_new_tokens = 8
min_new_tokens = 4
prompt_template = "plain"
prompts_per_batch = 1
[verify]
task = "python:{module}:score"
workers = 0
[advantages]
estimator = "grpo"
[train]
lr = 1e-3
micro_batch_tokens = 64
[eval]
every = 0
"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d, model = arith_run_dir(tmp_path_factory, "rankfail",
                             {"train.jsonl": make_prompts(16, seed=1, split="train")})
    (d / f"{MODULE}.py").write_text(PLUGIN)
    (d / "loop.toml").write_text(CONFIG.format(model=model, d=d, module=MODULE))
    if str(d) not in sys.path:
        sys.path.insert(0, str(d))
    return d, model


@pytest.fixture(scope="module")
def reference(setup, tmp_path_factory):
    """The uninterrupted 2-step run, in one process."""
    from tcli.config.loop import load_config
    from tcli.loop import run_loop

    d, _ = setup
    run = tmp_path_factory.mktemp("ref") / "run"
    run_loop(load_config(str(d / "loop.toml"), {"run_dir": str(run)}), log=lambda s: None)
    return run


def _env(d, fault: str, mark) -> dict:
    return {"PYTHONPATH": f"{d}{os.pathsep}{REPO}", "TCLI_TEST_FAULT": fault,
            "TCLI_TEST_MARK": str(mark)}


def _group_gone(pgid: int, wait: float = 10.0) -> bool:
    """No process is left in the group (its last members may take a moment to be reaped)."""
    deadline = time.time() + wait
    while time.time() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    return False


def _assert_stopped_after_step_1(run) -> None:
    assert sorted(os.listdir(run / "checkpoints")) == ["step_1"]
    assert sorted(os.listdir(run / "rollouts")) == ["step_1.arrow"]
    assert [m["step"] for m in read_metrics(run)] == [1]


def _assert_resumes_to_the_reference(run, reference, model) -> None:
    r = run_tcli(["loop", "--resume", run], env={"OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr.decode()
    assert "resuming from step 1" in r.stderr.decode()
    from safetensors.numpy import load_file
    from tcli.io import RecordReader

    def rollouts(root):
        recs = [x for _, x in RecordReader(str(root / "rollouts" / "step_2.arrow"))]
        return [(x["prompt_id"], x["token_ids"], x["reward"]) for x in recs]

    assert rollouts(run) == rollouts(reference)
    assert [m["reward_mean"] for m in read_metrics(run)] == \
        [m["reward_mean"] for m in read_metrics(reference)]
    w = [load_file(os.path.join(p, "model.safetensors")) for p in
         (model, run / "checkpoints" / "step_2", reference / "checkpoints" / "step_2")]
    assert_same_update(*w)


def test_a_rank_that_dies_ends_the_run_and_the_run_resumes(setup, reference, tmp_path):
    """Rank 1 is killed in step 2: torchrun stops rank 0 and exits non-zero, naming the rank."""
    d, model = setup
    run = tmp_path / "run"
    p = run_torchrun(["-m", "tcli", "loop", "-c", d / "loop.toml", "--run-dir", run],
                     env=_env(d, "kill", tmp_path / "mark"), timeout=400)
    err = p.stderr.decode()
    assert not p.timed_out and p.returncode != 0, err[-3000:]
    assert "rank      : 1" in err and "exitcode  : -9" in err, err[-3000:]  # torchrun's report
    _assert_stopped_after_step_1(run)
    _assert_resumes_to_the_reference(run, reference, model)


def test_a_rank_that_hangs_is_ended_by_the_timeout_and_the_run_resumes(setup, reference,
                                                                        tmp_path):
    """Rank 1 hangs in step 2 and rank 0 waits for it: the launch's timeout ends the whole
    process group (torchrun exits non-zero, no rank is left), and the run resumes from step 1."""
    d, model = setup
    run, mark = tmp_path / "run", tmp_path / "hanging"
    p = start_torchrun(["-m", "tcli", "loop", "-c", d / "loop.toml", "--run-dir", run],
                       env=_env(d, "hang", mark))
    deadline = time.time() + 400
    while not mark.exists() and time.time() < deadline and p.poll() is None:
        time.sleep(0.2)
    assert mark.exists(), p.communicate()[1].decode()[-3000:]
    r = finish_torchrun(p, timeout=5)  # still running 5 s later: it hangs
    assert r.timed_out and r.returncode != 0, r.stderr.decode()[-3000:]
    assert _group_gone(p.pid), "a rank outlived the launch"
    _assert_stopped_after_step_1(run)
    _assert_resumes_to_the_reference(run, reference, model)
