"""`tcli verify` through the real CLI: subprocess pipes, files, Arrow, exit codes and messages."""

from __future__ import annotations

import os
import textwrap

import orjson

from conftest import DATA, run_tcli
from tcli.io import RecordReader, RecordWriter


def rows(name: str, n: int) -> list[dict]:
    out = []
    with open(DATA / name, "rb") as f:
        for line in f:
            out.append(orjson.loads(line))
            if len(out) == n:
                break
    return out


def jsonl(recs) -> bytes:
    return b"".join(orjson.dumps(r) + b"\n" for r in recs)


def parse(out: bytes) -> list[dict]:
    return [orjson.loads(line) for line in out.split(b"\n") if line.strip()]


def rollouts() -> list[dict]:
    """GSM8K and MedQA rows turned into rollouts: even samples right, odd samples wrong."""
    out = []
    for i, rec in enumerate(rows("gsm8k_test.jsonl", 6) + rows("medqa_usmle4_test.jsonl", 6)):
        if rec.get("choices"):
            letter = rec["answer"] if i % 2 == 0 else next(k for k in rec["choices"] if k != rec["answer"])
            text = f"Let's think.\n<answer>{letter}</answer>"
        else:
            value = int(rec["answer"]) + (i % 2)
            text = f"Step by step... so she makes ${value:,}.\n#### {value}"
        out.append({"prompt_id": rec["id"], "sample_id": 0, **rec, "text": text,
                    "token_ids": [5, 6, 7], "unknown_field": {"kept": i}})
    return out


def test_stdin_to_stdout_auto():
    recs = rollouts()
    p = run_tcli(["verify", "--quiet"], input=jsonl(recs))
    assert p.returncode == 0, p.stderr
    out = parse(p.stdout)
    assert [r["prompt_id"] for r in out] == [r["prompt_id"] for r in recs]
    assert [r["reward"] for r in out] == [1.0 if i % 2 == 0 else 0.0 for i in range(len(recs))]
    assert [r["verdict"]["task"] for r in out] == ["gsm8k"] * 6 + ["choice"] * 6
    assert all(r["unknown_field"] == {"kept": i} and r["token_ids"] == [5, 6, 7]
               for i, r in enumerate(out))


