"""`tcli loop` in process, with a scripted engine whose answers are known in advance, so every
metric is exact: rewards, zero-variance share, branching tokens, dropped groups, token budgets,
evaluation accuracy, best/ selection and keep_last pruning. The trainer is the real one."""

from __future__ import annotations

import os
import sys

import numpy as np
import orjson
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from conftest import arith_run_dir  # noqa: E402
from tcli.engines import ENGINES, Completion  # noqa: E402

N = 4                                   # samples per prompt
PROMPTS = [{"id": f"p{i}", "prompt": f"{i}+{i}=?", "answer": str(2 * i),
            "meta": {"source": "tcli-arith"}} for i in range(1, 5)]
# correct answers per prompt (out of N) for policy versions 0, 1, 2, ...: the engine "learns"
CORRECT = {0: [0, 1, 2, 4], 1: [1, 1, 2, 4], 2: [0, 0, 0, 4], 3: [4, 4, 4, 4]}


class ScriptedEngine:
    """Answers prompt i correctly in the first CORRECT[v][i] of its N samples (v = policy version)."""

    name = "scripted"

    def __init__(self, model: str, opts, *, seed: int = 0, trainer=None):
        from transformers import AutoTokenizer

        self.model_path = model
        self.tokenizer = AutoTokenizer.from_pretrained(model)
        self.policy_version = trainer.policy_version if trainer else 0
        self.by_prompt = {}
        self.follows = 0

    def _answer(self, prompt_ids) -> tuple[int, int]:
        text = self.tokenizer.decode(list(prompt_ids), skip_special_tokens=True)
        i = int(text.split("+")[0])
        return i - 1, 2 * i

    def generate(self, prompts, n, cfg):
        out = []
        for p in prompts:
            i, answer = self._answer(p)
            good = CORRECT[min(self.policy_version, 3)][i]
            comps = []
            for j in range(n):
                text = f"#### {answer if j < good else answer + 1}"
                ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
                ids.append(self.tokenizer.eos_token_id)
                comps.append(Completion(ids, [-1.0] * len(ids), "stop"))
            out.append(comps)
        return out

    def load_weights(self, model_dir, policy_version):
        self.policy_version = policy_version

    def follow(self, trainer):
        self.follows += 1
        self.policy_version = trainer.policy_version


if "scripted" not in ENGINES:
    ENGINES.register("scripted")(ScriptedEngine)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return arith_run_dir(tmp_path_factory, "inproc", {"prompts.jsonl": PROMPTS})


def _config(model, run_dir, **flags):
    from tcli.config.loop import load_config

    d, path = model
    base = {"model": path, "train_data": str(d / "prompts.jsonl"),
            "eval_data": str(d / "prompts.jsonl"), "run_dir": str(run_dir), "steps": 4,
            "prompts_per_step": 4, "engine": "scripted", "n": N, "task": "arith", "workers": 0,
            "prompt_template": "plain", "lr": 1e-3, "estimator": "grpo", "eval_every": 1,
            "keep_last": 2, "seed": 1}
    return load_config(None, {**base, **flags})


def _run(cfg):
    from tcli.loop import run_loop

    run_loop(cfg, log=lambda s: None)
    with open(os.path.join(cfg.run.run_dir, "metrics.jsonl"), "rb") as f:
        return [orjson.loads(x) for x in f.read().splitlines()]


def _tokens(answer: int) -> int:
    return len(f"#### {answer}") + 1  # char tokenizer + EOS


def test_exact_metrics_best_and_keep_last(model, tmp_path):
    metrics = _run(_config(model, tmp_path / "run"))
    train = [m for m in metrics if m["kind"] == "train"]
    evals = [m for m in metrics if m["kind"] == "eval"]
    assert [m["step"] for m in train] == [1, 2, 3, 4]
    assert [m["step"] for m in evals] == [0, 1, 2, 3, 4]
    # sampling at step s uses policy version s - 1 (one optimizer step per train step)
    for m, v in zip(train, range(4)):
        c = CORRECT[v]
        assert m["reward_mean"] == sum(c) / (N * len(c))
        assert m["zero_variance_share"] == sum(k in (0, N) for k in c) / len(c)
        tokens = sum(a * _tokens(2 * (i + 1)) + (N - a) * _tokens(2 * (i + 1) + 1)
                     for i, a in enumerate(c))
        assert m["sampled_tokens"] == tokens
        # one branching token (the first answer digit) per response of a mixed group
        branch = sum(N for k in c if 0 < k < N)
        assert m["branch_token_share"] == branch / tokens
        assert m["groups_dropped"] == 0
    assert [m["sampled_tokens_total"] for m in train] == list(np.cumsum([m["sampled_tokens"]
                                                                         for m in train]))
    # greedy eval = sample 0 of each prompt: correct when the prompt has any correct answer
    assert [m["accuracy"] for m in evals] == [0.75, 1.0, 0.25, 1.0, 1.0]
    ckpts = sorted(os.listdir(tmp_path / "run" / "checkpoints"))
    assert ckpts == ["best", "step_3", "step_4"]
    from tcli.models.checkpoint import read_state

    assert read_state(str(tmp_path / "run" / "checkpoints" / "best"))["step"] == 4  # last of ties


