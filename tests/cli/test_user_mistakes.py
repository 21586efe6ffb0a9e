"""What a new user runs into: results that look valid but are not, and papercuts.

A checkpoint records the prompt template, chat-template choice and response cap it was trained
with, and eval / sample-tree / loop use them unless told otherwise; mistakes (a hub name offline,
``--limit 0``, a CSV file, a record without ``id``, ``-o`` = ``-m``, an empty show-tree input,
``tcli loop`` without settings) fail fast with one line; checkpoints follow the umask; greedy
records say temperature 0; long commands print progress lines into a log.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time

import orjson
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from conftest import arith_run_dir, run_tcli  # noqa: E402
from examples.arith.task import make_prompts  # noqa: E402

TINY = dict(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128)
CAP = 6  # the response cap the warm start records


def _tcli(args, timeout: float = 300, **env):
    return run_tcli([str(a) for a in args], timeout=timeout,
                    env={"OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT, **env})


def _records(path) -> list[dict]:
    return [orjson.loads(line) for line in open(path, "rb") if line.strip()]


def _state(ckpt) -> dict:
    return json.load(open(os.path.join(ckpt, "tcli_state.json")))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A prompt file, a random tiny model and its one-step SFT warm start (which records plain
    prompts, no chat template and max_new_tokens = CAP)."""
    from tcli.sft import sft

    prompts = make_prompts(4, seed=5, split="test")
    d, model = arith_run_dir(tmp_path_factory, "mistakes", {"test.jsonl": prompts}, **TINY)
    warm = str(d / "warm")
    sft(model, [(p["prompt"], p["answer"]) for p in prompts], warm, steps=1,
        max_new_tokens=CAP)
    return d, model, warm


# ----------------------------------------------------------------------------- recorded sampling

def test_the_warm_start_records_how_it_was_trained(setup):
    _, _, warm = setup
    assert _state(warm)["sampling"] == {"prompt_template": "plain", "chat_template": False,
                                        "max_new_tokens": CAP}


def _plain(rec: dict) -> bool:
    """The char-level prompt was encoded as it is (no template around it)."""
    return rec["prompt_template"] == "plain" and len(rec["prompt_token_ids"]) == len(rec["prompt"])


def test_eval_uses_the_checkpoint_recorded_sampling_and_says_so(setup, tmp_path):
    d, _, warm = setup
    out = tmp_path / "eval.jsonl"
    p = _tcli(["eval", "-m", warm, "-d", d / "test.jsonl", "-o", out])
    assert p.returncode == 0, p.stderr.decode()
    err = p.stderr.decode()
    notes = [ln for ln in err.splitlines() if "using the checkpoint's" in ln]
    assert notes == ["tcli: using the checkpoint's prompt_template=plain, chat_template=false, "
                     f"max_new_tokens={CAP} (give --prompt-template/--[no-]chat-template/"
                     "--max-new-tokens to override)"], err
    recs = _records(out)
    assert len(recs) == 4 and all(_plain(r) for r in recs)
    assert all(len(r["token_ids"]) <= CAP for r in recs)


def test_explicit_flags_win_over_the_checkpoint(setup, tmp_path):
    d, _, warm = setup
    out = tmp_path / "eval.jsonl"
    p = _tcli(["eval", "-m", warm, "-d", d / "test.jsonl", "-o", out, "--limit", "2",
               "--prompt-template", "boxed", "--max-new-tokens", "9"])
    assert p.returncode == 0, p.stderr.decode()
    assert "using the checkpoint's chat_template=false (give --[no-]chat-template to " \
        "override)" in p.stderr.decode()  # the one recorded setting not given
    recs = _records(out)
    assert all(r["prompt_template"] == "boxed" for r in recs)
    assert all(len(r["prompt_token_ids"]) > len(r["prompt"]) for r in recs)
    assert max(len(r["token_ids"]) for r in recs) <= 9
    # one flag given: the other recorded setting is still the checkpoint's
    p = _tcli(["eval", "-m", warm, "-d", d / "test.jsonl", "-o", out, "--limit", "2",
               "--max-new-tokens", "9"])
    assert p.returncode == 0, p.stderr.decode()
    assert "using the checkpoint's prompt_template=plain, chat_template=false (give " in \
        p.stderr.decode()
    assert all(_plain(r) for r in _records(out))


