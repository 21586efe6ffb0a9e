"""Verifiers on the real answers of the shipped benchmarks, and the verify stage (tcli.stages.verify) in-process.

Every data file contributes a deterministic sample of rows; each gold answer is written in the
surface forms models produce (boxed, "The answer is", commas and dollars, decimals for fractions,
<answer>X</answer>, option text) and must verify, while a wrong answer (gold + 1, another letter)
must not. The stage tests cover the worker pool: hard timeouts, crashed workers, order,
bounded reading and adversarial responses.
"""

from __future__ import annotations

import itertools
import json
import random
import re
import sys
import textwrap
import time
from decimal import Decimal
from fractions import Fraction
from pathlib import Path

import pytest

from conftest import ADVERSARIAL
from tcli.errors import DataError, UsageError
from tcli.verifiers import VERIFIERS, get_verifier, pick_task
from tcli.stages.verify import verify_records

from conftest import DATA

SAMPLE = 100


def sample_rows(name: str, k: int = SAMPLE) -> list[dict]:
    rows = [json.loads(line) for line in (DATA / name).read_text().split("\n") if line.strip()]
    if len(rows) <= k:
        return rows
    return random.Random(name).sample(rows, k)


def run(task: str, text: str, rec: dict) -> tuple[float, dict]:
    return get_verifier(task)(text, str(rec["answer"]), rec)


def check_forms(task: str, rec: dict, right: list[str], wrong: list[str], bad: list) -> None:
    for text in right:
        r, v = run(task, text, rec)
        if r != 1.0 or v["correct"] is not True:
            bad.append(("should verify", rec["answer"], text[-100:], v))
    for text in wrong:
        r, v = run(task, text, rec)
        if r != 0.0 or v["correct"] is not False:
            bad.append(("should fail", rec["answer"], text[-100:], v))


# ----------------------------------------------------------------------------- real data

@pytest.mark.parametrize("name", ["gsm8k_test.jsonl", "gsm8k_train.jsonl", "gsm_hard.jsonl"])
def test_gsm8k_real_answers(name):
    bad: list = []
    rows = sample_rows(name)
    for rec in rows:
        a = rec["answer"]
        assert pick_task(rec) == "gsm8k"
        d = Decimal(a)
        grouped = f"{d:,}" if d == d.to_integral_value() else a  # 1,234,567 / 0.0000195766
        neg_dollar = f"-${abs(d):,}" if d < 0 and d == d.to_integral_value() else f"${grouped}"
        right = [
            f"First 12 + 30 = 42.\n#### {a}",
            f"So the total is \\boxed{{{a}}}.",
            f"She has 3 left. The answer is {neg_dollar}.",
            f"In total she makes {neg_dollar} dollars per day.",
            f"x = 7\nThe answer is: {grouped}",
            f"Total: \\boxed{{\\${grouped}}} (after 2 days)",
            f"{a}",
        ]
        if d == d.to_integral_value():
            right.append(f"#### {a}.00")
        wrong = [f"The answer is 12.\n#### {d + 1}", f"\\boxed{{{d + 1}}}", f"so {a} ... no, {d - 1}"]
        check_forms("gsm8k", rec, right, wrong, bad)
    assert not bad, f"{len(bad)} failures, e.g. {bad[:5]}"


def test_gsm_hard_rounded_and_float_answers():
    rows = [json.loads(x) for x in (DATA / "gsm_hard.jsonl").read_text().split("\n") if x.strip()]
    floats = [r for r in rows if "." in r["answer"]]
    assert len(floats) > 100 and any(r["answer"] == "0.0000195766" for r in floats)
    bad: list = []
    for rec in floats[::5]:
        d = Decimal(rec["answer"])
        right = [f"#### {rec['answer']}", f"#### {float(d)!r}"]  # e.g. 1.95766e-05
        if abs(d) >= 1:
            right.append(f"The answer is {d.quantize(Decimal('0.01'))}")  # money rounding
        check_forms("gsm8k", rec, right, [f"#### {d + 1}", f"#### {d * 2}"], bad)
    assert not bad, f"{len(bad)} failures, e.g. {bad[:5]}"
    tiny = {"answer": "0.0000195766"}
    assert run("gsm8k", "about 0.00002 packs", tiny)[0] == 0.0   # rounded too coarsely
    assert run("gsm8k", "0.00", tiny)[0] == 0.0
    assert run("gsm8k", "#### 70001", {"answer": "70000"})[0] == 0.0  # integers compare exactly
    assert run("gsm8k", "#### 3244047.1", {"answer": "3244047.0999999996"})[0] == 1.0


