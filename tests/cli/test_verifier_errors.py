"""A broken verifier is an error, not a reward of 0.

A `python:module:function` verifier that raises, returns something that is not a reward, exits or
kills its worker has crashed: `tcli verify` exits 1 with one line naming the verifier, the count
and the first error, and leaves no output file (unless --max-verifier-errors allows that share,
then the crashes are reported and their verdicts say `crashed`). A function that cannot take
(text, answer, record) is refused before any record is read (exit 2). A wrong answer, an
unparseable one or a time-out stays a reward of 0 with exit 0. `tcli loop` stops before training.
"""

from __future__ import annotations

import os
import textwrap

import orjson
import pytest

from conftest import REPO, arith_run_dir, run_tcli
from tcli.errors import UsageError
from tcli.stages.verify import VerifierCrashed, verify_records

PLUGIN = textwrap.dedent('''
    import math, os, sys, time

    def _good(text, answer):
        return float(text == answer), {"parsed": text}

    def raises(text, answer, record):
        if text == "bad":
            raise ValueError("boom\\nsecond line")
        return _good(text, answer)

    def returns_none(text, answer, record):
        return None if text == "bad" else _good(text, answer)

    def returns_str(text, answer, record):
        return "x" if text == "bad" else _good(text, answer)

    def returns_nan(text, answer, record):
        return (math.nan, {}) if text == "bad" else _good(text, answer)

    def returns_triple(text, answer, record):
        return (1.0, {}, 2) if text == "bad" else _good(text, answer)

    def returns_list_verdict(text, answer, record):
        return (1.0, ["x"]) if text == "bad" else _good(text, answer)

    def calls_sys_exit(text, answer, record):
        if text == "bad":
            sys.exit(3)
        return _good(text, answer)

    def calls_os_exit(text, answer, record):
        if text == "bad":
            os._exit(4)
        return _good(text, answer)

    def sleeps(text, answer, record):
        if text == "bad":
            time.sleep(60)
        return _good(text, answer)

    def two_args(text, answer):
        return 1.0

    def always(text, answer, record):
        raise RuntimeError("always")
''')


