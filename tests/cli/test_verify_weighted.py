"""Several weighted verifiers: `tcli verify -t a -t b --weights 1,0.2` (and `[verify] task = [...]`,
`weights = [...]` in a loop file). Each record keeps every verifier's reward and verdict by name
and gets their weighted sum as `reward`; one task of weight 1 leaves records byte for byte as
they were."""

from __future__ import annotations

import os
import textwrap

import orjson
import pytest

from conftest import CORRECT, LOOP_N as N, REPO, loop_config, read_metrics, run_tcli

PLUGIN = textwrap.dedent('''
    import os, time

    def marker(text, answer, record):
        return (1.0 if "####" in text else 0.0), {"marker": "####" in text}

    def crashy(text, answer, record):
        if "boom" in text:
            raise ValueError("boom")
        return 1.0, {}

    def exits(text, answer, record):
        if "boom" in text:
            os._exit(4)
        return 1.0, {}

    def slow(text, answer, record):
        if "slow" in text:
            time.sleep(2.5)
        return 1.0, {}

    def pid(text, answer, record):
        return 1.0, {"pid": os.getpid()}

    def pid_too(text, answer, record):
        return 1.0, {"pid": os.getpid()}

    def const(text, answer, record):
        return 1.0, {}
''')

TEXTS = ["\\boxed{4} #### 4", "\\boxed{4} #### 5", "\\boxed{5} #### 4", "I think 5."]
# by hand, gold answer 4: gsm8k reads the last "####" (else the last number), math the last
# \boxed{}, the plugin rewards a "####" marker
ORACLE = {"gsm8k": [1.0, 0.0, 1.0, 0.0], "math": [1.0, 1.0, 0.0, 0.0],
          "marker": [1.0, 1.0, 1.0, 0.0]}
WEIGHTS = {"gsm8k": 1.0, "math": 0.25, "marker": 0.5}  # exact in binary: the sums are exact
# `tcli verify -t gsm8k` of TEXTS as it wrote them before several tasks existed
ONE_TASK = (
    b'{"prompt_id":"p","sample_id":0,"text":"\\\\boxed{4} #### 4","answer":"4","reward":1.0,'
    b'"verdict":{"task":"gsm8k","parsed":"4","correct":true,"via":"####"}}\n'
    b'{"prompt_id":"p","sample_id":1,"text":"\\\\boxed{4} #### 5","answer":"4","reward":0.0,'
    b'"verdict":{"task":"gsm8k","parsed":"5","correct":false,"via":"####"}}\n'
    b'{"prompt_id":"p","sample_id":2,"text":"\\\\boxed{5} #### 4","answer":"4","reward":1.0,'
    b'"verdict":{"task":"gsm8k","parsed":"4","correct":true,"via":"####"}}\n'
    b'{"prompt_id":"p","sample_id":3,"text":"I think 5.","answer":"4","reward":0.0,'
    b'"verdict":{"task":"gsm8k","parsed":"5","correct":false,"via":"last number"}}\n')