_FRAC = re.compile(r"^(-?)\\[dt]?frac\{(\d+)\}\{(\d+)\}$")


def _decimal_form(answer: str) -> str | None:
    """A terminating decimal equal to a \\frac answer (3/8 -> 0.375), else None."""
    m = _FRAC.match(answer)
    if not m:
        return None
    f = Fraction(int(m[2]), int(m[3]))
    den = f.denominator
    for p in (2, 5):
        while den % p == 0:
            den //= p
    if den != 1:
        return None
    return m[1] + str(Decimal(f.numerator) / Decimal(f.denominator))


@pytest.mark.parametrize("name", ["math500.jsonl", "aime24.jsonl", "amc23.jsonl"])
def test_math_real_answers(name):
    bad: list = []
    rows = sample_rows(name)
    n_decimal = 0
    for rec in rows:
        a = rec["answer"]
        assert pick_task(rec) == "math"
        right = [
            f"Let's compute step by step ... so the result is \\boxed{{{a}}}.",
            f"The answer is ${a}$.",
            f"Final Answer: The final answer is ${a}$. I hope it is correct.",
            f"A first guess \\boxed{{1}} was wrong; redo: \\boxed{{{a}}}",
        ]
        dec = _decimal_form(a)
        if dec:
            right.append(f"\\boxed{{{dec}}}")
            n_decimal += 1
        if re.fullmatch(r"\d{4,}", a):
            right.append(f"\\boxed{{{int(a):,}}}")
        wrong = []
        if re.fullmatch(r"-?\d+", a):
            wrong.append(f"\\boxed{{{int(a) + 1}}}")
        elif "=" not in a:
            wrong.append(f"\\boxed{{{a}}} ... no: \\boxed{{\\left({a}\\right)+1}}")
        check_forms("math", rec, right, wrong, bad)
    if name == "math500.jsonl":
        assert n_decimal >= 3  # the sample does exercise \frac vs decimal
    assert not bad, f"{len(bad)} failures, e.g. {bad[:5]}"


def test_math_equivalent_forms():
    assert run("math", r"\boxed{0.5}", {"answer": r"\frac{1}{2}"})[0] == 1.0
    assert run("math", r"\boxed{\dfrac12}", {"answer": "0.5"})[0] == 1.0
    assert run("math", r"\boxed{\left( 3, \frac{\pi}{2} \right)}",
               {"answer": r"\left( 3, \frac{\pi}{2} \right)"})[0] == 1.0
    assert run("math", r"so $\boxed{\text{Evelyn}}$", {"answer": r"\text{Evelyn}"})[0] == 1.0
    r, v = run("math", r"The answer is \boxed{\frac{1}{\sqrt{2}}", {"answer": "1"})  # unclosed box
    assert r == 0.0
    r, v = run("math", "I have no idea.", {"answer": "1"})
    assert (r, v["parsed"], v["reason"]) == (0.0, None, "no answer found")


@pytest.mark.parametrize("name", ["medqa_usmle4_test.jsonl", "medmcqa_dev.jsonl",
                                  "mmlu_med_test.jsonl"])
