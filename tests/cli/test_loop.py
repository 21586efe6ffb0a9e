"""tcli loop: a short end-to-end run, resume after a kill gives the same final checkpoint."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import orjson
import pytest

from conftest import REPO, arith_run_dir, run_tcli  # noqa: E402
from examples.arith.task import make_prompts  # noqa: E402

ROOT = str(REPO)


HOLD = "tcli_test_hold"  # arith's verifier that holds step 2 while TCLI_TEST_HOLD names a file
HOLD_PLUGIN = """
import os
import time

from tcli.verifiers.arith import verify_arith


def score(text, answer, record):
    mark = os.environ.get("TCLI_TEST_HOLD")
    if mark and record.get("policy_version", 0) >= 1:
        open(mark, "w").close()
        time.sleep(3600)
    return verify_arith(text, answer, record)
"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d, model = arith_run_dir(tmp_path_factory, "loop", {
        "train.jsonl": make_prompts(40, seed=1, split="train"),
        "test.jsonl": make_prompts(8, seed=2, split="test")},
        hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128)
    (d / f"{HOLD}.py").write_text(HOLD_PLUGIN)
    if str(d) not in sys.path:
        sys.path.insert(0, str(d))
    return d, model


def _args(d, model, run, steps, **extra):
    base = {"model": model, "train-data": str(d / "train.jsonl"), "eval-data": str(d / "test.jsonl"),
            "run-dir": str(run), "steps": steps, "prompts-per-step": 4, "n": 4, "max-new-tokens": 12,
            "min-new-tokens": 2, "lr": 1e-3, "eval-every": 2, "eval-limit": 8, "task": "arith",
            "prompt-template": "plain", "seed": 3, "keep-last": 10, **extra}
    out = []
    for k, v in base.items():
        out += [f"--{k}", str(v)]
    return out


def _tcli(args, timeout: float = 120):
    return run_tcli(args, env={"OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}, timeout=timeout)


def _weights(ckpt):
    from safetensors.numpy import load_file

    return load_file(os.path.join(ckpt, "model.safetensors"))


RUN = dict(estimator="tempo")  # 3 steps, evaluation at 0, 2 and 3


@pytest.fixture(scope="module")
def full_run(setup, tmp_path_factory):
    """An uninterrupted 3-step run: checked end to end, and the reference for kill + resume."""
    d, model = setup
    run = tmp_path_factory.mktemp("full") / "run"
    p = _tcli(["loop", *_args(d, model, run, 3, **RUN)], timeout=600)
    assert p.returncode == 0, p.stderr.decode()
    return run


def test_loop_end_to_end(setup, full_run, tmp_path):
    d, model = setup
    run = full_run
    assert (run / "config.toml").exists()
    assert (run / "metrics.png").exists()
    for s in (1, 2, 3):
        assert (run / "rollouts" / f"step_{s}.arrow").exists()
        assert (run / "checkpoints" / f"step_{s}" / "tcli_state.json").exists()
    metrics = [orjson.loads(x) for x in (run / "metrics.jsonl").read_bytes().splitlines()]
    train = [m for m in metrics if m["kind"] == "train"]
    evals = [m for m in metrics if m["kind"] == "eval"]
    assert [m["step"] for m in train] == [1, 2, 3]
    assert [m["step"] for m in evals] == [0, 2, 3]
    from tcli.io import RecordReader

    for m in train:  # each step's metrics describe exactly the rollouts it wrote
        recs = [r for _, r in RecordReader(str(run / "rollouts" / f"step_{m['step']}.arrow"))]
        assert len(recs) == 4 * 4
        assert m["reward_mean"] == pytest.approx(sum(r["reward"] for r in recs) / len(recs))
        assert m["sampled_tokens"] == sum(len(r["token_ids"]) for r in recs)
        assert m["train_num_tokens"] == m["sampled_tokens"]  # every response trains
        assert m["wall_time"] >= m["seconds_sample"] + m["seconds_train"] > 0
    # the rollouts of a step are inspectable with the stream tools
    show = _tcli(["show-tree", str(run / "rollouts" / "step_1.arrow")])
    assert show.returncode == 0 and b"leaf" in show.stdout
    # tcli plot draws one or several runs
    png = tmp_path / "cmp.png"
    p = _tcli(["plot", str(run), str(run), "-o", str(png)])
    assert p.returncode == 0, p.stderr.decode()
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # training moved the weights
    w0, w3 = _weights(model), _weights(str(run / "checkpoints" / "step_3"))
    assert any(abs(w0[k] - w3[k]).max() > 0 for k in w0)


def test_unknown_config_key_is_usage_error(setup, tmp_path):
    d, model = setup
    cfg = tmp_path / "c.toml"
    cfg.write_text('lerning_rate = 0.1\n')
    p = _tcli(["loop", "--config", str(cfg)])
    assert p.returncode == 2
    assert b"lerning_rate" in p.stderr and b"Traceback" not in p.stderr


def test_kill_and_resume_gives_same_checkpoint(setup, full_run, tmp_path):
    """SIGKILL inside step 2 (after an evaluation; the verifier holds step 2 until the kill, so
    the run cannot finish first on a fast machine), --resume: the uninterrupted run's weights and
    rewards, evaluations included."""
    d, model = setup
    steps, ref = 3, full_run
    run, mark = tmp_path / "run", tmp_path / "in-step-2"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{d}{os.pathsep}{ROOT}",
           "TCLI_TEST_HOLD": str(mark)}
    args = _args(d, model, run, steps, **RUN, task=f"python:{HOLD}:score", workers=0)
    proc = subprocess.Popen([sys.executable, "-m", "tcli", "loop", *args],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and not mark.exists() and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert mark.exists() and (run / "checkpoints" / "step_1" / "tcli_state.json").exists()
    assert not (run / "checkpoints" / "step_2").exists()
    p = _tcli(["loop", "--resume", str(run)], timeout=600)
    assert p.returncode == 0, p.stderr.decode()
    a = _weights(str(ref / "checkpoints" / f"step_{steps}"))
    b = _weights(str(run / "checkpoints" / f"step_{steps}"))
    for k in a:
        assert (a[k] == b[k]).all(), k
    m_ref = [orjson.loads(x) for x in (ref / "metrics.jsonl").read_bytes().splitlines()]
    m_run = [orjson.loads(x) for x in (run / "metrics.jsonl").read_bytes().splitlines()]
    assert [m["step"] for m in m_run if m["kind"] == "train"] == [1, 2, 3]
    assert [m["reward_mean"] for m in m_run if m["kind"] == "train"] == \
        [m["reward_mean"] for m in m_ref if m["kind"] == "train"]
    evals = [[(m["step"], m["accuracy"], m["mean_response_tokens"], m["sampled_tokens_total"])
              for m in ms if m["kind"] == "eval"] for ms in (m_ref, m_run)]
    assert evals[0] == evals[1] and [e[0] for e in evals[0]] == [0, 2, 3]