def test_sample_tree_uses_the_checkpoint_recorded_sampling(setup, tmp_path):
    d, _, warm = setup
    out = tmp_path / "rollouts.jsonl"
    p = _tcli(["sample-tree", d / "test.jsonl", "-m", warm, "-n", "2", "-o", out])
    assert p.returncode == 0, p.stderr.decode()
    assert "using the checkpoint's prompt_template=plain" in p.stderr.decode()
    recs = _records(out)
    assert len(recs) == 8 and all(_plain(r) and len(r["token_ids"]) <= CAP for r in recs)


def test_a_recorded_template_that_would_hide_the_options_is_refused(setup, tmp_path):
    """The warm start records plain prompts; medqa's options live in ``choices``, which plain
    never shows: the model would answer blind while the choice verifier scores it."""
    _, _, warm = setup
    out = tmp_path / "eval.jsonl"
    p = _tcli(["eval", "-m", warm, "-d", "medqa", "-o", out, "--limit", "1"])
    err = p.stderr.decode()
    assert p.returncode == 2, err
    assert "using the checkpoint's prompt_template=plain" in err
    assert re.search(r"tcli: error: prompt .* has choices, but the prompt template \(plain\) "
                     r"does not show them: give --prompt-template choice", err), err
    assert not out.exists()
    p = _tcli(["eval", "-m", warm, "-d", "medqa", "-o", out, "--limit", "1",
               "--prompt-template", "choice", "--max-new-tokens", "2"])
    assert p.returncode == 0, p.stderr.decode()
    assert _records(out)[0]["prompt_template"] == "choice"


def test_prompts_the_tokenizer_cannot_read_are_said_once(setup, tmp_path):
    """An arith-alphabet model given English prompts: most characters are its unknown token, and
    the rewards would be 0 as if the model were weak."""
    d, model, _ = setup
    words = tmp_path / "words.jsonl"
    words.write_text("".join(f'{{"id": {i}, "prompt": "What is {i} plus two?", "answer": "1"}}\n'
                             for i in range(3)))
    p = _tcli(["sample-tree", words, "-m", model, "-n", "1", "--max-new-tokens", "2",
               "--prompt-template", "plain"])
    assert p.returncode == 0, p.stderr.decode()
    said = [line for line in p.stderr.decode().splitlines() if "unknown tokens" in line]
    assert len(said) == 1 and re.match(r"tcli: warning: prompt 0 is \d+% unknown tokens", said[0])
    p = _tcli(["sample-tree", d / "test.jsonl", "-m", model, "-n", "1", "--max-new-tokens", "2",
               "--prompt-template", "plain"])
    assert p.returncode == 0 and b"unknown tokens" not in p.stderr


@pytest.mark.parametrize("flags,words", [
    (["--mode", "tree", "-n", "4"], "--n sets the samples per prompt of --mode independent"),
    (["--width", "4", "--depth", "2"], "--width, --depth shape a tree, but --mode is independent, "
                                       "which ignores them: give --mode tree as well, or leave "
                                       "them out"),
    (["--branch", "entropy"], "--branch shapes a tree"),
])
def test_a_shape_flag_of_the_other_mode_is_refused(setup, flags, words):
    """It would be ignored: 8 independent samples instead of the tree asked for, or the other
    way round. Refused before anything is read or loaded."""
    d, model, _ = setup
    p = _tcli(["sample-tree", d / "test.jsonl", "-m", model, *flags])
    err = p.stderr.decode()
    assert p.returncode == 2 and p.stdout == b"", err
    assert err.startswith("tcli: error: ") and words in err, err


