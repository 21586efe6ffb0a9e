"""train-step's flags come from TrainOptions (one declaration per setting), bad values are usage
errors before anything is loaded, and the training code keeps its shape: one job per module,
short functions, one place that loads models, no torch at import."""

from __future__ import annotations

import ast
import dataclasses
import os
import re
from pathlib import Path

import orjson
import pytest

from conftest import REPO, run_tcli

OWN = [*sorted((REPO / "tcli" / "train").glob("*.py")), *sorted((REPO / "tcli" / "models").glob("*.py")),
       REPO / "tcli" / "sft.py", REPO / "tcli" / "commands" / "train.py"]


def error_line(stderr: bytes) -> str:
    err = stderr.decode()
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tcli: error: "), err
    return lines[0]


# ----------------------------------------------------------------------------- flags

def test_help_lists_every_setting_with_its_default():
    from tcli.config.spec import settings_of
    from tcli.config.stages import TrainOptions

    r = run_tcli(["train-step", "-h"], env={"COLUMNS": "200"})
    assert r.returncode == 0, r.stderr.decode()
    out = r.stdout.decode()
    for f in settings_of(TrainOptions):
        flag = "--" + f.name.replace("_", "-")
        line = next((ln for ln in out.splitlines() if ln.strip().startswith(flag)), None)
        assert line is not None, f"{flag} missing from train-step -h"
        if f.default is None:
            continue
        name = f.name.replace("_", "-")
        shown = {False: f"no-{name}", True: name}.get(f.default, str(f.default)) \
            if isinstance(f.default, bool) else str(f.default)
        block = out[out.index(line):].split("\n  -")[0]
        assert f"[default: {shown}]" in " ".join(block.split()), (flag, block)
    for other in ("--model", "--output", "--metrics", "--input-format", "--seed", "--quiet"):
        assert other in out


@pytest.mark.parametrize("args, words", [
    (["--clip-low", "1.5"], "--clip-low"),
    (["--loss-agg", "mean"], "--loss-agg"),
    (["--kl-estimator", "k9"], "--kl-estimator"),
    (["--kl-coef", "0.1"], "needs --ref-model"),
    (["--epochs", "0"], "--epochs"),
    (["--lr", "nan"], "--lr"),
    (["--device", "tpu"], "--device"),
    (["--dual-clip", "0.5"], "--dual-clip"),
])
def test_bad_option_is_a_usage_error_before_anything(args, words, tmp_path):
    """Exit 2 before the input, the model or the output is touched (none of them exist)."""
    r = run_tcli(["train-step", tmp_path / "missing.jsonl", "-m", tmp_path / "no-model",
                  "-o", tmp_path / "out", *args])
    assert r.returncode == 2, r.stderr.decode()
    assert words in error_line(r.stderr)
    assert os.listdir(tmp_path) == []


def test_metrics_directory_must_exist(tmp_path):
    r = run_tcli(["train-step", "-m", tmp_path, "-o", tmp_path / "out",
                  "--metrics", tmp_path / "nodir" / "m.jsonl"])
    assert r.returncode == 2 and "--metrics" in error_line(r.stderr)


def test_flags_reach_the_trainer(tiny, tmp_path):
    """Every TrainOptions flag given on the command line ends up in the checkpoint's config,
    and the metrics record agrees with the options."""
    from tcli.config.stages import TrainOptions
    from tcli.models.checkpoint import read_state

    recs = [{"prompt_token_ids": [21, 15, 21, 33], "token_ids": [30 + s, 40, 1],
             "logprobs": [-4.5, -4.4, -4.6], "advantages": [0.5 - s / 2] * 3} for s in range(4)]
    src = tmp_path / "in.jsonl"
    src.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in recs))
    opts = TrainOptions(lr=2e-3, clip_low=0.1, clip_high=0.3, dual_clip=2.5,
                        loss_agg="seq-mean-token-sum", kl_coef=0.05, kl_estimator="k2",
                        ref_model=tiny, epochs=2, mini_batches=2, micro_batch_tokens=20,
                        max_grad_norm=0.5, weight_decay=0.01, grad_checkpointing=True, device="cpu")
    flags = []
    for k, v in opts.to_dict().items():
        if v is True:
            flags.append("--" + k.replace("_", "-"))
        elif v not in (None, False):
            flags += ["--" + k.replace("_", "-"), str(v)]
    out = tmp_path / "out"
    r = run_tcli(["train-step", src, "-m", tiny, "-o", out, "--seed", "5", *flags])
    assert r.returncode == 0, r.stderr.decode()
    st = read_state(str(out))
    assert st["config"] == opts.to_dict() and st["seed"] == 5
    m = orjson.loads(r.stdout)
    assert m["lr"] == 2e-3 and m["optimizer_steps"] == 4 and "kl" in m
    assert m["num_sequences"] == 4 and m["model"] == str(out)


# ----------------------------------------------------------------------------- shape of the code

def _functions(path: Path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node


def test_no_long_functions():
    long = [f"{p.relative_to(REPO)}:{fn.lineno} {fn.name} ({fn.end_lineno - fn.lineno + 1} lines)"
            for p in OWN for fn in _functions(p) if fn.end_lineno - fn.lineno + 1 > 60]
    assert not long, long


def test_models_are_loaded_in_one_place():
    """from_pretrained (weights, configs, tokenizers) only in tcli/models/load.py among the
    training files; the trainer's old names are gone."""
    calls = [str(p.relative_to(REPO)) for p in OWN
             if re.search(r"\.from_pretrained\(", p.read_text()) and p.name != "load.py"]
    assert not calls, calls
    import tcli.train
    import tcli.train.trainer as trainer

    for gone in ("TrainConfig", "load_trainer", "load_model", "model_vocab_size"):
        assert not hasattr(trainer, gone), gone
    import inspect

    assert "sharded" not in inspect.signature(trainer.Trainer.step).parameters
    for name in tcli.train.__all__:
        getattr(tcli.train, name)


def test_trainer_state_records_options_and_seed(tiny, tmp_path):
    from tcli.config.stages import TrainOptions
    from tcli.train.trainer import Trainer

    tr = Trainer(tiny, TrainOptions(lr=1e-4), seed=9)
    st = tr.state({"note": 1})
    assert st["seed"] == 9 and st["config"] == dataclasses.asdict(TrainOptions(lr=1e-4))
    assert st["note"] == 1 and (st["step"], st["policy_version"]) == (0, 0)
    import torch
    import transformers

    v = st["versions"]  # what the checkpoint was made with, for a bug report or a rerun
    assert v["torch"].startswith(torch.__version__.split("+")[0])
    assert v["transformers"] == transformers.__version__ and v["device"] == "cpu"
