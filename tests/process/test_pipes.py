"""tcli commands as separate processes joined by real OS pipes, as a shell runs them: a pipe from
one tcli into another, the whole sample-tree | verify | build-tree | advantages | train-step chain,
a reader that leaves early (`| head`), a terminal on stdin, a closed stdout."""

from __future__ import annotations

import math
import os
import pty
import subprocess
import sys
import time

import numpy as np
import orjson
import pytest

from conftest import DATA, REPO, jsonl, parse, stderr_one_line as one_error_line, stream_input
from conftest import example_records


def test_pipe_build_tree_into_advantages():
    """stdin -> build-tree -> real OS pipe -> advantages -> stdout."""
    p1 = subprocess.Popen([sys.executable, "-m", "tcli", "build-tree"], cwd=REPO, stdin=subprocess.PIPE,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    p2 = subprocess.Popen([sys.executable, "-m", "tcli", "advantages", "-e", "tempo"], cwd=REPO,
                          stdin=p1.stdout, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    p1.stdout.close()
    p1.stdin.write(stream_input())
    p1.stdin.close()
    out, err2 = p2.communicate(timeout=60)
    assert p1.wait(timeout=60) == 0, p1.stderr.read()
    assert p2.returncode == 0, err2
    recs = parse(out)
    assert len(recs) == 16
    oracle = recs[:4]
    np.testing.assert_allclose(oracle[0]["advantages"], [1.154701, 0.577350, 1.732051, 0.866025], atol=1e-5)
    np.testing.assert_allclose(oracle[2]["advantages"], [1.154701, 1.443376, 0.866025, 0.866025], atol=1e-5)
    np.testing.assert_allclose(oracle[3]["advantages"], [-1.732051, -0.866025, -0.866025], atol=1e-5)
    for r in recs:
        assert r["estimator"] == "tempo" and r["schema"] == "tcli.rollout/1"
        assert len(r["values"]) == len(r["token_ids"]) + 1
        assert len(r["branch"]) == len(r["advantages"]) == len(r["token_ids"])
    # unknown fields travel through untouched
    assert oracle[1]["meta"] == {"k": 1} and recs[5]["text"] == example_records()[1]["text"]


def test_stdin_terminal_exits_2_quickly():
    master, slave = pty.openpty()
    try:
        for cmd in (["build-tree"], ["advantages", "-e", "grpo"]):
            t0 = time.monotonic()
            r = subprocess.run([sys.executable, "-m", "tcli", *cmd], cwd=REPO, stdin=slave,
                               capture_output=True, timeout=30)
            assert time.monotonic() - t0 < 20
            assert r.returncode == 2, (cmd, r.stderr)
            assert "terminal" in one_error_line(r.stderr)
            assert r.stdout == b""
    finally:
        os.close(master)
        os.close(slave)


@pytest.mark.parametrize("fmt", ["jsonl", "arrow"])
def test_closed_stdout_ends_quietly(tmp_path, fmt):
    """`tcli build-tree big | head -1`: the reader leaves early; exit 0, nothing on stderr."""
    rng = np.random.default_rng(0)
    recs = [{"prompt_id": f"g{i // 8}", "token_ids": rng.integers(0, 9, 300).tolist(),
             "reward": float(i % 2)} for i in range(320)]
    src = tmp_path / "big.jsonl"
    src.write_bytes(jsonl(recs))
    p = subprocess.Popen([sys.executable, "-m", "tcli", "build-tree", src, "--format", fmt], cwd=REPO,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    p.stdout.read(100)
    p.stdout.close()
    err = p.stderr.read()
    assert p.wait(timeout=60) == 0, err
    assert err == b""


def test_shell_pipe_into_head(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_bytes(jsonl([dict(r, prompt_id=f"{r['prompt_id']}-{k}") for k in range(40)
                           for r in parse(stream_input())]))
    cmd = (f"{sys.executable} -m tcli build-tree {src} | {sys.executable} -m tcli advantages | head -1; "
           "echo \"status=${PIPESTATUS[0]},${PIPESTATUS[1]}\"")
    r = subprocess.run(["bash", "-c", cmd], cwd=REPO, capture_output=True, timeout=60)
    lines = r.stdout.decode().splitlines()
    assert len(lines) == 2 and lines[-1] == "status=0,0", r.stdout + r.stderr
    assert "advantages" in orjson.loads(lines[0])
    assert r.stderr == b""


def test_full_pipeline_through_real_pipes(tiny, tmp_path):
    """sample-tree | verify | build-tree | advantages | train-step, each a separate process."""
    prompts = DATA / "gsm8k_test.jsonl"
    new = tmp_path / "ckpt1"
    tee = tmp_path / "advantaged.jsonl"
    py = f"{sys.executable} -m tcli"
    cmd = (f"{py} sample-tree {prompts} --model {tiny} --limit 2 --n 4 --max-new-tokens 12 "
           f"--min-new-tokens 4 --seed 1 --no-chat-template"
           f" | {py} verify --task gsm8k --workers 1"
           f" | {py} build-tree"
           f" | {py} advantages --estimator tempo"
           f" | tee {tee}"
           f" | {py} train-step --model {tiny} -o {new} --lr 1e-3 --metrics {tmp_path / 'm.jsonl'}")
    p = subprocess.run(["bash", "-o", "pipefail", "-c", cmd], cwd=REPO, env=_env(),
                       capture_output=True, timeout=600)
    assert p.returncode == 0, p.stderr.decode()
    recs = [orjson.loads(x) for x in tee.read_bytes().splitlines()]
    assert len(recs) == 8 and {r["prompt_id"] for r in recs} == {"gsm8k-test-0000", "gsm8k-test-0001"}
    for r in recs:
        assert len(r["advantages"]) == len(r["token_ids"]) == len(r["logprobs"])
        assert len(r["values"]) == len(r["token_ids"]) + 1
        assert r["reward"] in (0.0, 1.0) and r["verdict"]["task"] == "gsm8k"
    state = orjson.loads((new / "tcli_state.json").read_bytes())
    assert state["step"] == 1
    metrics = orjson.loads((tmp_path / "m.jsonl").read_bytes().splitlines()[0])
    assert metrics["num_sequences"] >= 1 and math.isfinite(metrics["loss"])


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def test_closed_stdout_is_one_line():
    p = subprocess.run(f'"{sys.executable}" -m tcli build-tree /dev/null >&-', shell=True,
                       cwd=REPO, capture_output=True)
    assert p.returncode != 0
    assert p.stderr.decode().count("\n") == 1 and b"Traceback" not in p.stderr