def test_min_new_tokens_above_the_cap_is_refused(setup):
    """EOS could never be drawn: every response would run to the cap, unlike what was asked."""
    d, model, _ = setup
    p = _tcli(["sample-tree", d / "test.jsonl", "-m", model, "--min-new-tokens", "9",
               "--max-new-tokens", "8"])
    assert p.returncode == 2 and p.stdout == b"", p.stderr.decode()
    assert b"--min-new-tokens (sample.min_new_tokens) 9 is above --max-new-tokens" in p.stderr


def test_a_model_without_records_keeps_the_defaults(setup, tmp_path):
    d, model, _ = setup
    out = tmp_path / "eval.jsonl"
    p = _tcli(["eval", "-m", model, "-d", d / "test.jsonl", "-o", out, "--limit", "1",
               "--max-new-tokens", "3"])
    assert p.returncode == 0, p.stderr.decode()
    assert b"using the checkpoint's" not in p.stderr
    assert _records(out)[0]["prompt_template"] == "boxed"  # auto, for a record without choices


def test_a_loop_toml_key_wins_and_unset_keys_come_from_the_checkpoint(setup, tmp_path):
    from tcli.config.loop import load_config
    from tcli.models.recorded import with_recorded_sampling

    _, _, warm = setup
    cfg_file = tmp_path / "run.toml"
    cfg_file.write_text(f'model = "{warm}"\n[sample]\nmax_new_tokens = 9\n')
    logged: list[str] = []
    cfg = with_recorded_sampling(load_config(str(cfg_file), {"chat_template": True}), logged.append)
    assert (cfg.sample.prompt_template, cfg.sample.max_new_tokens) == ("plain", 9)
    assert cfg.sample.chat_template is True
    assert logged == ["using the checkpoint's prompt_template=plain (give --prompt-template or "
                      "[sample] keys in --config to override)"]  # the others were given


def test_a_bad_recorded_value_is_bad_data_naming_the_file(setup, tmp_path):
    import shutil

    d, _, warm = setup
    bad = tmp_path / "bad"
    shutil.copytree(warm, bad)
    state = _state(bad)
    state["sampling"]["max_new_tokens"] = 0
    (bad / "tcli_state.json").write_text(json.dumps(state))
    p = _tcli(["eval", "-m", bad, "-d", d / "test.jsonl"])
    err = p.stderr.decode()
    assert p.returncode == 65 and "tcli_state.json" in err and "sampling" in err, err


def test_loop_uses_records_them_and_logs_progress(setup, tmp_path):
    d, _, warm = setup
    run = tmp_path / "run"
    p = _tcli(["loop", "--model", warm, "--train-data", d / "test.jsonl", "--eval-data",
               d / "test.jsonl", "--run-dir", run, "--steps", "2", "--prompts-per-step", "2",
               "--n", "2", "--eval-every", "1", "--eval-limit", "2", "--task", "arith",
               "--lr", "1e-4"], timeout=600, TCLI_PROGRESS_SECONDS="0")
    err = p.stderr.decode()
    assert p.returncode == 0, err
    assert "using the checkpoint's prompt_template=plain, chat_template=false, " \
        f"max_new_tokens={CAP}" in err
    toml = (run / "config.toml").read_text()
    assert 'prompt_template = "plain"' in toml and f"max_new_tokens = {CAP}" in toml
    assert "chat_template = false" in toml
    states = [_state(os.path.join(root)) for root, _, files in os.walk(run / "checkpoints")
              if "tcli_state.json" in files]
    assert states and all(s["sampling"]["max_new_tokens"] == CAP for s in states)
    progress = [ln for ln in err.splitlines() if ln.startswith("loop: ")]
    assert re.match(r"loop: 1/2 steps \(50%\), .*ETA \w+, last eval acc \d\.\d{3} \(step 1\)$",
                    progress[0]), progress
    assert progress[-1].startswith("loop: done 2/2 steps"), progress
    p = _tcli(["loop", "--model", warm, "--train-data", d / "test.jsonl", "--run-dir", run])
    assert p.returncode == 2  # the same command again: the error line alone, no notice before it
    assert p.stderr.decode().startswith("tcli: error: ") and "--resume" in p.stderr.decode()


