"""An option that keeps one value, given twice, is a usage error in every command (click would keep
the last value without a word); options declared as lists still repeat, a flag may repeat with
the same meaning, and a flag with its negation is refused. Nothing runs and nothing is written."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import failed, jsonl, parse, prompts, rollouts, run_tcli


def _inputs(tmp_path: Path, tiny: str) -> dict:
    """Input files beside an empty output directory ``out``; returns the paths by name."""
    (tmp_path / "out").mkdir()
    paths = {"out": tmp_path / "out", "tiny": tiny}
    for name, recs in (("a", prompts()), ("b", prompts()[:1]), ("roll", rollouts())):
        paths[name] = tmp_path / f"{name}.jsonl"
        paths[name].write_bytes(jsonl(recs))
    paths["cfg"] = tmp_path / "run.toml"
    paths["cfg"].write_text(f'model = "{tiny}"\ntrain_data = "{paths["a"]}"\n'
                            f'run_dir = "{tmp_path / "out" / "run"}"\nsteps = 1\n')
    return paths


# (argv with {name} placeholders, the error line's text before the help hint)
REPEATED = {
    "loop": (["loop", "--config", "{cfg}", "--eval-data", "{a}", "--eval-data", "{b}"],
             "--eval-data was given twice ({a}, {b}): give it once"),
    "eval": (["eval", "-m", "{tiny}", "--data", "{a}", "--data={b}", "--task", "arith",
              "--workers", "0", "--max-new-tokens", "2", "-q", "-o", "{out}/s.jsonl"],
             "-d/--data was given twice ({a}, {b}): give it once"),
    "sample-tree": (["sample-tree", "{a}", "-m", "{tiny}", "--max-new-tokens", "2", "--width=2",
                     "--width=3", "-o", "{out}/s.jsonl"],
                    "--width was given twice (2, 3): give it once"),
    "verify": (["verify", "{roll}", "-t", "arith", "-j", "0", "-o{out}/x.jsonl", "--output",
                "{out}/y.jsonl", "-o", "{out}/z.jsonl"],
               "-o/--output was given 3 times ({out}/x.jsonl, {out}/y.jsonl, {out}/z.jsonl): "
               "give it once"),
}


def _fill(text: str, paths: dict) -> str:
    return text.format(**{k: str(v) for k, v in paths.items()})


@pytest.mark.parametrize("cmd", sorted(REPEATED))
def test_a_single_value_option_given_twice_exits_2_and_writes_nothing(cmd, tiny, tmp_path):
    paths = _inputs(tmp_path, tiny)
    argv, words = REPEATED[cmd]
    r = run_tcli([_fill(a, paths) for a in argv])
    line = failed(r, 2)
    assert line == f"tcli: error: {_fill(words, paths)} (see 'tcli {cmd} -h')", line
    assert r.stdout == b"" and list(paths["out"].iterdir()) == []


def test_list_options_still_repeat(tmp_path):
    """``--task`` and ``--weights`` are lists: each occurrence adds a value."""
    r = run_tcli(["verify", "-t", "arith", "--task=gsm8k", "--weights", "1", "--weights=0.5",
                  "-j", "0"], input=b'{"text": "#### 4", "answer": "4"}\n')
    assert r.returncode == 0, r.stderr.decode()
    rec = parse(r.stdout)[0]
    assert set(rec["rewards"]) == {"arith", "gsm8k"} and rec["reward"] == 1.5


def test_a_flag_repeated_with_the_same_meaning_is_accepted(tmp_path):
    src = jsonl(rollouts())
    once = run_tcli(["advantages", "--whiten"], input=src)
    twice = run_tcli(["advantages", "--whiten", "--whiten", "-q", "-q"], input=src)
    assert once.returncode == twice.returncode == 0, twice.stderr.decode()
    assert twice.stdout == once.stdout != b""


@pytest.mark.parametrize("argv, on, off", [
    (["advantages", "--no-whiten", "--whiten"], "--whiten", "--no-whiten"),
    (["loop", "--bf16", "--steps", "1", "--no-bf16"], "--bf16", "--no-bf16"),
])
def test_a_flag_and_its_negation_together_exit_2(argv, on, off, tmp_path):
    """Named as the help names them, whichever came first."""
    r = run_tcli(argv + ["--run-dir" if argv[0] == "loop" else "-o", tmp_path / "out"],
                 input=jsonl(rollouts()))
    line = failed(r, 2, f"{on} and {off} were both given", f"'tcli {argv[0]} -h'")
    assert r.stdout == b"" and list(tmp_path.iterdir()) == [], line


def test_arguments_after_double_dash_are_not_options(tmp_path):
    """After ``--`` an argument is the input file even when it spells an option: ``-o`` is
    given once, and the missing file ``-o`` is what the command reports."""
    r = run_tcli(["verify", "-t", "arith", "-o", tmp_path / "out.jsonl", "--", "-o"])
    failed(r, 2, "input file not found: -o")
    assert list(tmp_path.iterdir()) == []


def test_help_wins_over_a_repeated_option():
    r = run_tcli(["loop", "--steps", "1", "--steps", "2", "-h"])
    assert r.returncode == 0 and b"--eval-data" in r.stdout


def test_a_value_that_spells_an_option_is_a_value(tmp_path):
    """``--timeout --output`` gives ``--output`` to --timeout (click refuses it as a number):
    the output option itself is given once."""
    r = run_tcli(["verify", "-o", tmp_path / "out.jsonl", "--timeout", "--output"])
    line = failed(r, 2, "Invalid value for '--timeout'")
    assert "given" not in line and list(tmp_path.iterdir()) == [], line
