"""`tcli loop`'s settings say what a run does: a tree's shape in independent mode is refused rather
than ignored (and the compare harness gives a shape set for every method to the tree methods
only), and a --resume that changes a setting records it in the run directory (resumes.jsonl).

The loops use the scripted engine of conftest (no model forward when sampling)."""

from __future__ import annotations

import os
import re

import orjson
import pytest

from conftest import LOOP_N, read_metrics, run_tcli, scripted_loop_dir

REWARD = "tcli_test_settings_reward"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(directory, model): the arith model, LOOP_PROMPTS and the reward plugin."""
    return scripted_loop_dir(tmp_path_factory, "settings", REWARD)


def _args(setup, run, *extra, **flags) -> list[str]:
    d, model = setup
    base = {"model": model, "train-data": d / "prompts.jsonl", "run-dir": run, "steps": 1,
            "prompts-per-step": 4, "engine": "scripted", "n": LOOP_N,
            "task": f"python:{REWARD}:score", "workers": 0, "prompt-template": "plain",
            "lr": 1e-3, "estimator": "grpo", "eval-every": 0, "keep-last": 5, "seed": 1,
            **{k.replace("_", "-"): v for k, v in flags.items()}}
    return ["loop", *[x for k, v in base.items() if v is not None for x in (f"--{k}", str(v))],
            *extra]


def _loop(*args):
    r = run_tcli(list(args), env={"OMP_NUM_THREADS": "1"})
    return r.returncode, r.stderr.decode()


# ----------------------------------------------------------------------------- a tree's shape

@pytest.mark.parametrize("given", [{"width": 4}, {"depth": 2, "segment_tokens": 5},
                                   {"branch": "entropy"}, {"branch_entropy": 0.5},
                                   {"min_segment_tokens": 2}])
def test_a_trees_shape_without_tree_mode_is_refused(given):
    from tcli.config.loop import load_config
    from tcli.errors import UsageError

    with pytest.raises(UsageError) as ei:
        load_config(None, given)
    msg = str(ei.value)
    assert ei.value.exit_code == 2 and "give --mode (sample.mode) tree as well" in msg, msg
    assert all(f"(sample.{k})" in msg for k in given), msg
    load_config(None, {**given, "mode": "tree"})  # the same shape in tree mode is fine
    load_config(None, {"n": 4})  # and independent mode's own settings


def test_the_cli_refuses_it_before_touching_disk(setup, tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text('[sample]\nmode = "independent"\ndepth = 2\n')
    run = tmp_path / "run"
    code, err = _loop(*_args(setup, run), "--config", cfg)
    assert code == 2 and err.count("\n") == 1, err
    assert f"{cfg}: --depth (sample.depth) shapes a tree, but --mode (sample.mode) is " \
           "independent" in err, err
    assert not run.exists()


def test_compare_gives_a_trees_shape_set_for_all_to_the_tree_methods_only(tmp_path):
    from examples import compare
    from tcli.config.loop import TREE_SETTINGS

    assert {"width", "depth", "segment_tokens", "branch"} <= set(TREE_SETTINGS)
    toml = tmp_path / "task.toml"
    toml.write_text('model = "m"\ntrain_data = "d.jsonl"\n[sample]\nmode = "independent"\n')
    a = compare.parse_args(["--config", str(toml), "--set", "width=4", "--set",
                            "treerpo.depth=2", "--set", "eval_limit=3", "--set", "grpo.lr=0.5"])
    over = {m: compare.overrides(m, 0, a) for m in ("grpo", "tempo", "treerpo", "tempo-entropy")}
    assert "width" not in over["grpo"] and "width" not in over["tempo"]
    assert over["treerpo"]["width"] == over["tempo-entropy"]["width"] == 4
    assert over["treerpo"]["depth"] == 2 and over["tempo-entropy"]["depth"] == 3  # its own row
    assert all(o["eval_limit"] == 3 for o in over.values()) and over["grpo"]["lr"] == 0.5
    assert "width" not in compare.overrides(None, 0, a)  # the task's own config loads
    for m, o in over.items():
        compare.load_config(str(toml), o)  # every method's settings load: none is skipped
    toml.write_text(toml.read_text().replace('"independent"', '"tree"'))
    assert compare.overrides("tempo", 0, a)["width"] == 4  # the config samples trees
    # a shape named for one method that does not sample trees is still refused (then skipped)
    a = compare.parse_args(["--config", str(toml), "--set", "grpo.width=4", "--set", "mode=independent"])
    with pytest.raises(compare.UsageError, match="shapes a tree"):
        compare.load_config(str(toml), compare.overrides("grpo", 0, a))


# ----------------------------------------------------------------------------- resume record

def _resumes(run) -> list[dict]:
    return [orjson.loads(x) for x in open(run / "resumes.jsonl", "rb")]


def test_a_resume_that_changes_a_setting_is_recorded(setup, tmp_path):
    run = tmp_path / "run"
    code, err = _loop(*_args(setup, run))
    assert code == 0, err
    toml = (run / "config.toml").read_text()
    assert not (run / "resumes.jsonl").exists()
    code, err = _loop("loop", "--resume", run, "--steps", "3", "--estimator", "rloo")
    assert code == 0, err
    assert "(recorded in resumes.jsonl)" in err, err
    assert _resumes(run) == [{"step": 2, "changed": {"advantages.estimator": "rloo",
                                                     "steps": 3}}]
    assert (run / "config.toml").read_text() == toml  # its own values for the next resume
    code, err = _loop("loop", "--resume", run, "--steps", "4")
    assert code == 0, err
    assert _resumes(run) == [{"step": 2, "changed": {"advantages.estimator": "rloo",
                                                     "steps": 3}},
                             {"step": 4, "changed": {"steps": 4}}]  # grpo again from step 4
    assert [m["step"] for m in read_metrics(run) if m["kind"] == "train"] == [1, 2, 3, 4]
    code, err = _loop(*_args(setup, run), "--overwrite")  # the record is the run's, removed with it
    assert code == 0 and not (run / "resumes.jsonl").exists(), err


def test_settings_taken_from_the_checkpoint_are_no_change(setup, tmp_path):
    """A run that took its prompt template and length from the model's record resumes with the
    same ones: nothing but what the flags change is recorded."""
    import shutil

    d, model = setup
    own = tmp_path / "model"
    shutil.copytree(model, own)
    state = orjson.loads((own / "tcli_state.json").read_bytes())
    state["sampling"] = {"prompt_template": "plain", "chat_template": False, "max_new_tokens": 9}
    (own / "tcli_state.json").write_bytes(orjson.dumps(state))
    run = tmp_path / "run"
    code, err = _loop(*_args((d, str(own)), run, prompt_template=None))
    assert code == 0 and "using the checkpoint's prompt_template=plain" in err, err
    code, err = _loop("loop", "--resume", run, "--steps", "2")
    assert code == 0, err
    assert _resumes(run) == [{"step": 2, "changed": {"steps": 2}}]


def test_a_step_run_again_drops_the_record_of_its_first_run(tmp_path):
    from tcli.errors import DataError
    from tcli.loop.rundir import RunDir

    rd = RunDir(str(tmp_path))
    rd.record_resume(1, {})
    assert not (tmp_path / "resumes.jsonl").exists()  # nothing changed: nothing to say
    rd.record_resume(3, {"advantages.estimator": "rloo"})
    rd.record_resume(5, {"train.lr": 0.5})
    rd.record_resume(4, {})  # killed before step 5's checkpoint, resumed as config.toml says
    assert _resumes(tmp_path) == [{"step": 3, "changed": {"advantages.estimator": "rloo"}},
                                  {"step": 4, "changed": {}}]
    rd.record_resume(2, {})
    assert not (tmp_path / "resumes.jsonl").exists()
    (tmp_path / "resumes.jsonl").write_text('{"step": 2, "changed": {}}\n[1]\n')
    with pytest.raises(DataError) as ei:
        rd.record_resume(3, {})
    assert ei.value.line == 2 and ei.value.file == os.path.join(tmp_path, "resumes.jsonl")


# ----------------------------------------------------------------------------- the sampler's weights

@pytest.mark.parametrize("given, words", [
    ({"sample_device": "cpu"}, "--sample-device (sample.device) is set"),
    ({"dtype": "bfloat16"}, "--dtype (sample.dtype) is set"),
    ({"dtype": "bfloat16", "parallel": "ddp"}, "--dtype (sample.dtype) is set")])
def test_hf_sampling_device_and_dtype_the_loop_would_ignore_are_refused(given, words):
    """The loop's hf engine samples from the trainer's own float32 weights on the trainer's
    device: a sampling device or dtype there would change nothing."""
    from tcli.config.loop import load_config
    from tcli.errors import UsageError

    with pytest.raises(UsageError, match=re.escape(words) + ".*trainer's own weights"):
        load_config(None, given)
    load_config(None, {**given, "engine": "vllm"})  # vllm holds its own copy, in its own dtype


def test_a_sampling_dtype_is_read_for_the_unsharded_copy_under_fsdp():
    from tcli.config.loop import load_config

    assert load_config(None, {"dtype": "bfloat16", "parallel": "fsdp"}).sample.dtype == "bfloat16"