def _advantaged(setup, tmp_path):
    """Advantaged rollouts of the warm start (sample-tree | verify | advantages -e grpo)."""
    d, _, warm = setup
    files = [tmp_path / f"{n}.jsonl" for n in ("r", "v", "a")]
    steps = [["sample-tree", d / "test.jsonl", "-m", warm, "-n", "2", "--temperature", "1"],
             ["verify", files[0], "--task", "arith"], ["advantages", files[1], "-e", "grpo"]]
    for args, out in zip(steps, files):
        p = _tcli([*args, "-o", out])
        assert p.returncode == 0, p.stderr.decode()
    return files[-1]


def test_train_step_carries_the_records_forward_and_refuses_its_own_input(setup, tmp_path):
    _, _, warm = setup
    data = _advantaged(setup, tmp_path)
    out = tmp_path / "next"
    p = _tcli(["train-step", data, "-m", warm, "-o", out, "--max-new-tokens", "7"])
    assert p.returncode == 0, p.stderr.decode()
    assert _state(out)["sampling"] == {"prompt_template": "plain", "chat_template": False,
                                       "max_new_tokens": 7}
    before = os.stat(out / "model.safetensors").st_mtime_ns
    p = _tcli(["train-step", data, "-m", out, "-o", str(out) + "/"])
    assert p.returncode == 2, p.stderr.decode()
    assert "is the input checkpoint" in p.stderr.decode()
    assert os.stat(out / "model.safetensors").st_mtime_ns == before
    p = _tcli(["train-step", data, "-m", out, "-o", out, "--overwrite-model"])
    assert p.returncode == 0, p.stderr.decode()  # asked for: replaced whole, in place
    assert os.stat(out / "model.safetensors").st_mtime_ns != before
    # no flag: what the records were sampled with (the warm start's cap) wins over the start's 7
    assert _state(out)["sampling"]["max_new_tokens"] == CAP


# ----------------------------------------------------------------------------- papercuts

@pytest.mark.parametrize("cmd", ["eval", "sample-tree"])
def test_a_hub_name_offline_fails_at_once(setup, cmd):
    d, _, _ = setup
    args = ["-d", d / "test.jsonl"] if cmd == "eval" else [d / "test.jsonl"]
    t0 = time.monotonic()
    p = _tcli([cmd, *args, "--model", "someone/no-such-model-here"],
              HF_HUB_OFFLINE="0")
    err = p.stderr.decode()
    assert p.returncode == 2 and len(err.splitlines()) == 1, err
    assert "someone/no-such-model-here" in err and "TCLI_ALLOW_DOWNLOADS=1" in err
    assert time.monotonic() - t0 < 30


def test_limit_zero_is_a_usage_error_in_both_commands(setup, tmp_path):
    d, _, warm = setup
    for args in (["eval", "-m", warm, "-d", d / "test.jsonl"],
                 ["sample-tree", d / "test.jsonl", "-m", warm, "-o", tmp_path / "x.jsonl"]):
        p = _tcli([*args, "--limit", "0"])
        assert p.returncode == 2 and b"--limit" in p.stderr, p.stderr.decode()
    assert not (tmp_path / "x.jsonl").exists()
    for cmd in ("eval", "sample-tree"):
        assert "default: all" in _tcli([cmd, "--help"]).stdout.decode()


@pytest.mark.parametrize("cmd", ["eval", "sample-tree"])
def test_csv_input_says_csv_is_not_read(setup, tmp_path, cmd):
    _, _, warm = setup
    csv = tmp_path / "prompts.csv"
    csv.write_text("id,prompt,answer\n1,2+2=?,4\n")
    args = ["-d", csv] if cmd == "eval" else [csv]
    p = _tcli([cmd, *args, "-m", warm])
    err = p.stderr.decode()
    assert p.returncode == 65 and f"{csv}:1:" in err and "CSV" in err, err
    assert "JSONL" in err and "Parquet" in err