def test_choice_real_answers(name):
    bad: list = []
    n_text = 0
    for rec in sample_rows(name):
        a, ch = rec["answer"], rec["choices"]
        assert pick_task(rec) == "choice"
        other = sorted(k for k in ch if k != a)[0]
        right = [f"Reasoning about the options...\n<answer>{a}</answer>", f"The answer is ({a}).",
                 f"Answer: {a}", a, f"({a})", f"Thus the answer is {a}. {ch[a]}",
                 f"so \\boxed{{{a}}}", f"**Answer:** **{a}**"]
        norm = " ".join(ch[a].lower().split()).rstrip(".")
        unique = sum(" ".join(v.lower().split()).rstrip(".") == norm for v in ch.values()) == 1
        if unique and len(norm) > 2 and not re.match(r"[a-j][.)]?(\s|$)", norm):
            right += [f"<answer>{ch[a]}</answer>", f"The answer is {ch[a]}", ch[a]]
            n_text += 1
        wrong = [f"<answer>{other}</answer>", f"The answer is ({other}).", other,
                 f"<answer>{a}</answer> ... on reflection <answer>{other}</answer>"]
        check_forms("choice", rec, right, wrong, bad)
    assert n_text > SAMPLE // 2
    assert not bad, f"{len(bad)} failures, e.g. {bad[:5]}"


def test_choice_edge_cases():
    ch = {"A": "A drug that lowers blood pressure", "B": "c", "C": "bc", "D": "ad"}
    rec = {"answer": "A", "choices": ch}
    assert run("choice", "The answer is A drug that lowers blood pressure", rec)[0] == 1.0
    assert run("choice", "Answer: Because of the drug", rec)[1]["parsed"] is None  # not "B"
    rec_c = {"answer": "C", "choices": ch}
    assert run("choice", "Thus the answer is C. bc", rec_c)[0] == 1.0   # letter beats text "c"
    assert run("choice", "<answer>bc</answer>", rec_c)[0] == 1.0
    assert run("choice", "<answer>c</answer>", {"answer": "B", "choices": ch})[0] == 1.0
    # no choices in the record: letters A-J
    assert run("choice", "<answer>(E)</answer>", {"answer": "E"})[0] == 1.0


def test_arith_examples_and_integers():
    from examples.arith.task import make_prompts, noisy_solution, solution

    rng = random.Random(0)
    for rec in make_prompts(100, seed=1):
        assert pick_task(rec) == "arith"
        assert run("arith", solution(rec), rec)[0] == 1.0
        noisy = noisy_solution(rec, rng, 0.5)
        final = noisy.rsplit("#### ", 1)[1]
        assert run("arith", noisy, rec)[0] == float(final == rec["answer"])
        assert run("arith", solution(rec).rsplit("\n", 1)[0], rec)[0] == 1.0  # last integer
        assert run("arith", f"#### {int(rec['answer']) + 1}", rec)[0] == 0.0
    bad: list = []
    for rec in sample_rows("gsm8k_test.jsonl"):
        a = int(rec["answer"])
        check_forms("arith", rec, [f"#### {a}", f"so it is {a}", f"#### 0{a}" if a >= 0 else f"#### {a}"],
                    [f"#### {a + 1}", f"{a} is wrong, it is {a - 1}"], bad)
    assert not bad, bad[:5]
    assert run("arith", "12-3", {"answer": "3"})[0] == 1.0      # binary minus, not -3
    assert run("arith", "it is -3", {"answer": "-3"})[0] == 1.0
    assert run("arith", "#### none\n5", {"answer": "5"})[1]["reason"] == "no integer after ####"


def test_auto_picks_per_record():
    expected = {"gsm8k_test.jsonl": "gsm8k", "gsm_hard.jsonl": "gsm8k", "math500.jsonl": "math",
                "aime24.jsonl": "math", "amc23.jsonl": "math", "medqa_usmle4_test.jsonl": "choice",
                "medmcqa_dev.jsonl": "choice", "mmlu_med_test.jsonl": "choice"}
    for name, task in expected.items():
        assert {pick_task(r) for r in sample_rows(name, 5)} == {task}, name
    assert pick_task({"meta": {"source": "tcli-arith"}}) == "arith"
    assert pick_task({"meta": "not a dict"}) == "math"
    assert pick_task({"meta": {"source": "principal components"}}) == "math"  # not "pal"