def test_filter_groups_drops_zero_variance_groups(model, tmp_path):
    metrics = _run(_config(model, tmp_path / "run", filter_groups=True, steps=2, eval_every=0))
    train = [m for m in metrics if m["kind"] == "train"]
    assert [m["groups_dropped"] for m in train] == [2, 1]   # CORRECT[0]: 0 and 4; CORRECT[1]: 4
    assert train[0]["train_num_sequences"] == 2 * N and train[1]["train_num_sequences"] == 3 * N


def test_sampled_token_budget_stops_after_the_step_that_crosses_it(model, tmp_path):
    first = sum(a * _tokens(2 * (i + 1)) + (N - a) * _tokens(2 * (i + 1) + 1)
                for i, a in enumerate(CORRECT[0]))
    metrics = _run(_config(model, tmp_path / "run", max_sampled_tokens=first + 1, eval_every=3))
    train = [m for m in metrics if m["kind"] == "train"]
    assert [m["step"] for m in train] == [1, 2]
    assert train[-1]["sampled_tokens_total"] > first + 1
    # the last step of a run evaluates even when it is not a multiple of eval.every
    assert [m["step"] for m in metrics if m["kind"] == "eval"] == [0, 2]


def test_wall_budget_counts_evaluation_time(model, tmp_path):
    metrics = _run(_config(model, tmp_path / "run", max_wall_seconds=1e-6, eval_every=3))
    train = [m for m in metrics if m["kind"] == "train"]
    evals = [m for m in metrics if m["kind"] == "eval"]
    # the initial evaluation already spends the budget: no step runs
    assert train == [] and [m["step"] for m in evals] == [0]
    assert evals[0]["wall_time"] > 0
    metrics = _run(_config(model, tmp_path / "run2", max_wall_seconds=1e-6, eval_every=0))
    assert [m["step"] for m in metrics if m["kind"] == "train"] == [1]


def test_treerpo_inside_the_loop_matches_the_stage(model, tmp_path):
    """TreeRPO in the loop on a real engine's trees: the advantages written to the rollout file
    are exactly what the advantages stage computes from that file."""
    from tcli.algos.estimators import Group
    from tcli.io import RecordReader, iter_groups
    from tcli.stages.advantages import advantages_group

    cfg = _config(model, tmp_path / "run", engine="hf", mode="tree", width=2, depth=2,
                  segment_tokens=3, max_new_tokens=8, estimator="treerpo", steps=1, eval_every=0)
    _run(cfg)
    recs = [r for _, r in RecordReader(str(tmp_path / "run" / "rollouts" / "step_1.arrow"))]
    assert len(recs) == len(PROMPTS) * 4 and all(r["estimator"] == "treerpo" for r in recs)
    assert all(len(r["node_path"]) >= 1 for r in recs)
    for _, group in iter_groups(enumerate(recs, 1), "rollouts"):
        stored = [list(r["advantages"]) for r in group]
        again = advantages_group(Group.from_records([dict(r) for r in group]), cfg.advantages)
        assert stored == [r["advantages"] for r in again]


