"""A sampling setting that the chosen --mode ignores is refused, by sample-tree and by the loop
alike, from one declaration (SampleOptions.MODE_ONLY): a tree's shape without --mode tree, and n
(responses per prompt) with it."""

from __future__ import annotations

import pytest

from conftest import run_tcli

# a value other than the default for every setting one mode reads
CHANGED = {"n": 4, "width": 3, "depth": 2, "segment_tokens": 5, "branch": "entropy",
           "branch_entropy": 0.5, "min_segment_tokens": 3}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def test_every_mode_only_setting_is_covered_here():
    from tcli.config.loop import TREE_SETTINGS
    from tcli.config.stages import SampleOptions

    assert TREE_SETTINGS == SampleOptions.MODE_ONLY["tree"]
    assert set(CHANGED) == {k for keys in SampleOptions.MODE_ONLY.values() for k in keys}


@pytest.mark.parametrize("name", [k for k in CHANGED if k != "n"])
def test_sample_tree_refuses_each_tree_setting_without_tree_mode(name, tmp_path):
    out = tmp_path / "out.jsonl"
    r = run_tcli(["sample-tree", tmp_path / "none.jsonl", "-m", tmp_path / "none", "-o", out,
                  _flag(name), str(CHANGED[name])])
    err = r.stderr.decode()
    assert r.returncode == 2 and err.count("\n") == 1, err
    assert f"tcli: error: {_flag(name)} shapes a tree, but --mode is independent, which " \
           "ignores it: give --mode tree as well, or leave it out" in err, err
    assert not out.exists()


@pytest.mark.parametrize("name", [k for k in CHANGED if k != "n"])
def test_the_loop_refuses_each_tree_setting_without_tree_mode(name):
    from tcli.config.loop import load_config
    from tcli.errors import UsageError

    with pytest.raises(UsageError, match=rf"--.* \(sample\.{name}\) shapes a tree"):
        load_config(None, {name: CHANGED[name]})
    load_config(None, {name: CHANGED[name], "mode": "tree"})


def test_the_loop_refuses_n_in_tree_mode_naming_the_file(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text('[sample]\nmode = "tree"\nn = 4\n')
    run = tmp_path / "run"
    r = run_tcli(["loop", "--config", cfg, "--model", tmp_path / "m", "--train-data",
                  tmp_path / "d.jsonl", "--run-dir", run])
    err = r.stderr.decode()
    assert r.returncode == 2 and err.count("\n") == 1, err
    assert f"{cfg}: --n (sample.n) sets the samples per prompt of --mode (sample.mode) " \
           "independent; a tree's leaves come from --width (sample.width)" in err, err
    assert not run.exists(), err


def test_the_loop_refuses_n_given_with_mode_tree_on_the_command_line():
    from tcli.config.loop import load_config
    from tcli.config.stages import SampleOptions
    from tcli.errors import UsageError

    with pytest.raises(UsageError, match=r"--n \(sample\.n\) sets the samples per prompt"):
        load_config(None, {"mode": "tree", "n": 4})
    # the default n is all a resolved config.toml of a tree run holds: it loads
    assert load_config(None, {"mode": "tree", "n": SampleOptions().n}).sample.mode == "tree"
    assert load_config(None, {"n": 4}).sample.n == 4


def test_sample_tree_still_refuses_n_in_tree_mode(tmp_path):
    r = run_tcli(["sample-tree", tmp_path / "none.jsonl", "-m", tmp_path / "none", "--mode",
                  "tree", "-n", "4"])
    err = r.stderr.decode()
    assert r.returncode == 2 and "--n sets the samples per prompt of --mode independent" in err


def test_compare_gives_n_set_for_all_to_the_independent_methods_only(tmp_path):
    from examples import compare

    toml = tmp_path / "task.toml"
    toml.write_text('model = "m"\ntrain_data = "d.jsonl"\n[sample]\nmode = "independent"\n')
    a = compare.parse_args(["--config", str(toml), "--set", "n=16", "--set", "treerpo.depth=2"])
    over = {m: compare.overrides(m, 0, a) for m in ("grpo", "tempo", "treerpo", "tempo-entropy")}
    assert over["grpo"]["n"] == over["tempo"]["n"] == 16
    assert "n" not in over["treerpo"] and "n" not in over["tempo-entropy"]
    for o in over.values():
        compare.load_config(str(toml), o)  # every method's settings load: none is skipped


def test_compare_and_gradient_error_run_tree_methods_on_a_task_of_n_independent_responses(tmp_path):
    """A task config that samples n = 16 independent responses: the tree methods get the default
    n back (their leaves come from width and depth), so none is skipped as refused."""
    from examples import compare
    from examples.gradient_error_methods import METHODS, regime

    toml = tmp_path / "task.toml"
    toml.write_text('model = "m"\ntrain_data = "d.jsonl"\n[sample]\nn = 16\n')
    a = compare.parse_args(["--config", str(toml)])
    over = {m: compare.overrides(m, 0, a) for m in ("grpo", "treerpo", "tempo-entropy")}
    assert "n" not in over["grpo"] and over["treerpo"]["n"] == over["tempo-entropy"]["n"] == 8
    assert compare.load_config(str(toml), over["grpo"]).sample.n == 16
    for o in over.values():
        compare.load_config(str(toml), o)
    for m in ("tempo-tree", "treerpo-entropy", "tempo-tree-expand", "grpo"):
        compare.load_config(str(toml), regime(METHODS[m], 4, None))