@pytest.mark.parametrize("cmd", ["eval", "sample-tree"])
def test_a_record_without_id_suggests_id_field(setup, tmp_path, cmd):
    _, _, warm = setup
    f = tmp_path / "p.jsonl"
    f.write_text(json.dumps({"qid": "a", "prompt": "1+1=?\n", "answer": "2"}) + "\n")
    args = ["-d", f] if cmd == "eval" else [f]
    p = _tcli([cmd, *args, "-m", warm])
    err = p.stderr.decode()
    assert p.returncode == 65 and "field 'id'" in err and "--id-field" in err and "qid" in err, err


@pytest.mark.parametrize("umask,dirs,files", [(0o022, 0o755, 0o644), (0o027, 0o750, 0o640)])
def test_checkpoints_follow_the_umask(tmp_path, umask, dirs, files):
    from tcli.models.tiny import init_tiny_model

    old = os.umask(umask)
    try:
        out = init_tiny_model(str(tmp_path / "m"), **TINY)
    finally:
        os.umask(old)
    assert os.stat(out).st_mode & 0o777 == dirs
    modes = {n: os.stat(os.path.join(out, n)).st_mode & 0o777 for n in os.listdir(out)}
    assert "model.safetensors" in modes and set(modes.values()) == {files}, modes


def test_greedy_records_say_temperature_zero(setup, tmp_path):
    d, _, warm = setup
    out = tmp_path / "eval.jsonl"
    p = _tcli(["eval", "-m", warm, "-d", d / "test.jsonl", "--limit", "1", "-o", out])
    assert p.returncode == 0, p.stderr.decode()
    assert [r["temperature"] for r in _records(out)] == [0.0]


def test_loop_without_settings_names_what_is_missing(setup, tmp_path):
    _, _, warm = setup
    run = tmp_path / "run"
    p = _tcli(["loop", "--run-dir", run])
    assert p.returncode == 2 and "no model: give --model or `model = ...`" in p.stderr.decode()
    p = _tcli(["loop", "--run-dir", run, "--model", warm])
    assert p.returncode == 2 and "no train_data: give --train-data" in p.stderr.decode()
    assert not run.exists()


def test_show_tree_on_an_empty_file_says_it_is_empty(tmp_path):
    f = tmp_path / "empty.jsonl"
    f.write_bytes(b"")
    p = _tcli(["show-tree", f])
    err = p.stderr.decode()
    assert p.returncode == 2 and f"{f} holds no records: no group to show" in err, err


# ----------------------------------------------------------------------------- progress in logs

def _lines(err: bytes, label: str) -> list[str]:
    return [ln for ln in err.decode().splitlines() if ln.startswith(label + ": ")]


def test_sample_tree_eval_and_verify_log_progress_lines(setup, tmp_path):
    d, _, warm = setup
    out = tmp_path / "r.jsonl"
    p = _tcli(["sample-tree", d / "test.jsonl", "-m", warm, "-n", "2", "-o", out,
               "--prompts-per-batch", "1"], TCLI_PROGRESS_SECONDS="0")
    lines = _lines(p.stderr, "sample-tree")
    assert p.returncode == 0 and len(lines) == 5, p.stderr.decode()
    assert re.match(r"sample-tree: 1/4 prompts \(25%\), [\d.]+ prompts/s, \d+ tok/s, "
                    r"elapsed \w+, ETA \w+$", lines[0]), lines
    assert lines[-1].startswith("sample-tree: done 4/4 prompts")
    p = _tcli(["verify", out, "--task", "arith", "-o", tmp_path / "v.jsonl"],
              TCLI_PROGRESS_SECONDS="0")
    lines = _lines(p.stderr, "verify")
    assert p.returncode == 0 and lines[0].startswith("verify: 1/8 records"), p.stderr.decode()
    assert re.match(r"verify: done 8/8 records, .*mean reward [\d.]+$", lines[-1]), lines
    p = _tcli(["eval", "-m", warm, "-d", d / "test.jsonl"], TCLI_PROGRESS_SECONDS="0")
    lines = _lines(p.stderr, "eval")
    assert p.returncode == 0 and lines[0].startswith("eval: 1/4 prompts"), p.stderr.decode()


