"""`tcli loop` in process, with a scripted engine whose answers are known in advance, so every
metric is exact: rewards, zero-variance share, branching tokens, dropped groups, token budgets,
evaluation accuracy, best/ selection and keep_last pruning. The trainer is the real one."""

from __future__ import annotations

import os

import numpy as np
import orjson
import pytest

from conftest import CORRECT, LOOP_N as N, LOOP_PROMPTS as PROMPTS, loop_config as _config
from conftest import read_metrics as _read


def _run(cfg):
    from tcli.loop import run_loop

    run_loop(cfg, log=lambda s: None)
    with open(os.path.join(cfg.run.run_dir, "metrics.jsonl"), "rb") as f:
        return [orjson.loads(x) for x in f.read().splitlines()]


def _tokens(answer: int) -> int:
    return len(f"#### {answer}") + 1  # char tokenizer + EOS


def test_exact_metrics_best_and_keep_last(loop_model, tmp_path):
    metrics = _run(_config(loop_model, tmp_path / "run"))
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


def test_checkpoint_steps_are_ordered_as_numbers(tmp_path):
    """Steps 2, 9, 10 sort numerically (as text "10" < "2" < "9"): resume starts from step 10,
    and keep_last = 1 keeps step_10. A directory without its state file is not complete."""
    from tcli.loop.rundir import RunDir
    from tcli.models.checkpoint import STATE_FILE

    run = RunDir(str(tmp_path))
    (tmp_path / "config.toml").write_text("")
    for step in (2, 9, 10):
        os.makedirs(run.ckpt(step))
        (tmp_path / "checkpoints" / f"step_{step}" / STATE_FILE).write_text("{}")
    os.makedirs(run.ckpt(11))  # a checkpoint cut short before its state file
    assert run.complete_steps() == [2, 9, 10]
    assert run.check_resumable() == 10
    run.prune(keep_last=1)
    assert sorted(os.listdir(run.checkpoints)) == ["step_10", "step_11"]


def test_filter_groups_drops_zero_variance_groups(loop_model, tmp_path):
    metrics = _run(_config(loop_model, tmp_path / "run", filter_groups=True, steps=2, eval_every=0))
    train = [m for m in metrics if m["kind"] == "train"]
    assert [m["groups_dropped"] for m in train] == [2, 1]   # CORRECT[0]: 0 and 4; CORRECT[1]: 4
    assert train[0]["train_num_sequences"] == 2 * N and train[1]["train_num_sequences"] == 3 * N


def test_sampled_token_budget_stops_after_the_step_that_crosses_it(loop_model, tmp_path):
    first = sum(a * _tokens(2 * (i + 1)) + (N - a) * _tokens(2 * (i + 1) + 1)
                for i, a in enumerate(CORRECT[0]))
    metrics = _run(_config(loop_model, tmp_path / "run", max_sampled_tokens=first + 1, eval_every=3))
    train = [m for m in metrics if m["kind"] == "train"]
    assert [m["step"] for m in train] == [1, 2]
    assert train[-1]["sampled_tokens_total"] > first + 1
    # the last step of a run evaluates even when it is not a multiple of eval.every
    assert [m["step"] for m in metrics if m["kind"] == "eval"] == [0, 2]


def test_wall_budget_counts_evaluation_time(loop_model, tmp_path):
    metrics = _run(_config(loop_model, tmp_path / "run", max_wall_seconds=1e-6, eval_every=3))
    train = [m for m in metrics if m["kind"] == "train"]
    evals = [m for m in metrics if m["kind"] == "eval"]
    # the initial evaluation already spends the budget: no step runs
    assert train == [] and [m["step"] for m in evals] == [0]
    assert evals[0]["wall_time"] > 0
    metrics = _run(_config(loop_model, tmp_path / "run2", max_wall_seconds=1e-6, eval_every=0))
    assert [m["step"] for m in metrics if m["kind"] == "train"] == [1]


