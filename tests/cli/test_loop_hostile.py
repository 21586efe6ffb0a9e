"""Hostile input to `tcli loop` before it runs: every table of a loop TOML file with a wrong type,
an unknown key, a key in the wrong table, a missing file or conflicting settings exits 2 with one
line naming the key and the TOML file, before the run directory exists."""

from __future__ import annotations

import pytest

from conftest import run_tcli

TOP = 'model = "{model}"\ntrain_data = "{data}"\nrun_dir = "{run}"\nsteps = 1\n'

CASES = [  # (id, TOML after the top-level lines, what the error names)
    ("top wrong type", 'prompts_per_step = "four"\n',
     "--prompts-per-step (prompts_per_step) must be an integer"),
    ("top float for int", "seed = 1.5\n", "--seed (seed) must be an integer"),
    ("top unknown", "stepz = 3\n",
     "unknown config key 'stepz' in the top level; did you mean steps?"),
    ("top from [sample]", "temperature = 0.5\n",
     "'temperature' in the top level; it belongs in [sample]"),
    ("top a table as a value", "sample = 3\n", "unknown config key 'sample' in the top level"),
    ("top bad value", "keep_last = 0\n", "--keep-last (keep_last) must be >= 1"),
    ("[sample] wrong type", '[sample]\nn = "four"\n', "--n (sample.n) must be an integer"),
    ("[sample] array", "[sample]\nn = [1, 2]\n", "--n (sample.n) must be an integer, got [1, 2]"),
    ("[sample] unknown", "[sample]\nnn = 4\n", "'nn' in [sample]; did you mean n?"),
    ("[sample] from [train]", "[sample]\nlr = 0.1\n", "'lr' in [sample]; it belongs in [train]"),
    ("[sample] run key", "[sample]\nsteps = 3\n", "'steps' in [sample]; it belongs in top level"),
    ("[sample] nested table", "[sample.x]\ny = 1\n", "unknown config key 'x' in [sample]"),
    ("[verify] wrong type", '[verify]\ntimeout = "5"\n',
     "--timeout (verify.timeout) must be a number"),
    ("[verify] unknown", '[verify]\ntsk = "arith"\n', "'tsk' in [verify]; did you mean task?"),
    ("[verify] from [sample]", "[verify]\nn = 2\n", "'n' in [verify]; it belongs in [sample]"),
    ("[verify] unknown task", '[verify]\ntask = "nope"\n',
     "--task (verify.task) cannot be used: unknown task 'nope'"),
    ("[verify] missing plugin", '[verify]\ntask = "python:tcli_no_such_module:f"\n',
     "--task (verify.task) cannot be used: cannot import"),
    ("[advantages] wrong type", "[advantages]\nwhiten = 1\n",
     "--whiten (advantages.whiten) must be true or false"),
    ("[advantages] unknown", '[advantages]\nestimatr = "grpo"\n', "did you mean estimator?"),
    ("[advantages] from [train]", "[advantages]\nepochs = 2\n",
     "'epochs' in [advantages]; it belongs in [train]"),
    ("[advantages] bad name", '[advantages]\nestimator = "nope"\n',
     "--estimator (advantages.estimator): unknown value 'nope'"),
    ("[train] wrong type", '[train]\nlr = "1e-3"\n', "--lr (train.lr) must be a number"),
    ("[train] nan", "[train]\nlr = nan\n", "--lr (train.lr) must be a finite number"),
    ("[train] unknown", "[train]\nlearning_rate = 1e-3\n",
     "unknown config key 'learning_rate' in [train]"),
    ("[train] from [sample]", "[train]\ntemperature = 1.0\n",
     "'temperature' in [train]; it belongs in [sample]"),
    ("[eval] wrong type", "[eval]\nevery = true\n", "--eval-every (eval.every) must be an integer"),
    ("[eval] unknown", "[eval]\nevry = 2\n", "did you mean every?"),
    ("[eval] from [train]", "[eval]\nlr = 0.1\n", "'lr' in [eval]; it belongs in [train]"),
    ("[critic] wrong type", '[critic]\nlr = "x"\n', "--critic-lr (critic.lr) must be a number"),
    ("[prompts] wrong type", "[prompts]\nid_field = 3\n",
     "--id-field (prompts.id_field) must be a string"),
    ("unknown table", "[smaple]\nn = 3\n", "unknown table [smaple]"),
    ("repeated key", "steps = 2\n", "invalid TOML"),
    # conflicting settings
    ("treerpo without a tree", '[advantages]\nestimator = "treerpo"\n',
     '--estimator (advantages.estimator) "treerpo" needs tree-sampled groups'),
    ("a critic without a critic estimator", "[critic]\nlr = 1e-3\n",
     '--critic-lr (critic.lr) is set, but --estimator (advantages.estimator) "tempo" trains no '
     "critic (only gae, ppo do)"),
    ("kl without a reference", "[train]\nkl_coef = 0.1\n",
     "--kl-coef (train.kl_coef) > 0 needs --ref-model"),
    ("warm-up past the schedule", "[train]\nwarmup_steps = 10\nschedule_steps = 5\n",
     "--warmup-steps (train.warmup_steps) must be <= --schedule-steps"),
    ("pass@k above n", '[eval]\nn = 2\nk = "1,4"\n',
     "--eval-k (eval.k) values must be between 1 and n (2)"),
    ("greedy eval with n > 1", "[eval]\nn = 4\n",
     "--eval-n (eval.n) > 1 needs --eval-temperature (eval.temperature) > 0"),
    # files that do not exist
    ("missing eval_data", 'eval_data = "{d}/nope.jsonl"\n',
     "--eval-data (eval_data): prompt data '{d}/nope.jsonl' is neither an existing file"),
    ("missing ref_model", '[train]\nref_model = "{d}/no-ref"\n',
     "--ref-model (train.ref_model): model directory not found: {d}/no-ref"),
    ("missing critic model", '[advantages]\nestimator = "ppo"\n[critic]\nmodel = "{d}/no-critic"\n',
     "--critic-model (critic.model): model directory not found"),
]


