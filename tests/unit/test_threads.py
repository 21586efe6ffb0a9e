"""--threads: one setting for sample-tree, eval, train-step and loop; it reaches torch before the
model runs, defaults to $OMP_NUM_THREADS or the cores available, and CPU-only stages never
import torch for it."""

from __future__ import annotations

import os

import orjson
import pytest
import torch

from conftest import ScriptedEngine, loop_config as _config, register_engine
from tcli.config.threads import ThreadOptions

SEEN: list[int] = []  # torch's thread count each time the probe engine sampled


class ThreadProbe(ScriptedEngine):
    """The loop test's scripted engine, noting torch's thread count when it samples."""

    def generate(self, prompts, n, cfg):
        SEEN.append(torch.get_num_threads())
        return super().generate(prompts, n, cfg)


register_engine("threads-probe", ThreadProbe)


@pytest.fixture(autouse=True)
def keep_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def cores() -> int:
    return len(os.sched_getaffinity(0))


def test_default_is_omp_num_threads_else_the_cores_available(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    torch.set_num_threads(1 if cores() > 1 else 2)
    assert ThreadOptions().apply() == cores() == torch.get_num_threads()
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    torch.set_num_threads(2)
    assert ThreadOptions().apply() == 1 == torch.get_num_threads()
    assert ThreadOptions(threads=2).apply() == 2 == torch.get_num_threads()  # the flag wins


def test_bad_value_is_a_usage_error():
    from tcli.errors import UsageError

    with pytest.raises(UsageError, match=r"--threads \(threads\) must be >= 1"):
        ThreadOptions(threads=0)


@pytest.mark.parametrize("threads", [1, 2])
def test_loop_sets_torch_threads_before_sampling(loop_model, tmp_path, threads):
    from tcli.loop import run_loop

    torch.set_num_threads(3 - threads)
    SEEN.clear()
    cfg = _config(loop_model, tmp_path / "run", steps=1, eval_every=0, engine="threads-probe",
                  threads=threads)
    run_loop(cfg, log=lambda s: None)
    assert SEEN and set(SEEN) == {threads}
    assert "threads = %d" % threads in (tmp_path / "run" / "config.toml").read_text()


@pytest.mark.parametrize("threads", [1, 2])
def test_train_step_sets_torch_threads_before_training(loop_model, tmp_path, monkeypatch,
                                                       threads):
    """In process, through the real command: the trainer's step sees the requested count."""
    from tcli.cli import main
    from tcli.train.trainer import Trainer

    _, path = loop_model
    recs = [{"prompt_token_ids": [5, 6, 7], "token_ids": [8 + s, 9, 2],
             "logprobs": [-2.0, -2.1, -2.2], "advantages": [0.5 - s / 3] * 3} for s in range(4)]
    src = tmp_path / "in.jsonl"
    src.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in recs))
    seen = []
    real = Trainer.step
    monkeypatch.setattr(Trainer, "step", lambda self, s: (seen.append(torch.get_num_threads()),
                                                          real(self, s))[1])
    torch.set_num_threads(3 - threads)
    with pytest.raises(SystemExit) as e:
        main(["train-step", str(src), "-m", path, "-o", str(tmp_path / "out"), "--quiet",
              "--threads", str(threads)])
    assert e.value.code == 0
    assert seen == [threads]


