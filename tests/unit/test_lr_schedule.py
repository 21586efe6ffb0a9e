"""Learning-rate schedules: the lr of every optimizer step follows the formula of
tcli/train/schedule.py, and the schedule's position is the checkpoint's optimizer_steps, so
chained train-steps and loop --resume give the same lr sequence and bit-identical weights as one
uninterrupted run."""

from __future__ import annotations

import math
import os
import shutil

import orjson
import pytest

from conftest import SMALL, loop_config as _config, read_metrics as _read, run_tcli, shared_model
from tcli.config.stages import TrainOptions
from tcli.errors import UsageError
from tcli.train.schedule import LR_SCHEDULES, lr_at

RECS = [{"prompt_token_ids": [21, 15, 21, 33], "token_ids": [30 + s, 40 + g, 1],
         "logprobs": [-4.5, -4.4, -4.6], "advantages": [0.5 - s / 2] * 3,
         "prompt_id": f"p{g}", "sample_id": s} for g in range(2) for s in range(3)]


def expected(name: str, k: int, lr: float, warmup: int, span: int, m: float) -> float:
    """The schedule written out independently of tcli.train.schedule."""
    if k < warmup:
        return lr * (k + 1) / warmup
    p = min(1.0, (k - warmup) / (span - warmup))
    if name == "constant":
        return lr
    if name == "linear":
        return lr * (1 - (1 - m) * p)
    return lr * (m + (1 - m) * (1 + math.cos(math.pi * p)) / 2)


@pytest.mark.parametrize("name", ["constant", "linear", "cosine"])
def test_lr_per_optimizer_step_matches_the_formula(name):
    assert LR_SCHEDULES.names() == ["constant", "cosine", "linear"]
    opts = TrainOptions(lr=1e-3, lr_schedule=name, warmup_steps=3, schedule_steps=10,
                        min_lr_ratio=0.1)
    got = [lr_at(opts, k) for k in range(14)]
    assert got == pytest.approx([expected(name, k, 1e-3, 3, 10, 0.1) for k in range(14)],
                                rel=1e-12, abs=0)
    assert got[0] == pytest.approx(1e-3 / 3) and got[2] == pytest.approx(1e-3)  # warm-up
    if name != "constant":
        assert got[3] == pytest.approx(1e-3) and got[10:] == [pytest.approx(1e-4)] * 4
    no_warmup = TrainOptions(lr=1.0, lr_schedule=name, schedule_steps=4)
    assert lr_at(no_warmup, 0) == 1.0


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_decay_equals_transformers_schedules(name):
    """After warm-up and up to the span, with min_lr_ratio 0, the decay is transformers' (its
    warm-up starts at lr 0, tcli's at lr / warmup_steps, so the first step is not wasted; past
    the span tcli stays at the end value where transformers' cosine rises again)."""
    import torch
    import transformers

    make = {"linear": transformers.get_linear_schedule_with_warmup,
            "cosine": transformers.get_cosine_schedule_with_warmup}[name]
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    hf = make(opt, num_warmup_steps=2, num_training_steps=9).lr_lambdas[0]
    opts = TrainOptions(lr=1.0, lr_schedule=name, warmup_steps=2, schedule_steps=9)
    for k in range(2, 10):
        assert lr_at(opts, k) == pytest.approx(hf(k), abs=1e-12), k
    assert lr_at(opts, 10) == lr_at(opts, 9) == 0.0


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The SMALL model (shared, read-only)."""
    return shared_model(tmp_path_factory, seed=0, **SMALL)


def _weights(path: str) -> dict:
    from safetensors.numpy import load_file

    return load_file(os.path.join(path, "model.safetensors"))


def test_chained_train_steps_continue_the_schedule_exactly(tiny, tmp_path):
    """Four train-step commands, each from the last one's checkpoint, against one Trainer taking
    the same four steps: same lr per step (the formula's) and bit-identical weights."""
    from tcli.cli import main
    from tcli.train.trainer import Trainer

    flags = {"lr": 1e-3, "lr_schedule": "linear", "warmup_steps": 1, "schedule_steps": 4,
             "min_lr_ratio": 0.25}
    opts = TrainOptions(device="cpu", **flags)
    trainer = Trainer(tiny, opts)
    one_run = [trainer.step(RECS)["lr"] for _ in range(4)]
    trainer.save(str(tmp_path / "uninterrupted"))
    want = [expected("linear", k, 1e-3, 1, 4, 0.25) for k in range(4)]
    assert one_run == pytest.approx(want, rel=1e-12)
    src = tmp_path / "in.jsonl"
    src.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in RECS))
    argv = [f"--{k.replace('_', '-')}={v}" for k, v in flags.items()] + ["--device", "cpu", "-q"]
    prev, chained = tiny, []
    for i in range(4):
        out, metrics = tmp_path / f"c{i}", tmp_path / f"m{i}.jsonl"
        with pytest.raises(SystemExit) as e:
            main(["train-step", str(src), "-m", prev, "-o", str(out), "--metrics", str(metrics),
                  *argv])
        assert e.value.code == 0
        chained.append(orjson.loads(metrics.read_bytes())["lr"])
        prev = str(out)
    assert chained == one_run
    a, b = _weights(str(tmp_path / "uninterrupted")), _weights(prev)
    assert all((a[k] == b[k]).all() for k in a)
    assert not all((a[k] == _weights(tiny)[k]).all() for k in a)  # it did train