def test_treerpo_inside_the_loop_matches_the_stage(loop_model, tmp_path):
    """TreeRPO in the loop on a real engine's trees: the advantages written to the rollout file
    are exactly what the advantages stage computes from that file."""
    from tcli.algos.estimators import Group
    from tcli.io import RecordReader, iter_groups
    from tcli.stages.advantages import advantages_group

    cfg = _config(loop_model, tmp_path / "run", engine="hf", mode="tree", width=2, depth=2,
                  segment_tokens=3, max_new_tokens=8, estimator="treerpo", steps=1, eval_every=0,
                  n=None)  # a tree's leaves come from width and depth: no n
    _run(cfg)
    recs = [r for _, r in RecordReader(str(tmp_path / "run" / "rollouts" / "step_1.arrow"))]
    assert len(recs) == len(PROMPTS) * 4 and all(r["estimator"] == "treerpo" for r in recs)
    assert all(len(r["node_path"]) >= 1 for r in recs)
    for _, group in iter_groups(enumerate(recs, 1), "rollouts"):
        stored = [list(r["advantages"]) for r in group]
        again = advantages_group(Group.from_records([dict(r) for r in group]), cfg.advantages)
        assert stored == [r["advantages"] for r in again]


def test_save_every_writes_fewer_checkpoints_and_resume_is_exact(loop_model, tmp_path):
    """save_every = 3 over 5 steps: checkpoints at 3 and 5 only (no eval, so no best); a run
    stopped after step 4 resumes from step 3 and ends with the same weights."""
    from safetensors.numpy import load_file

    ref = _config(loop_model, tmp_path / "ref", steps=5, save_every=3, eval_every=0, keep_last=5)
    _run(ref)
    assert sorted(os.listdir(tmp_path / "ref" / "checkpoints")) == ["step_3", "step_5"]
    part = _config(loop_model, tmp_path / "run", steps=4, save_every=3, eval_every=0, keep_last=5)
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


def test_a_resume_with_another_eval_size_starts_the_best_anew(loop_model, tmp_path):
    """Step 1's eval of 4 prompts scored 1.0; resumed with eval_limit 1, step 2 scores 0.0 on
    prompt p1 alone (CORRECT[2][0] = 0). The two accuracies measure different things: the best
    is taken among the evals of this run's size, so step 2 is best/, and the log says why."""
    from tcli.loop import resume_config, run_loop
    from tcli.models.checkpoint import read_state

    _run(_config(loop_model, tmp_path / "run", steps=1))
    said: list[str] = []
    run_loop(resume_config(str(tmp_path / "run"), {"steps": 2, "eval_limit": 1}), resume=True,
             log=said.append)
    evals = [(m["step"], m["prompts"], m["accuracy"]) for m in _read(tmp_path / "run")
             if m["kind"] == "eval"]
    assert evals == [(0, 4, 0.75), (1, 4, 1.0), (2, 1, 0.0)]
    assert read_state(str(tmp_path / "run" / "checkpoints" / "best"))["step"] == 2
    assert any("best eval accuracy starts anew: 2 earlier eval(s)" in s for s in said), said