def test_save_every_writes_fewer_checkpoints_and_resume_is_exact(model, tmp_path):
    """save_every = 3 over 5 steps: checkpoints at 3 and 5 only (no eval, so no best); a run
    stopped after step 4 resumes from step 3 and ends with the same weights."""
    from safetensors.numpy import load_file

    ref = _config(model, tmp_path / "ref", steps=5, save_every=3, eval_every=0, keep_last=5)
    _run(ref)
    assert sorted(os.listdir(tmp_path / "ref" / "checkpoints")) == ["step_3", "step_5"]
    part = _config(model, tmp_path / "run", steps=4, save_every=3, eval_every=0, keep_last=5)
    _run(part)  # step 4 is the last of this run: saved
    import shutil

    shutil.rmtree(tmp_path / "run" / "checkpoints" / "step_4")  # as if killed before saving 4
    from tcli.loop import resume_config, run_loop

    run_loop(resume_config(str(tmp_path / "run"), {"steps": 5}), resume=True, log=lambda s: None)
    a = load_file(str(tmp_path / "ref" / "checkpoints" / "step_5" / "model.safetensors"))
    b = load_file(str(tmp_path / "run" / "checkpoints" / "step_5" / "model.safetensors"))
    assert all((a[k] == b[k]).all() for k in a)
    steps = [m["step"] for m in _read(tmp_path / "run") if m["kind"] == "train"]
    assert steps == [1, 2, 3, 4, 5]


def test_tensorboard_event_files(model, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb = tmp_path / "tb"
    _run(_config(model, tmp_path / "run", steps=2, eval_every=1, tensorboard=str(tb)))
    acc = EventAccumulator(str(tb))
    acc.Reload()
    rewards = [e.value for e in acc.Scalars("train/reward_mean")]
    assert rewards == pytest.approx([sum(CORRECT[0]) / 16, sum(CORRECT[1]) / 16])
    assert [e.step for e in acc.Scalars("eval/accuracy")] == [0, 1, 2]


def _read(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl"), "rb") as f:
        return [orjson.loads(x) for x in f.read().splitlines()]


def test_ppo_trains_a_critic_beside_the_policy_and_resumes_exactly(model, tmp_path):
    """estimator ppo: critic values -> GAE -> train-step + train-critic each step; critic_N is
    saved with step_N, pruned with it, and a resumed run ends with the same policy AND critic."""
    import shutil

    from safetensors.numpy import load_file

    from tcli.io import RecordReader
    from tcli.loop import resume_config, run_loop

    kw = dict(estimator="ppo", steps=3, eval_every=0, keep_last=1, critic_lr=1e-3, lam=1.0)
    metrics = _run(_config(model, tmp_path / "ref", **kw))
    ck = tmp_path / "ref" / "checkpoints"
    assert sorted(os.listdir(ck)) == ["critic_0", "critic_3", "step_3"]
    train = [m for m in metrics if m["kind"] == "train"]
    assert all(m["critic_value_loss"] > 0 and "critic_explained_variance" in m for m in train)
    assert all(m["seconds_critic"] > 0 for m in train)
    recs = [r for _, r in RecordReader(str(tmp_path / "ref" / "rollouts" / "step_2.arrow"))]
    for r in recs:  # lam = gamma = 1: returns are the reward; advantages = reward - V
        assert len(r["critic_values"]) == len(r["token_ids"]) + 1
        assert np.allclose(r["returns"], r["reward"])
        assert np.allclose(r["advantages"], r["reward"] - np.array(r["critic_values"][:-1]))
    assert any(v != 0 for r in recs for v in r["critic_values"])  # step 1 moved the critic
    _run(_config(model, tmp_path / "run", **{**kw, "steps": 2, "keep_last": 2}))
    shutil.rmtree(tmp_path / "run" / "checkpoints" / "step_2")  # killed before step 2 was saved
    run_loop(resume_config(str(tmp_path / "run"), {"steps": 3}), resume=True, log=lambda s: None)
    for name in ("step_3", "critic_3"):
        a = load_file(str(ck / name / "model.safetensors"))
        b = load_file(str(tmp_path / "run" / "checkpoints" / name / "model.safetensors"))
        assert all((a[k] == b[k]).all() for k in a), name


def test_whiten_in_the_loop(model, tmp_path):
    """advantages.whiten: the step's advantages have mean 0 and std 1 over all its tokens."""
    from tcli.io import RecordReader

    _run(_config(model, tmp_path / "run", estimator="ppo", whiten=True, steps=1, eval_every=0))
    recs = [r for _, r in RecordReader(str(tmp_path / "run" / "rollouts" / "step_1.arrow"))]
    flat = np.concatenate([r["advantages"] for r in recs])
    assert abs(flat.mean()) < 1e-6 and abs(flat.std() - 1.0) < 1e-4