def test_train_step_past_the_end_of_a_decay_to_zero_is_refused(tiny, tmp_path, capsys):
    """A checkpoint that took all of a linear schedule's steps: one more train-step would run at
    lr 0 and write an unchanged model, so it exits 2 naming --schedule-steps; with an end ratio
    above 0 it trains on at that lr."""
    from tcli.cli import main

    src = tmp_path / "in.jsonl"
    src.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in RECS))
    flags = ["--lr", "1e-3", "--lr-schedule", "linear", "--schedule-steps", "1", "--device", "cpu",
             "-q"]
    codes = []
    for out, extra in (("c1", []), ("c2", []), ("c3", ["--min-lr-ratio", "0.5"])):
        with pytest.raises(SystemExit) as e:
            main(["train-step", str(src), "-m", str(tmp_path / "c1") if out != "c1" else tiny,
                  "-o", str(tmp_path / out), *flags, *extra])
        codes.append((e.value.code, "lr 0" in capsys.readouterr().err))
    assert codes == [(0, False), (2, True), (0, False)]
    assert not (tmp_path / "c2").exists()


def test_loop_resume_continues_the_schedule_exactly(loop_model, tmp_path):
    """A cosine run of 4 steps, and a copy of it resumed after step 2 (its checkpoints 3 and 4
    gone, as if killed): the same lr at every step and bit-identical final weights."""
    from tcli.loop import resume_config, run_loop

    ref = _config(loop_model, tmp_path / "ref", steps=4, eval_every=0, keep_last=5,
                  lr_schedule="cosine", warmup_steps=1, min_lr_ratio=0.1)
    assert ref.train.schedule_steps == 4  # the loop's span: steps x epochs x mini_batches
    run_loop(ref, log=lambda s: None)
    shutil.copytree(tmp_path / "ref", tmp_path / "run")
    for s in (3, 4):
        shutil.rmtree(tmp_path / "run" / "checkpoints" / f"step_{s}")
    run_loop(resume_config(str(tmp_path / "run"), {}), resume=True, log=lambda s: None)
    lrs = {d: [m["train_lr"] for m in _read(tmp_path / d) if m["kind"] == "train"]
           for d in ("ref", "run")}
    assert lrs["ref"] == lrs["run"] == pytest.approx(
        [expected("cosine", k, 1e-3, 1, 4, 0.1) for k in range(4)], rel=1e-12)
    a = _weights(str(tmp_path / "ref" / "checkpoints" / "step_4"))
    b = _weights(str(tmp_path / "run" / "checkpoints" / "step_4"))
    assert all((a[k] == b[k]).all() for k in a)


@pytest.mark.parametrize("args, words", [
    (["--lr-schedule", "cosine"], "needs --schedule-steps"),
    (["--warmup-steps", "5", "--schedule-steps", "3"], "--warmup-steps (train.warmup_steps) must be <="),
    (["--lr-schedule", "step"], "valid: constant, cosine, linear"),
    (["--min-lr-ratio", "1.5"], "--min-lr-ratio"),
])
def test_bad_schedule_settings_are_usage_errors_before_anything(args, words, tmp_path):
    r = run_tcli(["train-step", tmp_path / "missing.jsonl", "-m", tmp_path / "no-model",
                  "-o", tmp_path / "out", *args])
    assert r.returncode == 2, r.stderr.decode()
    assert words in r.stderr.decode()
    assert os.listdir(tmp_path) == []


def test_loop_warmup_longer_than_the_run_is_a_usage_error(loop_model):
    with pytest.raises(UsageError, match="warmup_steps"):
        _config(loop_model, "unused", steps=3, lr_schedule="linear", warmup_steps=10)