@pytest.fixture
def plugin(tmp_path):
    """(module name, env with it importable, tmp dir); the name is unique per test (plugins are
    cached by name within a process)."""
    mod = f"tcli_test_weighted_{tmp_path.name.replace('-', '_')}"
    (tmp_path / f"{mod}.py").write_text(PLUGIN)
    env = {"PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO)]), "OMP_NUM_THREADS": "1"}
    return mod, env, tmp_path


def _records(texts) -> bytes:
    return b"".join(orjson.dumps({"prompt_id": "p", "sample_id": i, "text": t, "answer": "4"})
                    + b"\n" for i, t in enumerate(texts))


def _verify(plugin, texts, *flags):
    """`tcli verify` of ``texts`` into a file: (process, records or None)."""
    _, env, tmp = plugin
    src, out = tmp / "in.jsonl", tmp / "out.jsonl"
    src.write_bytes(_records(texts))
    out.unlink(missing_ok=True)
    p = run_tcli(["verify", str(src), "-o", str(out), "-q", *flags], env=env)
    recs = [orjson.loads(x) for x in out.read_bytes().splitlines()] if out.exists() else None
    return p, recs


@pytest.mark.parametrize("workers", ["0", "1"])
def test_weighted_sum_and_each_verifier_by_name_match_the_hand_oracle(plugin, workers):
    mod = plugin[0]
    names = {"gsm8k": "gsm8k", "math": "math", "marker": f"python:{mod}:marker"}
    p, recs = _verify(plugin, TEXTS, "-t", "gsm8k", "-t", "math", "-t", names["marker"],
                      "--weights", "1,0.25,0.5", "-j", workers)
    assert p.returncode == 0, p.stderr.decode()
    for i, r in enumerate(recs):
        assert r["rewards"] == {names[k]: ORACLE[k][i] for k in ORACLE}  # in task order
        assert list(r["rewards"]) == list(names.values())
        assert r["reward"] == sum(WEIGHTS[k] * ORACLE[k][i] for k in ORACLE)
        assert list(r["verdicts"]) == list(names.values())
        assert [v["task"] for v in r["verdicts"].values()] == list(names.values())
        assert r["verdict"] == r["verdicts"]["gsm8k"]  # the first task's
        assert r["verdicts"][names["marker"]]["marker"] == ("####" in TEXTS[i])
    assert [r["reward"] for r in recs] == [1.75, 0.75, 1.5, 0.0]


def test_one_task_writes_the_records_it_always_wrote(plugin):
    """No `rewards`/`verdicts` with one task, whatever else is given; a record scored by several
    tasks and verified again with one loses them (derived fields are never kept stale)."""
    _, env, tmp = plugin
    for flags in ([], ["--weights", "1"], ["-j", "0"]):
        p, _ = _verify(plugin, TEXTS, "-t", "gsm8k", *flags)
        assert p.returncode == 0 and (tmp / "out.jsonl").read_bytes() == ONE_TASK, flags
    p, _ = _verify(plugin, TEXTS, "-t", "gsm8k", "-t", "arith")
    several = (tmp / "out.jsonl").read_bytes()
    assert p.returncode == 0 and b'"rewards"' in several
    p = run_tcli(["verify", "-t", "gsm8k", "-q"], input=several, env=env)
    assert p.returncode == 0 and p.stdout == ONE_TASK


def test_one_task_with_a_weight_scales_its_reward(plugin):
    """A weight given to a single task still applies: reward = weight x the verifier's reward,
    and `rewards` keeps the unweighted one (whether the answer was right: eval's accuracy reads
    it); no `verdicts`, `verdict` is that task's."""
    p, recs = _verify(plugin, TEXTS, "-t", "gsm8k", "--weights", "0.5")
    assert p.returncode == 0, p.stderr.decode()
    # 0.5 x ORACLE["gsm8k"] = 0.5 x [1, 0, 1, 0]; exact in binary
    assert [r["reward"] for r in recs] == [0.5, 0.0, 0.5, 0.0]
    assert [r["rewards"] for r in recs] == [{"gsm8k": x} for x in (1.0, 0.0, 1.0, 0.0)]
    assert not any("verdicts" in r for r in recs)
    assert [r["verdict"]["correct"] for r in recs] == [True, False, True, False]


@pytest.mark.parametrize("flags, words", [
    (["-t", "gsm8k", "-t", "math", "--weights", "1"], "needs one weight per task (2: gsm8k, math)"),
    (["-t", "gsm8k", "--weights", "1,1"], "needs one weight per task (1: gsm8k), got 2"),
    (["-t", "gsm8k", "-t", "math", "--weights", "1,nan"], "must be a finite number, got nan"),
    (["-t", "gsm8k", "-t", "math", "--weights", "1,x"], "must be a number or a list of them"),
    (["-t", "gsm8k", "-t", "gsm8k"], "names a verifier twice"),
    (["-t", "gsm8k", "-t", "nosuch"], "unknown task 'nosuch'")])
def test_bad_tasks_or_weights_are_usage_errors_before_any_output(plugin, flags, words):
    p, recs = _verify(plugin, TEXTS, *flags)
    assert p.returncode == 2 and recs is None, p.stderr
    assert words in p.stderr.decode(), p.stderr


def test_crashes_count_per_verifier(plugin):
    """max-verifier-errors applies to each verifier's share; the other verifiers' results stay."""
    crashy = f"python:{plugin[0]}:crashy"
    texts = ["#### 4", "#### 4 boom", "#### 5", "#### 4"]
    p, recs = _verify(plugin, texts, "-t", "gsm8k", "-t", crashy, "--max-verifier-errors", "0.3")
    assert p.returncode == 0, p.stderr.decode()
    assert [r["rewards"]["gsm8k"] for r in recs] == [1.0, 1.0, 0.0, 1.0]
    crashed = [r["verdicts"][crashy].get("crashed", False) for r in recs]
    assert crashed == [False, True, False, False]
    assert [r["reward"] for r in recs] == [2.0, 1.0, 1.0, 2.0]
    assert f"verifier {crashy} crashed at" in p.stderr.decode()
    p, recs = _verify(plugin, texts[:2] + ["boom"] * 2, "-t", "gsm8k", "-t", crashy,
                      "--max-verifier-errors", "0.3")
    assert p.returncode == 1 and recs is None
    assert f"verifier {crashy} crashed on 3 of 4 answers (75.0%" in p.stderr.decode()
    p, _ = _verify(plugin, texts, "-t", "gsm8k", "-t", crashy)  # default 0: the first stops
    assert p.returncode == 1 and "allows none" in p.stderr.decode()


def test_a_verifier_exiting_or_overrunning_in_a_worker_fails_only_itself(plugin):
    mod = plugin[0]
    texts = ["#### 4", "#### 4 boom", "#### 4 slow", "#### 5"]
    p, recs = _verify(plugin, texts, "-t", "gsm8k", "-t", f"python:{mod}:exits", "-t",
                      f"python:{mod}:slow", "-j", "1", "--timeout", "2",
                      "--max-verifier-errors", "0.5")
    assert p.returncode == 0, p.stderr.decode()
    assert [r["rewards"]["gsm8k"] for r in recs] == [1.0, 1.0, 1.0, 0.0]
    exited = recs[1]["verdicts"][f"python:{mod}:exits"]
    assert exited["crashed"] is True and "os._exit(4)" in exited["error"]
    slow = recs[2]["verdicts"][f"python:{mod}:slow"]
    assert slow["error"] == "timeout" and recs[2]["rewards"][f"python:{mod}:slow"] == 0.0
    assert recs[2]["rewards"][f"python:{mod}:exits"] == 1.0


def test_one_worker_pass_runs_every_verifier_of_a_record(plugin):
    mod = plugin[0]
    a, b = f"python:{mod}:pid", f"python:{mod}:pid_too"
    p, recs = _verify(plugin, [f"#### {i}" for i in range(40)], "-t", a, "-t", b, "-j", "2")
    assert p.returncode == 0, p.stderr.decode()
    assert all(r["verdicts"][a]["pid"] == r["verdicts"][b]["pid"] != os.getpid() for r in recs)


def test_the_loop_file_takes_lists_and_logs_each_verifiers_mean(plugin, loop_model, tmp_path,
                                                                monkeypatch):
    """`[verify] task = [...]`, `weights = [...]`: the rollouts carry rewards by name, reward_mean
    is the weighted mean and `rewards/<task>` each task's (hand-computed from the scripted
    engine's CORRECT table)."""
    from tcli.config.loop import dump_toml, load_config
    from tcli.io import RecordReader
    from tcli.loop import run_loop

    mod, _, tmp = plugin
    monkeypatch.syspath_prepend(str(tmp))
    const = f"python:{mod}:const"
    cfg_file = tmp / "run.toml"
    cfg_file.write_text(f'[verify]\ntask = ["arith", "{const}"]\nweights = [1, 0.5]\n')
    cfg = load_config(str(cfg_file))
    assert cfg.verify.task == ("arith", const) and cfg.verify.weights == (1.0, 0.5)
    assert load_config(None, {"task": ["arith", const], "weights": ["1,0.5"]}).verify == cfg.verify
    again = tmp / "again.toml"
    again.write_text(dump_toml(cfg))
    assert load_config(str(again)).verify == cfg.verify
    one = load_config(None, {"task": ["arith"]})
    assert one.verify.task == ("arith",) and 'task = "arith"' in dump_toml(one)

    cfg = loop_config(loop_model, tmp_path / "run", task=["arith", const], weights=["1,0.5"],
                      steps=2, eval_every=0)
    run_loop(cfg, log=lambda s: None)
    train = [m for m in read_metrics(tmp_path / "run") if m["kind"] == "train"]
    for m, v in zip(train, range(2)):
        arith = sum(CORRECT[v]) / (N * len(CORRECT[v]))
        assert m["rewards/arith"] == arith and m[f"rewards/{const}"] == 1.0
        assert m["reward_mean"] == pytest.approx(arith + 0.5, rel=1e-12)
    recs = [r for _, r in RecordReader(str(tmp_path / "run" / "rollouts" / "step_1.arrow"))]
    assert all(r["reward"] == r["rewards"]["arith"] + 0.5 for r in recs)


def test_the_loop_refuses_weights_that_do_not_fit_before_touching_disk(tmp_path):
    cfg = tmp_path / "run.toml"
    run = tmp_path / "run"
    cfg.write_text(f'model = "m"\ntrain_data = "d"\nrun_dir = "{run}"\n'
                   '[verify]\ntask = ["gsm8k", "math"]\nweights = [1.0]\n')
    p = run_tcli(["loop", "--config", str(cfg)])
    assert p.returncode == 2 and not run.exists()
    assert "--weights (verify.weights) needs one weight per task" in p.stderr.decode()
