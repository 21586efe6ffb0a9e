"""Settings are declared once: the stage commands, the loop's flags and its TOML tables agree, and
a bad value fails with exit 2 before anything touches disk, wherever it comes from."""

from __future__ import annotations

import dataclasses
import re

import pytest
import typer

from conftest import run_tcli
from tcli.config.loop import TABLES, RunOptions, config_fields, dump_toml, load_config, loop_flags
from tcli.config.spec import settings_of
from tcli.config.stages import (AdvantageOptions, EvalOptions, SampleOptions, TrainOptions,
                                VerifyOptions)
from tcli.errors import UsageError


def _commands():
    from tcli.cli import _register_commands, app

    _register_commands()
    return typer.main.get_command(app).commands


def _defaults(command) -> dict[str, object]:
    return {p.name: p.default for p in command.params}


STAGE_COMMANDS = {"sample-tree": [SampleOptions], "verify": [VerifyOptions],
                  "advantages": [AdvantageOptions], "train-step": [TrainOptions],
                  "eval": [EvalOptions, VerifyOptions]}


@pytest.mark.parametrize("name", sorted(STAGE_COMMANDS))
def test_stage_command_flags_are_the_options_fields(name):
    defaults = _defaults(_commands()[name])
    for cls in STAGE_COMMANDS[name]:
        for f in settings_of(cls):
            assert f.name in defaults, f"{name} lacks --{f.name}"
            assert defaults[f.name] == f.default, (name, f.name)


def test_eval_differs_from_sampling_only_where_eval_options_say_so():
    defaults = _defaults(_commands()["eval"])
    sample = {f.name: f.default for f in settings_of(SampleOptions)}
    own = {f.name for f in settings_of(EvalOptions)}
    for k, v in defaults.items():
        if k in sample and k not in own:
            assert v == sample[k], k
    assert defaults["temperature"] == 0.0 and defaults["n"] == 1  # greedy, declared in EvalOptions


def test_every_loop_key_has_one_declaration_and_the_help_shows_its_default():
    flags = loop_flags()
    assert len({lf.flag for lf in flags}) == len(flags)
    keys = config_fields()
    assert len(keys) == len(set(keys))
    declared = [f"{t}.{f.name}" for t, c in TABLES.items() for f in settings_of(c)]
    declared += [f.name for f in settings_of(RunOptions)]
    assert sorted(keys) == sorted(declared)
    loop = _commands()["loop"]
    helps = {p.name: p.help or "" for p in loop.params}
    for lf in flags:
        f = next(f for f in settings_of(lf.cls) if f.name == lf.name)
        if f.default not in (None, "", ()):
            shown = str(f.default).lower() if isinstance(f.default, bool) else str(f.default)
            if isinstance(f.default, tuple):  # a list setting, as its flag takes it
                shown = ",".join(map(str, f.default))
            assert f"[default: {shown}]" in helps[lf.param], lf.flag
    # the loop and the stage command show the same default for the same setting
    stage = _defaults(_commands()["sample-tree"])
    for lf in flags:
        if lf.table == "sample" and lf.param in stage:
            f = next(f for f in settings_of(SampleOptions) if f.name == lf.name)
            assert stage[lf.param] == f.default


def test_help_texts_list_registry_names():
    r = run_tcli(["advantages", "-h"])
    text = " ".join(r.stdout.decode().split())
    assert ("One of: dr_grpo, gae, grpo, ppo, reinforce_pp, reinforce_pp_baseline, rloo, tempo, "
            "treerpo") in text
    r = run_tcli(["train-step", "-h"])
    assert "k1, k2, k3" in " ".join(r.stdout.decode().split())
    assert "One of: sequence, token" in " ".join(r.stdout.decode().split())


def test_toml_round_trip_and_tables(tmp_path):
    cfg = load_config(None, {"temperature": 0.5, "eval_n": 3, "eval_temperature": 0.7,
                             "eval_k": "1,3", "lr": 2e-5, "sample_device": "cpu",
                             "engine": "vllm"})
    path = tmp_path / "c.toml"
    path.write_text(dump_toml(cfg))
    again = load_config(str(path))
    assert again == cfg
    assert again.sample.temperature == 0.5 and again.eval.n == 3 and again.sample.device == "cpu"
    text = path.read_text()
    for table in TABLES:
        assert f"[{table}]" in text