def test_file_input_output_and_workers_zero(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_bytes(jsonl(rollouts()))
    outs = []
    for workers in ("0", "2"):
        dst = tmp_path / f"out{workers}.jsonl"
        p = run_tcli(["verify", src, "-o", dst, "--task", "auto", "--workers", workers])
        assert p.returncode == 0, p.stderr
        assert p.stdout == b""
        outs.append(dst.read_bytes())
    assert outs[0] == outs[1]  # same records, same bytes, with or without the pool


def test_math_records_through_cli(tmp_path):
    recs = []
    for i, rec in enumerate(rows("math500.jsonl", 4)):
        boxed = rec["answer"] if i % 2 == 0 else "\\text{wrong}"
        recs.append({**rec, "text": f"The final answer is $\\boxed{{{boxed}}}$."})
    p = run_tcli(["verify", "-q", "--timeout", "20"], input=jsonl(recs))
    assert p.returncode == 0, p.stderr
    out = parse(p.stdout)
    assert [r["reward"] for r in out] == [1.0, 0.0, 1.0, 0.0]
    assert {r["verdict"]["task"] for r in out} == {"math"}


def test_arrow_input_and_output(tmp_path):
    src = tmp_path / "in.arrow"
    recs = rollouts()
    with RecordWriter(str(src)) as w:
        w.write_all(recs)
    assert src.read_bytes()[:4] == b"\xff\xff\xff\xff"
    dst = tmp_path / "out.arrow"
    p = run_tcli(["verify", src, "-o", dst, "-q"])
    assert p.returncode == 0, p.stderr
    out = [r for _, r in RecordReader(str(dst))]
    assert [r["reward"] for r in out] == [1.0 if i % 2 == 0 else 0.0 for i in range(len(recs))]
    assert out[3]["verdict"]["correct"] is False
    assert "choices" not in out[0] and out[6]["choices"] == recs[6]["choices"]  # round-trips
    # arrow in, jsonl out (forced input format)
    p = run_tcli(["verify", src, "--input-format", "arrow", "--format", "jsonl", "-q"])
    assert p.returncode == 0, p.stderr
    assert [r["reward"] for r in parse(p.stdout)] == [r["reward"] for r in out]


def test_missing_text_exit_65_and_no_output_file(tmp_path):
    recs = rollouts()[:3]
    del recs[1]["text"]
    src = tmp_path / "bad.jsonl"
    src.write_bytes(jsonl(recs))
    dst = tmp_path / "out.jsonl"
    p = run_tcli(["verify", src, "-o", dst])
    assert p.returncode == 65
    err = p.stderr.decode()
    assert f"{src}:2" in err and "'text'" in err, err
    assert len(err.strip().splitlines()) == 1
    assert sorted(os.listdir(tmp_path)) == ["bad.jsonl"]  # neither the output nor a temp file
    p = run_tcli(["verify"], input=jsonl(recs))
    assert p.returncode == 65 and "<stdin>:2" in p.stderr.decode()


def test_verifying_again_drops_what_the_old_rewards_gave(tmp_path):
    """docs/design.md §3.5: build-tree's values and the advantages stage's fields describe the
    rewards they were computed from; verify replaces the rewards, so it drops them (said once on
    stderr) and keeps what depends on the tokens alone (branch, the critic's critic_values)."""
    derived = {"values": [0.5] * 4, "advantages": [0.5] * 3, "estimator": "gae",
               "overlong_penalty": -0.25, "returns": [1.0] * 3}
    kept = {"branch": [True, False, False], "critic_values": [0.1] * 4}
    recs = [{**r, **(derived if i < 4 else {}), **kept} for i, r in enumerate(rollouts())]
    for workers in ("0", "2"):
        p = run_tcli(["verify", "-q", "-j", workers], input=jsonl(recs))
        assert p.returncode == 0, p.stderr
        out = parse(p.stdout)
        assert [r["reward"] for r in out] == [1.0 if i % 2 == 0 else 0.0 for i in range(len(recs))]
        assert all(not set(derived) & set(r) for r in out)
        assert all({k: r[k] for k in kept} == kept for r in out)
        assert [r for r in p.stderr.decode().splitlines() if "dropped" in r] == [
            "tcli: warning: dropped values, advantages, estimator, overlong_penalty, returns "
            "from 4 records: computed from the old rewards, they would not match the new ones; "
            "run build-tree or advantages again"]
    p = run_tcli(["verify", "-q", "-j", "0"], input=p.stdout)  # nothing left to drop: no word
    assert p.returncode == 0 and b"dropped" not in p.stderr, p.stderr


def test_a_gold_answer_naming_no_option_is_bad_data_not_a_crash(tmp_path):
    """The data is wrong, not the choice verifier: exit 65 naming the line and `answer`."""
    recs = [{"prompt_id": f"q{i}", "text": "<answer>A</answer>", "answer": a,
             "choices": {"A": "red", "B": "blue"}} for i, a in enumerate(["A", "blue", "C"])]
    for workers in ("0", "1"):
        p = run_tcli(["verify", "--workers", workers, "-o", tmp_path / "out.jsonl"],
                     input=jsonl(recs))
        err = p.stderr.decode()
        assert p.returncode == 65 and len(err.strip().splitlines()) == 1, err
        assert "<stdin>:3: field 'answer': 'C' is not one of the options (A, B)" in err, err
        assert not (tmp_path / "out.jsonl").exists()
    p = run_tcli(["verify", "--workers", "0"], input=jsonl(recs[:2]))  # by letter or by text
    assert p.returncode == 0 and [r["reward"] for r in parse(p.stdout)] == [1.0, 0.0]


def test_unknown_task_exit_2():
    p = run_tcli(["verify", "--task", "nope"], input=jsonl(rollouts()[:1]))
    assert p.returncode == 2
    err = p.stderr.decode()
    assert "nope" in err and "math" in err and "gsm8k" in err and "python:module:function" in err
    assert p.stdout == b""
    p = run_tcli(["verify", "--timeout", "0"], input=jsonl(rollouts()[:1]))
    assert p.returncode == 2


def test_help_documents_options():
    p = run_tcli(["verify", "--help"])
    assert p.returncode == 0
    text = p.stdout.decode()
    for opt in ("--task", "--timeout", "--workers", "--format", "--input-format",
                "--quiet", "--output"):
        assert opt in text, opt
    assert "timeout" in text and "python:module:function" in text


def test_user_verifier_timeout_through_cli(tmp_path):
    (tmp_path / "slowverifier.py").write_text(textwrap.dedent('''
        import time

        def score(text, answer, record):
            print("verifier chatter that must not reach stdout")
            if text == "sleep":
                time.sleep(60)
            return float(text == answer), {"parsed": text}
    '''))
    texts = ["1", "sleep", "2", "3", "sleep", "4"] + [str(i) for i in range(5, 60)]
    recs = [{"i": i, "text": t, "answer": t if t != "sleep" else "x"} for i, t in enumerate(texts)]
    env = {"PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    p = run_tcli(["verify", "--task", "python:slowverifier:score", "--timeout", "1", "--workers",
                  "2", "-q"], input=jsonl(recs), env=env, timeout=60)
    assert p.returncode == 0, p.stderr
    out = parse(p.stdout)  # only records: the verifier's prints went to stderr
    assert [r["i"] for r in out] == list(range(len(texts)))
    for r in out:
        if r["text"] == "sleep":
            assert r["reward"] == 0.0 and r["verdict"]["error"] == "timeout"
        else:
            assert r["reward"] == 1.0
    assert b"verifier chatter" in p.stderr


def test_verify_never_imports_torch():
    """`tcli verify` (math-verify included) runs where torch is not installed."""
    from conftest import run_python

    code = ("import atexit, sys\n"
            "atexit.register(lambda: sys.stderr.write('heavy: %s' % sorted(m for m in "
            "('torch', 'transformers') if m in sys.modules)))\n"
            "from tcli.cli import main\n"
            "main(['verify', '-q', '-j', '1'])\n")
    recs = [{"text": "\\boxed{2}", "answer": "2"},
            {"text": "#### 2", "answer": "2", "meta": {"source": "gsm8k"}}]
    p = run_python(code, input=jsonl(recs), fresh=True, env={"OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stderr
    assert [r["reward"] for r in parse(p.stdout)] == [1.0, 1.0]
    assert p.stderr.decode().strip().endswith("heavy: []"), p.stderr
