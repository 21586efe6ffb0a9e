"""`tcli loop` with [eval] settings but no eval_data: refused (exit 2, the settings and eval_data
named) rather than ignored, before the run directory or a model is touched; every = 0, which asks
for no evaluation, is no conflict."""

from __future__ import annotations

import pytest

from conftest import failed, run_tcli
from tcli.config.loop import load_config
from tcli.errors import UsageError


def test_an_eval_flag_without_eval_data_is_refused(tmp_path):
    run = tmp_path / "run"
    r = run_tcli(["loop", "--model", tmp_path, "--train-data", tmp_path / "t.jsonl",
                  "--run-dir", run, "--eval-limit", "3"])
    failed(r, 2, "--eval-limit (eval.limit) is set", "eval_data", "never evaluates")
    assert not run.exists()


def test_eval_keys_in_a_toml_file_name_the_file(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text(f'model = "{tmp_path}"\ntrain_data = "t.jsonl"\n[eval]\nlimit = 3\n'
                    'every = 2\n')
    r = run_tcli(["loop", "-c", toml, "--run-dir", tmp_path / "run", "--eval-n", "2",
                  "--eval-temperature", "1"])
    line = failed(r, 2, "are set", "eval_data")
    for key in ("eval.limit", "eval.every", "eval.n", "eval.temperature"):
        assert key in line, line
    assert f"{toml}: --eval-limit" in line


@pytest.mark.parametrize("flags", [{}, {"eval_every": 0}])
def test_no_eval_data_with_default_or_no_evaluation_is_fine(flags):
    load_config(None, {"model": "m", "train_data": "t", **flags}).check_eval_used()


def test_eval_data_with_eval_settings_is_fine():
    load_config(None, {"model": "m", "train_data": "t", "eval_data": "e",
                       "eval_limit": 3}).check_eval_used()
    with pytest.raises(UsageError, match=r"--eval-limit \(eval.limit\) is set"):
        load_config(None, {"model": "m", "train_data": "t", "eval_limit": 3}).check_eval_used()