def test_progress_lines_come_at_a_bounded_rate(setup, tmp_path):
    d, _, warm = setup
    p = _tcli(["sample-tree", d / "test.jsonl", "-m", warm, "-n", "2", "--prompts-per-batch",
               "1", "-o", tmp_path / "r.jsonl"], TCLI_PROGRESS_SECONDS="3600")
    assert p.returncode == 0, p.stderr.decode()
    assert _lines(p.stderr, "sample-tree") == []  # a job shorter than the interval: silent
    p = _tcli(["sample-tree", d / "test.jsonl", "-m", warm, "-q", "-o", tmp_path / "q.jsonl"],
              TCLI_PROGRESS_SECONDS="0")
    assert p.returncode == 0 and p.stderr == b"", p.stderr.decode()


def test_line_progress_counts_rate_and_eta():
    from tcli.progress import LineProgress, duration

    now = [0.0]
    out: list[str] = []
    pr = LineProgress("job", 10, "items", interval=10, write=out.append, clock=lambda: now[0])
    for _ in range(4):
        now[0] += 3
        pr.advance(tokens=30)
    assert out == ["job: 4/10 items (40%), 0.33 items/s, 10 tok/s, elapsed 12s, ETA 18s"]
    pr.finish()
    assert out[-1] == "job: done 4/10 items, 0.33 items/s, 10 tok/s, elapsed 12s"
    quick = LineProgress("quick", 2, interval=10, write=out.append, clock=lambda: now[0])
    quick.advance(2)
    quick.finish()
    assert len(out) == 2  # done within the interval: no line at all
    assert (duration(59), duration(380), duration(7500)) == ("59s", "6m20s", "2h05m")
    one = LineProgress("one", interval=0, write=out.append, clock=lambda: now[0])
    one.advance()
    assert out[-1].startswith("one: 1 prompt, ")  # not "1 prompts"


def test_train_step_records_what_its_rollouts_were_sampled_with(setup, tmp_path):
    """A model with nothing recorded, trained on plain rollouts of at most 5 tokens, records
    them (so eval then samples it as trained); a flag wins; records that disagree record
    nothing for that setting."""
    d, model, _ = setup
    rollouts = tmp_path / "rollouts.jsonl"
    p = _tcli(["sample-tree", d / "test.jsonl", "-m", model, "-n", "2", "-o", rollouts,
               "--prompt-template", "plain", "--max-new-tokens", "5"])
    assert p.returncode == 0, p.stderr.decode()
    recs = _records(rollouts)
    for r in recs:
        r["advantages"] = [0.5] * len(r["token_ids"])
    adv = tmp_path / "adv.jsonl"
    adv.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in recs))
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_bytes(b"".join(orjson.dumps({**r, "max_new_tokens": 5 + i % 2}) + b"\n"
                               for i, r in enumerate(recs)))
    for name, src, flags, want in (
            ("rec", adv, [], {"prompt_template": "plain", "max_new_tokens": 5}),
            ("flag", adv, ["--max-new-tokens", "7"], {"prompt_template": "plain",
                                                      "max_new_tokens": 7}),
            ("mixed", mixed, [], {"prompt_template": "plain"})):
        out = tmp_path / name
        p = _tcli(["train-step", src, "-m", model, "-o", out, *flags])
        assert p.returncode == 0, p.stderr.decode()
        assert _state(out).get("sampling") == want, name
    p = _tcli(["eval", "-m", tmp_path / "rec", "-d", d / "test.jsonl", "-o", tmp_path / "e.jsonl",
               "--limit", "1"])
    assert p.returncode == 0 and "using the checkpoint's prompt_template=plain" in \
        p.stderr.decode(), p.stderr.decode()