def test_registry_and_task_names():
    assert set(VERIFIERS.names()) >= {"math", "gsm8k", "choice", "arith"}
    # every registered verifier is listed (examples may register more, e.g. countdown)
    names = ", ".join(sorted(VERIFIERS.names()))
    assert names.startswith("arith, choice") and "gsm8k, math" in names
    with pytest.raises(UsageError, match=re.escape(f"valid: auto, {names}, python:")):
        get_verifier("nope")
    with pytest.raises(UsageError, match="cannot import"):
        get_verifier("python:tcli_no_such_module_xyz:f")
    with pytest.raises(UsageError, match="no function"):
        get_verifier("python:tcli.stages.verify:no_such_function")
    with pytest.raises(UsageError, match="python:module:function"):
        get_verifier("python:onlymodule")
    with pytest.raises(UsageError):
        verify_records([], "x", task="nope")  # raised at the call, before any record is read


# ----------------------------------------------------------------------------- the stage

USER_MODULE = textwrap.dedent('''
    import os, sys, time

    def score(text, answer, record):
        if text == "sleep":
            time.sleep(60)
        if text == "spin":
            while True:
                pass
        if text == "die":
            os._exit(3)
        if text == "raise":
            raise ValueError("boom\\nsecond line")
        if text == "junk":
            return "x", 5
        if text == "weird":
            return True, {"n": 10 ** 30, "s": {1}, "f": float("nan")}
        if text == "keys":
            return 0.0, {"keys": sorted(record)}
        return (1.0 if text == answer else 0.0), {"parsed": text}
''')