@pytest.fixture
def plugin(tmp_path):
    mod = f"tcli_test_broken_{tmp_path.name.replace('-', '_')}"
    (tmp_path / f"{mod}.py").write_text(PLUGIN)
    env = {"PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO)]), "OMP_NUM_THREADS": "1"}
    return mod, env, tmp_path


def jsonl(texts) -> bytes:
    return b"".join(orjson.dumps({"prompt_id": f"p{i}", "sample_id": 0, "text": t, "answer": "ok"})
                    + b"\n" for i, t in enumerate(texts))


def verify(plugin, fn, texts, *flags, workers="0", timeout=60):
    """`tcli verify` of ``texts`` into a file: (process, output path)."""
    mod, env, tmp = plugin
    src, out = tmp / "in.jsonl", tmp / "out.jsonl"
    src.write_bytes(jsonl(texts))
    p = run_tcli(["verify", str(src), "-o", str(out), "--task", f"python:{mod}:{fn}",
                  "--workers", workers, "-q", *flags], env=env, timeout=timeout)
    return p, out


def error_line(p) -> str:
    lines = p.stderr.decode().splitlines()
    assert lines and lines[-1].startswith("tcli: error: "), p.stderr
    assert "Traceback" not in p.stderr.decode(), p.stderr
    return lines[-1]


@pytest.mark.parametrize("workers", ["0", "2"])
def test_a_raising_verifier_fails_the_command_and_writes_nothing(plugin, workers):
    p, out = verify(plugin, "raises", ["ok", "ok", "bad", "ok"], workers=workers)
    assert p.returncode == 1, p.stderr
    line = error_line(p)
    assert f"python:{plugin[0]}:raises" in line and "crashed on 1 of" in line
    assert "in.jsonl:3 (prompt_id=p2 sample_id=0): ValueError: boom second line" in line
    assert not out.exists()


def test_an_existing_output_file_is_left_as_it_was(plugin):
    _, _, tmp = plugin
    (tmp / "out.jsonl").write_bytes(b"before\n")
    p, out = verify(plugin, "raises", ["bad"])
    assert p.returncode == 1 and out.read_bytes() == b"before\n"


@pytest.mark.parametrize("fn, words", [
    ("returns_none", "returned None"), ("returns_str", "returned reward 'x', not a number"),
    ("returns_nan", "non-finite reward nan"), ("returns_triple", "tuple of 3"),
    ("returns_list_verdict", "list verdict")])
def test_a_verifier_returning_junk_fails_the_command(plugin, fn, words):
    p, out = verify(plugin, fn, ["ok", "bad", "ok"])
    assert p.returncode == 1, p.stderr
    assert words in error_line(p) and not out.exists()


@pytest.mark.parametrize("fn, words", [("calls_sys_exit", "verifier called sys.exit(3)"),
                                       ("calls_os_exit", "verifier worker died (exit code 4)")])
def test_a_verifier_that_exits_in_a_worker_fails_the_command_without_hanging(plugin, fn, words):
    p, out = verify(plugin, fn, ["ok"] * 5 + ["bad"] + ["ok"] * 5, workers="2", timeout=60)
    assert p.returncode == 1, p.stderr
    assert words in error_line(p) and not out.exists()


def test_a_wrong_signature_is_a_usage_error_before_any_record(plugin):
    p, out = verify(plugin, "two_args", ["ok"])
    assert p.returncode == 2, p.stderr
    assert "takes (text, answer), not (text, answer, record)" in error_line(p)
    assert not out.exists()


def test_a_share_below_the_limit_goes_on_reports_and_marks_the_crashes(plugin):
    texts = ["bad" if i % 4 == 0 else "ok" for i in range(20)]  # 5 of 20 crash: 25%
    p, out = verify(plugin, "raises", texts, "--max-verifier-errors", "0.25", workers="2")
    assert p.returncode == 0, p.stderr
    warnings = p.stderr.decode().splitlines()
    assert len(warnings) == 4, warnings  # the first 3 crashes, then one line for the rest
    assert warnings[0] == (f"tcli: warning: verifier python:{plugin[0]}:raises crashed at "
                           f"{plugin[2] / 'in.jsonl'}:1 (prompt_id=p0 sample_id=0): "
                           "ValueError: boom second line")
    assert "not shown" in warnings[3]
    recs = [orjson.loads(x) for x in out.read_bytes().splitlines()]
    assert [r["text"] for r in recs] == texts
    for r in recs:
        if r["text"] == "bad":
            assert r["reward"] == 0.0 and r["verdict"]["crashed"] is True, r
            assert r["verdict"]["error"] == "ValueError: boom second line"
        else:
            assert r["reward"] == 1.0 and "crashed" not in r["verdict"], r
    # one more crash than the share allows fails
    out.unlink()
    p, out = verify(plugin, "raises", texts, "--max-verifier-errors", "0.2", workers="2")
    assert p.returncode == 1 and "5 of 20 answers (25.0%" in error_line(p) and not out.exists()


def test_the_share_limit_is_exact_at_its_boundary(plugin):
    """--max-verifier-errors 0.29 allows 29 crashes in 100 answers and refuses 30 (0.30 is more
    than 0.29, by one answer)."""
    for crashes, code in ((29, 0), (30, 1)):
        texts = ["bad"] * crashes + ["ok"] * (100 - crashes)
        (plugin[2] / "out.jsonl").unlink(missing_ok=True)
        p, out = verify(plugin, "raises", texts, "--max-verifier-errors", "0.29")
        assert p.returncode == code, (crashes, p.stderr)
        assert out.exists() == (code == 0)
    assert "30 of 100 answers (30.0%, more than max-verifier-errors 0.29)" in error_line(p)


def test_every_answer_crashing_always_fails(plugin):
    p, out = verify(plugin, "always", ["ok", "ok"], "--max-verifier-errors", "1")
    assert p.returncode == 1 and "crashed on 2 of 2 answers (every answer)" in error_line(p)


def test_a_time_out_is_the_answers_fault(plugin):
    p, out = verify(plugin, "sleeps", ["ok", "bad", "ok"], "--timeout", "0.5", workers="1")
    assert p.returncode == 0, p.stderr
    recs = [orjson.loads(x) for x in out.read_bytes().splitlines()]
    assert [r["reward"] for r in recs] == [1.0, 0.0, 1.0]
    assert recs[1]["verdict"]["error"] == "timeout" and "crashed" not in recs[1]["verdict"]


def test_the_setting_is_checked():
    p = run_tcli(["verify", "--max-verifier-errors", "1.5"], input=b"")
    assert p.returncode == 2 and b"max-verifier-errors" in p.stderr
    with pytest.raises(UsageError, match="max_verifier_errors"):
        verify_records([], "<t>", task="arith", max_verifier_errors=-0.1)


BUILTIN_NONSENSE = {"math": ["", "\\boxed{", "\\boxed{\\frac{1}{", "}}}{{{", "answer is $$"],
                    "gsm8k": ["", "no number here", "#### ", "1e99999999"],
                    "arith": ["", "#### x", "1.5"],
                    "choice": ["", "<answer></answer>", "Z", "\\boxed{}"]}


@pytest.mark.parametrize("task", sorted(BUILTIN_NONSENSE))
def test_builtins_score_nonsense_zero_without_crashing(task):
    texts = BUILTIN_NONSENSE[task]
    recs = [(i + 1, {"text": t, "answer": "A" if task == "choice" else "7",
                     "choices": {"A": "x", "B": "y"} if task == "choice" else None})
            for i, t in enumerate(texts)]
    out = list(verify_records(iter(recs), "<t>", task=task, workers=0))
    for r in out:
        assert r["reward"] == 0.0 and r["verdict"].get("crashed") is None, r


def test_the_stage_reports_through_its_callback_and_raises(plugin):
    mod, _, tmp = plugin
    import sys

    sys.path.insert(0, str(tmp))
    try:
        lines: list[str] = []
        recs = [(i + 1, {"text": "bad" if i in (1, 2) else "ok", "answer": "ok"}) for i in range(8)]
        out = list(verify_records(iter(recs), "<t>", task=f"python:{mod}:raises", workers=0,
                                  max_verifier_errors=0.25, report=lines.append))
        assert [r["reward"] for r in out] == [1, 0, 0, 1, 1, 1, 1, 1]
        assert lines == [f"verifier python:{mod}:raises crashed at <t>:{n}: ValueError: boom "
                         "second line" for n in (2, 3)]
        with pytest.raises(VerifierCrashed, match="crashed on 1 of the first 2 answers"):
            list(verify_records(iter(recs), "<t>", task=f"python:{mod}:raises", workers=0))
    finally:
        sys.path.remove(str(tmp))


# ----------------------------------------------------------------------------- the loop

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from examples.arith.task import make_prompts

    return arith_run_dir(tmp_path_factory, "crashloop", {"train.jsonl": make_prompts(8, seed=1)})


@pytest.mark.parametrize("workers", ["0", "1"])
def test_a_loop_with_a_crashing_verifier_stops_before_training(plugin, tiny, workers):
    mod, env, tmp = plugin
    d, model = tiny
    run = tmp / "run"
    args = {"model": model, "train-data": d / "train.jsonl", "run-dir": run, "steps": 2,
            "prompts-per-step": 2, "n": 2, "max-new-tokens": 4, "eval-every": 0,
            "task": f"python:{mod}:always", "prompt-template": "plain", "workers": workers}
    p = run_tcli(["loop", *[x for k, v in args.items() for x in (f"--{k}", str(v))]],
                 env=env, timeout=300)
    assert p.returncode == 1, p.stderr
    assert "RuntimeError: always" in error_line(p)
    assert not (run / "checkpoints").exists() or not os.listdir(run / "checkpoints")
    metrics = run / "metrics.jsonl"
    kinds = [orjson.loads(x)["kind"] for x in metrics.read_bytes().splitlines()] \
        if metrics.exists() else []
    assert "train" not in kinds