@pytest.mark.parametrize("toml,needle", [
    ('[advantages]\nstd = "populaton"\n', "populaton"),
    ("[sample]\nwidth = 0\n", "--width (sample.width) must be >= 1"),
    ("[train]\nlr = nan\n", "--lr (train.lr) must be a finite number"),
    ("prompts_per_step = 0\n", "--prompts-per-step"),
    ("[verify]\ntimeout = inf\n", "--timeout (verify.timeout)"),
    ("temperature = 0.7\n", "it belongs in [sample]"),
    ("[sample]\ntemprature = 0.7\n", "did you mean temperature"),
    ("[sampling]\nn = 2\n", "unknown table [sampling]"),
    ('[train]\nlr = "fast"\n', "--lr (train.lr) must be a number"),
    ('[advantages]\nestimator = "treerpo"\n', 'needs tree-sampled groups'),
    ('[eval]\nn = 2\nk = "1,4"\n', "between 1 and n (2)"),
])
def test_bad_loop_values_fail_before_touching_disk(tmp_path, toml, needle):
    cfg = tmp_path / "c.toml"
    cfg.write_text(toml + f'\nmodel = "{tmp_path}/nope"\nrun_dir = "{tmp_path}/run"\n'
                   if not toml.startswith("[") else
                   f'model = "{tmp_path}/nope"\nrun_dir = "{tmp_path}/run"\n' + toml)
    r = run_tcli(["loop", "--config", str(cfg)])
    assert r.returncode == 2, r.stderr
    assert needle in r.stderr.decode(), r.stderr
    assert b"Traceback" not in r.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("args,needle", [
    (["--std", "populaton"], "unknown value 'populaton'"),
    (["--width", "0"], "--width (sample.width) must be >= 1"),
    (["--lr", "nan"], "--lr (train.lr)"),
    (["--eval-limit", "-1"], "--eval-limit (eval.limit)"),
])
def test_bad_loop_flags_fail_like_the_stage_commands(tmp_path, args, needle):
    r = run_tcli(["loop", "--run-dir", str(tmp_path / "run"), *args])
    assert r.returncode == 2 and needle in r.stderr.decode(), r.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("cmd,args,needle", [
    ("advantages", ["--std", "populaton"], "unknown value 'populaton'"),
    ("sample-tree", ["-m", "x", "--width", "0"], "--width (sample.width) must be >= 1"),
    ("verify", ["--timeout", "inf"], "--timeout (verify.timeout) must be a finite number > 0"),
    ("eval", ["-m", "x", "-d", "y", "--limit", "-1"], "--limit (eval.limit) must be >= 1, got -1"),
    ("eval", ["-m", "x", "-d", "y", "--n", "2", "--k", "3"], "between 1 and n (2)"),
    ("eval", ["-m", "x", "-d", "y", "-n", "4"],
     "--n (eval.n) > 1 needs --temperature (eval.temperature) > 0: greedy samples"),
    ("train-step", ["-m", "x", "-o", "y", "--clip-low", "1.5"], "--clip-low (train.clip_low)"),
    ("train-step", ["-m", "x", "-o", "y", "--kl-coef", "0.1"], "needs --ref-model"),
])
def test_stage_commands_validate_through_the_same_options(cmd, args, needle):
    r = run_tcli([cmd, *args], input=b"")
    assert r.returncode == 2 and needle in r.stderr.decode(), r.stderr


def test_options_validate_in_library_code_too():
    with pytest.raises(UsageError, match="sample.width"):
        SampleOptions(width=0)
    with pytest.raises(UsageError, match="populaton"):
        AdvantageOptions(std="populaton")
    with pytest.raises(UsageError, match="needs --ref-model"):
        TrainOptions(kl_coef=0.1)
    with pytest.raises(UsageError, match=r"eval.n\) > 1 needs .*eval.temperature\) > 0"):
        EvalOptions(n=2)
    assert EvalOptions(n=2, temperature=0.7, k="1,2").ks == [1, 2]
    assert EvalOptions(n=4, temperature=0.7, k=[4, 1]).ks == [1, 4]  # a TOML list, as a flag's
    with pytest.raises(UsageError, match=r"--k \(eval.k\) must be an integer or a list of them"):
        EvalOptions(n=4, temperature=0.7, k="1,x")
    assert dataclasses.replace(SampleOptions(), n=3).n == 3


def test_no_seed_flag_where_nothing_is_random():
    cmds = _commands()
    for name in ("build-tree", "advantages", "show-tree", "verify", "plot"):
        assert "seed" not in _defaults(cmds[name]), name
    for name in ("sample-tree", "train-step", "eval", "loop", "init-model"):
        assert "seed" in _defaults(cmds[name]), name


def test_every_command_has_help():
    for name, cmd in _commands().items():
        assert cmd.help and not re.match(r"^\s*$", cmd.help), name


def test_no_function_over_sixty_lines():
    """Short functions (the architecture issue's rule), across the whole package."""
    import ast

    from conftest import REPO

    long = []
    for path in sorted((REPO / "tcli").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > 60:
                    long.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name} ({n} lines)")
    assert not long, long


@pytest.mark.parametrize("argv,hint", [(["frobnicate"], "(see 'tcli -h')"),
                                       (["verify", "--bogus"], "(see 'tcli verify -h')"),
                                       (["--bogus"], "(see 'tcli -h')")])
def test_a_usage_error_points_to_help_that_exists(argv, hint):
    r = run_tcli(argv)
    assert r.returncode == 2 and r.stderr.decode().rstrip().endswith(hint), r.stderr.decode()