@pytest.fixture
def user_verifier(tmp_path, monkeypatch):
    mod = f"tcli_test_userverifier_{tmp_path.name.replace('-', '_')}"
    (tmp_path / f"{mod}.py").write_text(USER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    return f"python:{mod}:score"


def _recs(texts):
    return [(i + 1, {"text": t, "answer": t if t.isdigit() else "1", "n": i}) for i, t in
            enumerate(texts)]


def test_timeout_kills_and_keeps_order(user_verifier):
    texts = ["1", "sleep", "2", "spin", "3"] + [str(i) for i in range(4, 40)]
    t0 = time.monotonic()
    out = list(verify_records(iter(_recs(texts)), "<t>", task=user_verifier, timeout=1.0, workers=2))
    elapsed = time.monotonic() - t0
    assert elapsed < 1.0 + 6.0, elapsed  # both hung items time out in parallel, nothing waits 60 s
    assert [r["text"] for r in out] == texts
    for r in out:
        if r["text"] in ("sleep", "spin"):
            assert r["reward"] == 0.0 and r["verdict"]["error"] == "timeout", r
        else:
            assert r["reward"] == 1.0 and r["verdict"]["correct"] is True, r


def test_crash_exception_and_junk_do_not_end_the_stream_when_allowed(user_verifier):
    texts = ["1", "die", "2", "raise", "junk", "weird", "3"]
    out = list(verify_records(iter(_recs(texts)), "<t>", task=user_verifier, timeout=5.0, workers=2,
                              max_verifier_errors=0.5, report=lambda s: None))
    by = {r["text"]: r for r in out}
    assert [r["text"] for r in out] == texts
    assert by["die"]["reward"] == 0.0 and "worker died" in by["die"]["verdict"]["error"]
    assert by["raise"]["verdict"]["error"] == "ValueError: boom second line"  # one line
    assert by["junk"]["reward"] == 0.0 and by["junk"]["verdict"]["error"].startswith("TypeError")
    assert all(by[t]["verdict"]["crashed"] is True for t in ("die", "raise", "junk"))
    assert by["weird"]["reward"] == 1.0
    assert by["weird"]["verdict"]["n"] == str(10 ** 30)  # JSON-safe: orjson cannot hold it as int
    assert all(by[t]["reward"] == 1.0 for t in ("1", "2", "3"))
    # the same stream in-process (no pool) gives the same records, except the crash
    rest = [t for t in texts if t != "die"]
    inproc = list(verify_records(iter(_recs(rest)), "<t>", task=user_verifier, workers=0,
                                 max_verifier_errors=0.5, report=lambda s: None))
    pooled = [r for r in out if r["text"] != "die"]
    assert [(r["reward"], r["verdict"]) for r in inproc] == [(r["reward"], r["verdict"]) for r in pooled]


def test_workers_get_slim_records(user_verifier):
    rec = {"text": "keys", "answer": "1", "token_ids": list(range(10_000)), "logprobs": [0.0] * 10,
           "prompt_token_ids": [1], "meta": {"source": "x"}, "choices": None}
    out = list(verify_records(iter([(1, rec)]), "<t>", task=user_verifier, workers=1))
    assert out[0]["verdict"]["keys"] == ["answer", "choices", "meta", "text"]
    assert len(out[0]["token_ids"]) == 10_000  # the output record keeps every field


def test_stream_is_read_lazily_and_in_order():
    def endless():
        for i in itertools.count():
            yield i + 1, {"text": f"#### {i}", "answer": str(i), "extra": {"i": i}}

    gen = verify_records(endless(), "<t>", task="arith", workers=2)
    first = list(itertools.islice(gen, 100))  # an eager reader would never return
    gen.close()
    assert [r["extra"]["i"] for r in first] == list(range(100))
    assert all(r["reward"] == 1.0 for r in first)


def test_bad_records_raise_data_errors():
    with pytest.raises(DataError) as e:
        list(verify_records(iter([(1, {"text": "#### 1", "answer": "1"}), (7, {"answer": "1"})]),
                            "rollouts.jsonl", task="arith", workers=0))
    assert (e.value.file, e.value.line, e.value.field) == ("rollouts.jsonl", 7, "text")
    assert "rollouts.jsonl:7" in str(e.value)
    for rec, field in [({"text": 5, "answer": "1"}, "text"), ({"text": "x"}, "answer"),
                       ({"text": "x", "answer": [1]}, "answer"), ({"text": "x", "answer": True}, "answer"),
                       ({"text": "x", "answer": "A", "choices": 3}, "choices")]:
        with pytest.raises(DataError) as e:
            list(verify_records(iter([(3, rec)]), "f", task="auto", workers=2))
        assert (e.value.line, e.value.field) == (3, field)
    # numbers are fine as answers
    out = list(verify_records(iter([(1, {"text": "#### 27", "answer": 27.0}),
                                    (2, {"text": "#### 0.0000195766", "answer": 1.95766e-05})]),
                              "f", task="gsm8k", workers=0))
    assert [r["reward"] for r in out] == [1.0, 1.0]




def test_adversarial_texts_finish_fast():
    recs = []
    for task in ("math", "gsm8k", "choice", "arith"):
        for name, text in ADVERSARIAL.items():
            choices = {k: k.lower() for k in "ABCD"} if task == "choice" else None
            recs.append({"text": text, "answer": "B" if task == "choice" else "18", "case": name,
                         "task": task, "choices": choices})
    t0 = time.monotonic()
    out = []
    for task in ("math", "gsm8k", "choice", "arith"):
        mine = [(i + 1, r) for i, r in enumerate(recs) if r["task"] == task]
        out += list(verify_records(iter(mine), "<adv>", task=task, timeout=10.0, workers=2))
    elapsed = time.monotonic() - t0
    assert len(out) == len(recs)
    for r in out:
        v = r["verdict"]
        assert r["reward"] in (0.0, 1.0) and isinstance(v, dict) and "correct" in v, r["case"]
        assert v.get("error") is None, (r["task"], r["case"], v)  # capped, never timed out
        assert v["parsed"] is None or len(v["parsed"]) < 300
        json.dumps(v)
    assert elapsed < 30, elapsed
    got = {(r["task"], r["case"]): r["reward"] for r in out}
    assert got[("math", "5 MB response")] == 1.0 and got[("gsm8k", "5 MB response")] == 1.0
    assert got[("math", "power tower")] == 0.0 and got[("math", "deeply nested frac")] == 0.0


def test_model_text_is_never_evaluated(tmp_path):
    """sympy's parse_expr eval()s strings; model text must only ever meet the LaTeX parser."""
    target = tmp_path / "pwned"
    code = f"__import__('pathlib').Path({str(target)!r}).touch()"
    texts = [f"\\boxed{{{code}}}", f"The answer is {code}", f"${code}$", code, f"#### {code}"]
    for task in ("math", "gsm8k", "choice", "arith"):
        for text in texts:
            assert run(task, text, {"answer": "A" if task == "choice" else "1"})[0] == 0.0
    assert not target.exists()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl(PR_SET_PDEATHSIG) is Linux")
def test_workers_die_with_a_killed_parent(tmp_path):
    """A parent killed by SIGKILL runs no cleanup; its spinning workers must not live on."""
    import os
    import signal
    import subprocess

    (tmp_path / "spinverifier.py").write_text(textwrap.dedent(f'''
        import os
        def score(text, answer, record):
            open(os.path.join({str(tmp_path)!r}, f"pid-{{os.getpid()}}"), "w").close()
            while True:
                pass
    '''))
    script = ("import sys; from tcli.stages.verify import verify_records\n"
              "recs = iter([(i, {'text': 'x', 'answer': '1'}) for i in (1, 2)])\n"
              "list(verify_records(recs, 'x', task='python:spinverifier:score', timeout=600, workers=2))\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(Path(__file__).parents[2])])}
    parent = subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    pids: list[int] = []
    try:
        deadline = time.monotonic() + 30
        while len(pids) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
            pids = [int(p.name[4:]) for p in tmp_path.glob("pid-*")]
        assert len(pids) == 2, "workers never started"
        parent.kill()
        parent.wait()

        def alive(pid: int) -> bool:
            try:
                state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            except (FileNotFoundError, ProcessLookupError):
                return False
            return state not in ("Z", "X")  # a zombie has stopped running

        deadline = time.monotonic() + 5
        while any(alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(alive(p) for p in pids)
    finally:
        if parent.poll() is None:
            parent.kill()
        for p in pids:  # only our own workers, by pid, if the test failed
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_auto_reads_a_final_number_when_the_template_did_not_ask_for_boxed():
    """`plain` prompts get "44 + 39 = 83." style answers: auto must not pick a verifier that
    needs \\boxed{} (it scored 0 with "no answer found")."""
    from tcli.stages.verify import verify_records

    recs = [{"text": "44 + 39 = 83.", "answer": "83", "prompt_template": t} for t in
            ("plain", "Q: {prompt} A:", "boxed", None)]
    out = list(verify_records(enumerate(recs, 1), "<t>", task="auto", workers=0))
    assert [r["reward"] for r in out] == [1.0, 1.0, 0.0, 0.0]
    assert [r["verdict"]["task"] for r in out] == ["gsm8k", "gsm8k", "math", "math"]
    # a symbolic answer still goes to math-verify
    sym = {"text": "x = \\frac{1}{2}", "answer": "\\frac{1}{2}", "prompt_template": "plain"}
    assert next(verify_records(iter([(1, sym)]), "<t>", task="auto", workers=0))["verdict"]["task"] == "math"


def test_a_list_of_choices_is_lettered_from_a():
    """Choices given as a list are options A, B, C, ... in order: the gold letter must name the
    option the dataset meant, or right answers score 0."""
    from tcli.stages.verify import prepare
    from tcli.verifiers.weighted import Tasks

    rec = {"text": "The answer is green", "answer": "B", "choices": ["red", "green", 3]}
    _, _, _, slim = prepare(4, dict(rec), "f", Tasks.of("choice"))
    assert slim["choices"] == {"A": "red", "B": "green", "C": "3"}
    out = list(verify_records(iter([(1, dict(rec)), (2, dict(rec, text="The answer is red"))]),
                              "f", task="choice", workers=0))
    assert [r["reward"] for r in out] == [1.0, 0.0]