def _write(loop_model, tmp_path, body: str, top: str = TOP):
    d, model = loop_model
    path = tmp_path / "run.toml"
    fill = dict(model=model, data=d / "prompts.jsonl", run=tmp_path / "run", d=tmp_path)
    path.write_text(top.format(**fill) + body.format(**fill))
    return path


@pytest.mark.parametrize("body,needle", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_loop_file_names_key_and_file_before_touching_disk(loop_model, tmp_path, body, needle):
    path = _write(loop_model, tmp_path, body)
    r = run_tcli(["loop", "--config", path, "-q"])
    err = r.stderr.decode()
    assert r.returncode == 2, err
    assert err.startswith(f"tcli: error: {path}: ") and err.count("\n") == 1, err
    assert needle.format(d=tmp_path) in err, err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("top,needle", [
    (TOP.replace("{data}", "{d}/nope.jsonl"), "--train-data (train_data): prompt data"),
    (TOP.replace("{model}", "{d}/no-model"), "--model (model): model directory not found"),
])
def test_missing_paths_at_the_top_name_key_and_file(loop_model, tmp_path, top, needle):
    path = _write(loop_model, tmp_path, "", top)
    r = run_tcli(["loop", "--config", path])
    err = r.stderr.decode()
    assert r.returncode == 2 and err.startswith(f"tcli: error: {path}: {needle}"), err
    assert not (tmp_path / "run").exists()


def test_a_flag_that_overrides_the_file_is_named_as_a_flag(loop_model, tmp_path):
    """The file is named only for what it set: a bad flag is the flag's fault."""
    path = _write(loop_model, tmp_path, "[sample]\nwidth = 2\n")
    r = run_tcli(["loop", "--config", path, "--width", "0"])
    assert r.returncode == 2
    assert r.stderr.decode() == "tcli: error: --width (sample.width) must be >= 1, got 0\n"
    r = run_tcli(["loop", "--config", path, "--train-data", tmp_path / "nope.jsonl"])
    assert r.returncode == 2 and r.stderr.decode().startswith(
        "tcli: error: --train-data (train_data): prompt data"), r.stderr
    assert not (tmp_path / "run").exists()


def test_config_and_resume_together_is_a_usage_error(loop_model, tmp_path):
    path = _write(loop_model, tmp_path, "")
    r = run_tcli(["loop", "--config", path, "--resume", tmp_path / "run"])
    assert r.returncode == 2 and "give --config or --resume, not both" in r.stderr.decode()
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("key,line,needle", [
    ("train_data", '{"id": "m", "messages": [{"role": "system", "content": "be brief"}, '
     '{"role": "user", "content": "2+2"}], "answer": "4"}', "field 'messages': a conversation"),
    ("eval_data", '{"id": "c", "prompt": "Pick", "answer": "A", "choices": "x, y"}',
     "field 'choices': must be an object"),
    ("train_data", '{"id": "long", "prompt": "' + "1+1=" * 300 + '", "answer": "2"}',
     "field 'prompt': 1270 prompt tokens + max_new_tokens 256 = 1526 exceed the model's 1024 "
     "positions"),
])
def test_a_prompt_sampling_cannot_encode_is_found_before_the_run_directory(
        loop_model, tmp_path, key, line, needle):
    """A record that reads but cannot be rendered for the model (a conversation without a chat
    template, options given as one string) exits 65 naming file and line, and leaves no run behind:
    the corrected command then starts a fresh run."""
    d, _ = loop_model
    bad = tmp_path / "bad.jsonl"
    good = (d / "prompts.jsonl").read_text()
    bad.write_text(good + line + "\n")
    lines = good.count("\n") + 1
    path = _write(loop_model, tmp_path, f'{key} = "{bad}"\n' if key == "eval_data" else "",
                  TOP.replace("{data}", str(bad)) if key == "train_data" else TOP)
    r = run_tcli(["loop", "--config", path, "-q"])
    err = r.stderr.decode()
    assert r.returncode == 65 and f"{bad}:{lines}: {needle}" in err, err
    assert not (tmp_path / "run").exists()