def test_tensorboard_event_files(loop_model, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb = tmp_path / "tb"
    _run(_config(loop_model, tmp_path / "run", steps=2, eval_every=1, tensorboard=str(tb)))
    acc = EventAccumulator(str(tb))
    acc.Reload()
    rewards = [e.value for e in acc.Scalars("train/reward_mean")]
    assert rewards == pytest.approx([sum(CORRECT[0]) / 16, sum(CORRECT[1]) / 16])
    assert [e.step for e in acc.Scalars("eval/accuracy")] == [0, 1, 2]


def test_ppo_trains_a_critic_beside_the_policy_and_resumes_exactly(loop_model, tmp_path):
    """estimator ppo: critic values -> GAE -> train-step + train-critic each step; critic_N is
    saved with step_N, pruned with it, and a resumed run ends with the same policy AND critic."""
    import shutil

    from safetensors.numpy import load_file

    from tcli.io import RecordReader
    from tcli.loop import resume_config, run_loop

    kw = dict(estimator="ppo", steps=3, eval_every=0, keep_last=1, critic_lr=1e-3, lam=1.0)
    metrics = _run(_config(loop_model, tmp_path / "ref", **kw))
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
    _run(_config(loop_model, tmp_path / "run", **{**kw, "steps": 2, "keep_last": 2}))
    shutil.rmtree(tmp_path / "run" / "checkpoints" / "step_2")  # killed before step 2 was saved
    run_loop(resume_config(str(tmp_path / "run"), {"steps": 3}), resume=True, log=lambda s: None)
    for name in ("step_3", "critic_3"):
        a = load_file(str(ck / name / "model.safetensors"))
        b = load_file(str(tmp_path / "run" / "checkpoints" / name / "model.safetensors"))
        assert all((a[k] == b[k]).all() for k in a), name


def test_whiten_in_the_loop(loop_model, tmp_path):
    """advantages.whiten: the step's advantages have mean 0 and std 1 over all its tokens."""
    from tcli.io import RecordReader

    _run(_config(loop_model, tmp_path / "run", estimator="ppo", whiten=True, steps=1, eval_every=0))
    recs = [r for _, r in RecordReader(str(tmp_path / "run" / "rollouts" / "step_1.arrow"))]
    flat = np.concatenate([r["advantages"] for r in recs])
    assert abs(flat.mean()) < 1e-6 and abs(flat.std() - 1.0) < 1e-4


def test_reinforce_pp_baseline_in_the_loop(loop_model, tmp_path):
    """REINFORCE++-baseline (docs/design.md §4.14): r minus its group's mean, normalised over
    every token of the step (all groups), and the step's mean |A| is that of the normalised advantages."""
    from tcli.io import RecordReader

    metrics = _run(_config(loop_model, tmp_path / "run", estimator="reinforce_pp_baseline",
                           steps=1, eval_every=0))
    recs = [r for _, r in RecordReader(str(tmp_path / "run" / "rollouts" / "step_1.arrow"))]
    base = {}
    for r in recs:
        base.setdefault(r["prompt_id"], []).append(r["reward"])
    centred = [r["reward"] - np.mean(base[r["prompt_id"]]) for r in recs]
    flat = np.concatenate([[c] * len(r["token_ids"]) for c, r in zip(centred, recs)])
    for c, r in zip(centred, recs):
        want = (c - flat.mean()) / (flat.std() + 1e-8)
        np.testing.assert_allclose(r["advantages"], [want] * len(r["token_ids"]), atol=1e-12)
    got = np.concatenate([r["advantages"] for r in recs])
    assert metrics[0]["mean_abs_advantage"] == pytest.approx(np.abs(got).mean(), rel=1e-12)


def test_algorithm_options_reach_the_loop(loop_model, tmp_path):
    """The loop's [advantages] overlong_* and [train] ratio_level, mask_truncated, tis_cap keys
    (docs/design.md §4.13-4.16): shaped rewards in the records, the mismatch in the step's
    metrics (the scripted engine records log-probs of -1, far from the trainer's)."""
    from tcli.io import RecordReader

    metrics = _run(_config(loop_model, tmp_path / "run", steps=1, eval_every=0,
                           max_new_tokens=12, overlong_buffer=8, overlong_penalty=0.5,
                           ratio_level="sequence", mask_truncated=True, tis_cap=2.0))
    recs = [r for _, r in RecordReader(str(tmp_path / "run" / "rollouts" / "step_1.arrow"))]
    for r in recs:
        n = len(r["token_ids"])
        assert r["max_new_tokens"] == 12 and r["reward"] in (0.0, 1.0)
        assert r["overlong_penalty"] == pytest.approx(0.5 * min(0.0, (12 - 8 - n) / 8))
    m = metrics[0]
    assert m["train_mismatch_abs_logp"] > 0.1 and m["train_truncated_share"] == 0.0
    # the random model gives every token far less than e^-1: all ratios < 1, none capped
    assert m["train_tis_capped_frac"] == 0.0 and m["train_mismatch_ratio_max"] < 1.0


def test_the_step_line_says_when_the_sampler_ran_another_policy():
    """An engine that did not get the trained weights samples log-probs far from the trainer's:
    the step's log line says so (the step itself runs)."""
    from tcli.loop.steps import format_step

    m = {"step": 3, "reward_mean": 0.5, "zero_variance_share": 0.25, "branch_token_share": 0.1,
         "wall_time": 12.0, "mismatch_abs_logp": 0.02}
    assert format_step([m]) == "step    3  reward 0.500  zero-var 0.25  branch 0.10  12s"
    line = format_step([{**m, "mismatch_abs_logp": 3.5}])
    assert line.splitlines()[1] == ("warning: the sampled log-probs differ from the trained "
                                    "model's by 3.5 nats per token (mismatch_abs_logp): were they "
                                    "sampled by another model?")


def test_step_prompts_are_a_function_of_seed_and_step():
    """Each step draws its own prompts (not the same ones every step), and the same ones again
    for the same (seed, step): a resumed step repeats them."""
    from tcli.loop.steps import step_prompts

    pool = [{"id": f"p{i}"} for i in range(10)]
    draws = [[p["id"] for p in step_prompts(pool, 3, 5, s)] for s in range(1, 9)]
    assert len({tuple(d) for d in draws}) > 1 and all(len(set(d)) == 3 for d in draws)
    assert draws[2] == [p["id"] for p in step_prompts(pool, 3, 5, 3)]
    assert [p["id"] for p in step_prompts(pool, 3, 6, 3)] != draws[2] or \
        [p["id"] for p in step_prompts(pool, 3, 7, 3)] != draws[2]
    assert all(step_prompts(pool, k, 5, 1) == pool for k in (10, 12))  # all: the file order


def test_a_budget_is_reached_at_equality_and_0_is_no_limit():
    """max_wall_seconds and max_sampled_tokens stop the run once reached (as a resume refuses
    a run whose metrics reached them); ``pending`` counts the current step's seconds."""
    from tcli.loop.steps import Budget

    assert Budget(10, 0, elapsed=10).exhausted() == "wall-clock budget reached at 10s"
    assert Budget(10, 0, elapsed=9.5).exhausted() is None
    assert Budget(10, 0, elapsed=9.5).exhausted(pending=0.5) is not None
    assert Budget(0, 100, sampled=100).exhausted() == "sampled-token budget reached (100 tokens)"
    assert Budget(0, 100, sampled=99).exhausted() is None
    assert Budget(0, 0, elapsed=1e9, sampled=10**12).exhausted(pending=1e9) is None


def test_the_step_line_adds_the_steps_eval_accuracy():
    from tcli.loop.steps import format_step

    m = {"step": 2, "reward_mean": 0.5, "zero_variance_share": 0.25, "branch_token_share": 0.1,
         "wall_time": 3.0}
    assert format_step([m, {"kind": "eval", "step": 2, "accuracy": 0.75}]) == (
        "step    2  reward 0.500  zero-var 0.25  branch 0.10  3s  eval acc 0.750")


def test_a_step_timer_adds_up_every_span_of_a_name():
    """Refill rounds and [expand] time "sample" several times a step: the spans add up."""
    import time

    from tcli.loop.steps import StepTimer

    timer = StepTimer()
    for _ in range(2):
        with timer("sample"):
            time.sleep(0.02)
    with timer("verify"):
        pass
    assert timer.seconds["sample"] >= 0.04 and set(timer.seconds) == {"sample", "verify"}


def test_the_step_the_wall_budget_ends_on_is_evaluated_and_saved(loop_model, tmp_path, monkeypatch):
    """The clock can run out after a step was found not to be the last (here: writing step 1's
    metrics takes 100 s of a 50 s budget). The run still ends on a step that is evaluated and
    saved, never on one that is neither, so a resume knows the run stopped on its budget."""
    from types import SimpleNamespace

    import tcli.loop.loop as lp
    from tcli.errors import UsageError
    from tcli.loop import resume_config, run_loop

    offset, real, publish = [0.0], lp.time.perf_counter, lp.Loop._publish

    def slow_publish(self, records):
        publish(self, records)
        if records[0]["kind"] == "train":
            offset[0] += 100.0

    monkeypatch.setattr(lp, "time", SimpleNamespace(perf_counter=lambda: real() + offset[0]))
    monkeypatch.setattr(lp.Loop, "_publish", slow_publish)
    metrics = _run(_config(loop_model, tmp_path / "run", max_wall_seconds=50, save_every=3,
                           eval_every=3))
    assert [(m["kind"], m["step"]) for m in metrics] == [("eval", 0), ("train", 1),
                                                         ("train", 2), ("eval", 2)]
    assert "step_2" in os.listdir(tmp_path / "run" / "checkpoints")
    with pytest.raises(UsageError, match="stopped at step 2 on its wall-clock budget"):
        run_loop(resume_config(str(tmp_path / "run"), {}), resume=True, log=lambda s: None)


def test_a_resumed_run_continues_its_clocks_and_its_best(loop_model, tmp_path):
    """Resumed after step 1, the run's sampled tokens and seconds go on from step 1's, and step
    2's eval (0.25) does not replace the best of step 1 (1.0) as best/."""
    from tcli.loop import resume_config, run_loop
    from tcli.models.checkpoint import read_state

    _run(_config(loop_model, tmp_path / "run", steps=1))
    run_loop(resume_config(str(tmp_path / "run"), {"steps": 2}), resume=True, log=lambda s: None)
    train = [m for m in _read(tmp_path / "run") if m["kind"] == "train"]
    assert [m["sampled_tokens_total"] for m in train] == list(np.cumsum([m["sampled_tokens"]
                                                                         for m in train]))
    assert train[1]["wall_time"] >= train[0]["wall_time"] + train[1]["seconds_train"]
    assert [(m["kind"], m["step"], m.get("accuracy")) for m in _read(tmp_path / "run")] == [
        ("eval", 0, 0.75), ("train", 1, None), ("eval", 1, 1.0), ("train", 2, None),
        ("eval", 2, 0.25)]  # as a run without the resume writes them: a step's train first
    assert read_state(str(tmp_path / "run" / "checkpoints" / "best"))["step"] == 1


def test_the_initial_eval_counts_towards_the_best(loop_model, tmp_path):
    """Step 0 scores 0.75 and step 2, the only other eval, 0.25: no step beat the model the run
    started from, so there is no best/."""
    metrics = _run(_config(loop_model, tmp_path / "run", steps=2, eval_every=2))
    assert [m["accuracy"] for m in metrics if m["kind"] == "eval"] == [0.75, 0.25]
    assert sorted(os.listdir(tmp_path / "run" / "checkpoints")) == ["step_1", "step_2"]


def test_the_seconds_of_saving_a_step_count_from_the_next_record_on(loop_model, tmp_path,
                                                                     monkeypatch):
    from types import SimpleNamespace

    import tcli.loop.loop as lp

    offset, real, save = [0.0], lp.time.perf_counter, lp.Loop._save

    def slow_save(self, *args):  # each checkpoint takes 100 s
        save(self, *args)
        offset[0] += 100.0

    monkeypatch.setattr(lp, "time", SimpleNamespace(perf_counter=lambda: real() + offset[0]))
    monkeypatch.setattr(lp.Loop, "_save", slow_save)
    metrics = _run(_config(loop_model, tmp_path / "run", steps=2, eval_every=0))
    first, second = (m["wall_time"] for m in metrics if m["kind"] == "train")
    assert first < 100 <= second - first


def test_a_failure_between_critic_and_policy_leaves_no_step_without_its_critic(
        loop_model, tmp_path, monkeypatch):
    """PPO writes critic_N before step_N: a run that fails between the two leaves step 1 as its
    last complete step (with critic_1 to resume from), never a step_2 without its critic_2."""
    from tcli.loop.rundir import RunDir
    from tcli.train.critic import CriticTrainer
    from tcli.train.trainer import Trainer

    def save(self, out_dir, extra_state=None, **kw):
        if extra_state["step"] == 2:
            raise OSError("no space left on device")
        return Trainer.save(self, out_dir, extra_state, **kw)

    monkeypatch.setattr(CriticTrainer, "save", save)
    with pytest.raises(OSError, match="no space left"):
        _run(_config(loop_model, tmp_path / "run", estimator="ppo", steps=2, eval_every=0,
                     keep_last=5))
    assert RunDir(str(tmp_path / "run")).complete_steps() == [1]
    assert os.path.isdir(tmp_path / "run" / "checkpoints" / "critic_1")


def test_a_run_started_again_keeps_its_config_toml(loop_model, tmp_path):
    """A resume of a run with no complete checkpoint starts it again with its config.toml, which
    keeps its own values: the resume's flags are that invocation's only."""
    import shutil

    from tcli.loop import resume_config, run_loop

    _run(_config(loop_model, tmp_path / "run", steps=1, eval_every=0))
    before = (tmp_path / "run" / "config.toml").read_bytes()
    shutil.rmtree(tmp_path / "run" / "checkpoints")  # as if killed before its first checkpoint
    run_loop(resume_config(str(tmp_path / "run"), {"steps": 2}), resume=True, log=lambda s: None)
    assert (tmp_path / "run" / "config.toml").read_bytes() == before
    assert [m["step"] for m in _read(tmp_path / "run") if m["kind"] == "train"] == [1, 2]


def test_the_batch_holds_exactly_the_records_of_the_groups_that_train():
    """Groups of 2, 3 and 1 records: a dropped group's records are skipped, and the next group's
    are taken from where it starts (records sit group after group)."""
    from types import SimpleNamespace

    from tcli.config.loop import load_config
    from tcli.loop.loop import Loop
    from tcli.stages.advantages import AdvantageStats

    loop = SimpleNamespace(cfg=load_config(None, {"filter_groups": True}))
    recs = [{"prompt_id": g, "sample_id": j} for g, n in (("a", 2), ("b", 3), ("c", 1))
            for j in range(n)]
    groups = [(2, AdvantageStats(), False), (3, AdvantageStats(), True),
              (1, AdvantageStats(), True)]
    batch, m = Loop.batch(loop, recs, groups)  # filter_groups: the uninformative a is dropped
    assert [(r["prompt_id"], r["sample_id"]) for r in batch] == [("b", 0), ("b", 1), ("b", 2),
                                                                  ("c", 0)]
    assert m["groups_dropped"] == 1
    batch, m = Loop.batch(loop, recs, groups, keep=[True, False, True])  # refill's choice
    assert [(r["prompt_id"], r["sample_id"]) for r in batch] == [("a", 0), ("a", 1), ("c", 0)]
    assert m["groups_dropped"] == 1


def test_a_best_step_is_saved_whatever_save_every_says(loop_model, tmp_path):
    """save_every = 3 over 2 steps: step 1 (eval 1.0) is the best, so it is saved and copied to
    best/; step 2 is saved as the last."""
    from tcli.models.checkpoint import read_state

    _run(_config(loop_model, tmp_path / "run", steps=2, save_every=3, keep_last=5))
    assert sorted(os.listdir(tmp_path / "run" / "checkpoints")) == ["best", "step_1", "step_2"]
    assert read_state(str(tmp_path / "run" / "checkpoints" / "best"))["step"] == 1


@pytest.mark.parametrize("index, where", [(0, ("train.jsonl", 1)), (1, ("train.jsonl", 7)),
                                          (2, (None, None)), (-1, (None, None))])
def test_a_prompt_the_sampler_refuses_is_named_by_its_file_and_line(index, where):
    """The first prompt as well as any other: its index among the step's prompts leads to where
    it was read; an index outside them names nothing rather than another prompt."""
    from types import SimpleNamespace

    from tcli.errors import DataError
    from tcli.loop.loop import Loop

    prompts = [{"id": "a"}, {"id": "b"}]
    loop = SimpleNamespace(record_no={id(prompts[0]): ("train.jsonl", 1),
                                      id(prompts[1]): ("train.jsonl", 7)})
    e = DataError("bad prompt", field="prompt")
    e.index = index
    assert Loop._locate(loop, e, prompts) is e and (e.file, e.line) == where


def test_a_ppo_run_started_again_makes_its_critic_anew(loop_model, tmp_path):
    """Killed before its first checkpoint, a PPO run keeps critic_0, which the restart removes
    with the rest of what the run wrote: the run starts again with a new critic_0."""
    import shutil

    from tcli.loop import resume_config, run_loop

    ck = tmp_path / "run" / "checkpoints"
    _run(_config(loop_model, tmp_path / "run", estimator="ppo", steps=1, eval_every=0))
    for name in ("step_1", "critic_1"):
        shutil.rmtree(ck / name)
    run_loop(resume_config(str(tmp_path / "run"), {}), resume=True, log=lambda s: None)
    assert sorted(os.listdir(ck)) == ["critic_0", "critic_1", "step_1"]


def test_a_step_whose_groups_are_all_dropped_trains_nothing(loop_model, tmp_path):
    """Step 3 samples with policy version 2, whose groups are all right or all wrong:
    filter_groups drops all 4, so the step has no train_ metrics and leaves the weights as they
    were. tokens_per_s_sample is the step's sampled tokens over its sampling seconds (rounded to
    4 decimals)."""
    from safetensors.numpy import load_file

    train = [m for m in _run(_config(loop_model, tmp_path / "run", filter_groups=True, steps=3,
                                     eval_every=0)) if m["kind"] == "train"]
    assert [m["groups_dropped"] for m in train] == [2, 1, 4]
    assert "train_loss" in train[1] and not any(k.startswith("train_") for k in train[2])
    a, b = (load_file(str(tmp_path / "run" / "checkpoints" / f"step_{s}" / "model.safetensors"))
            for s in (2, 3))
    assert all((a[k] == b[k]).all() for k in a)
    for m in train:
        s, n = m["seconds_sample"], m["sampled_tokens"]
        assert n / (s + 5e-5) <= m["tokens_per_s_sample"] <= n / max(s - 5e-5, 1e-9)
