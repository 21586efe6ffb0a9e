"""`tcli loop`: sample -> verify -> advantages -> train-step in one process, per step.

The loop calls the same stage functions as the commands, with the same option objects. Every
step's randomness derives from (seed, step), so a run killed at any moment and resumed from its
last complete step ends with the same checkpoint as an uninterrupted run.
"""

from __future__ import annotations

import os
import random
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable

from tcli.config.loop import LoopConfig, dump_toml, load_config
from tcli.errors import UsageError
from tcli.io import RecordWriter, write_atomic_bytes
from tcli.loop.rundir import RunDir
from tcli.prompts import read_prompts


def step_prompts(prompts: list[dict], k: int, seed: int, step: int) -> list[dict]:
    """The prompts of one step: a deterministic function of (seed, step), so resume repeats it."""
    rng = random.Random(f"{seed}:{step}")
    if k >= len(prompts):
        return list(prompts)
    return rng.sample(prompts, k)


def step_seed(seed: int, step: int, evaluation: bool = False) -> int:
    return (seed * 1_000_003 + step * 7919 + int(evaluation)) % (2**31)


@dataclass
class Budget:
    """When the run stops besides ``steps``: wall time (everything counted) and sampled tokens."""

    max_wall_seconds: float
    max_sampled_tokens: int
    elapsed: float = 0.0
    sampled: int = 0

    def exhausted(self, pending: float = 0.0) -> str | None:
        """Why the run must stop (``pending``: seconds of the current step not yet counted)."""
        if self.max_wall_seconds and self.elapsed + pending >= self.max_wall_seconds:
            return f"wall-clock budget reached at {self.elapsed + pending:.0f}s"
        if self.max_sampled_tokens and self.sampled >= self.max_sampled_tokens:
            return f"sampled-token budget reached ({self.sampled} tokens)"
        return None


@dataclass
class StepTimer:
    seconds: dict = field(default_factory=dict)

    @contextmanager
    def __call__(self, name: str):
        t = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t


class Loop:
    """Owns the engine, trainer and run directory of one training run."""

    def __init__(self, cfg: LoopConfig, log: Callable[[str], None] = lambda s: None,
                 on_step: Callable[[list[dict]], None] | None = None):
        """Everything that can be checked without touching disk is checked here."""
        self.cfg = cfg
        self.log = log
        self.on_step = on_step
        self.sink = None
        self.verify_pool = None
        self.critic = None
        if cfg.run.tensorboard:
            from tcli.loop.tensorboard import check_available

            check_available()
        self.run = RunDir(cfg.run.run_dir, warn=log)
        if not cfg.run.model or not os.path.isdir(cfg.run.model):
            raise UsageError(f"model directory not found: {cfg.run.model!r}")
        self.train_prompts = read_prompts(cfg.run.train_data, fields=cfg.prompts)
        ev = cfg.eval
        self.eval_prompts = (read_prompts(cfg.run.eval_data, ev.limit or None, cfg.prompts)
                             if cfg.run.eval_data and ev.every else [])
        self.best = -1.0

    # -- start ---------------------------------------------------------------------------
    def start(self, resume: bool) -> int:
        """Take the run directory, load trainer and engine; return the first step to run."""
        from tcli.engines import open_engine
        from tcli.train.trainer import Trainer

        self.run.acquire()
        if resume:
            last = self.run.check_resumable()
            start_ckpt = self.run.ckpt(last)
            self._restore_metrics(last)
            self.log(f"resuming from step {last} ({start_ckpt})")
        else:
            self.run.check_fresh()
            last, start_ckpt = 0, self.cfg.run.model
            write_atomic_bytes(self.run.config, dump_toml(self.cfg).encode())
            self.run.write_metrics([])
        self.run.make_dirs()
        # verifier workers fork now, before any model exists, and serve every step
        from tcli.stages.verify import start_pool

        v = self.cfg.verify
        self.verify_pool = start_pool(v.task, v.timeout, v.workers)
        from tcli.config.stages import ThreadOptions

        ThreadOptions(self.cfg.run.threads).apply()  # before any model runs
        if self.cfg.run.tensorboard:
            from tcli.loop.tensorboard import TensorBoardSink

            self.sink = TensorBoardSink(self.cfg.run.tensorboard)
        self.trainer = Trainer(start_ckpt, self.cfg.train, seed=self.cfg.run.seed)
        self.critic = self._start_critic(last, resume)
        self.engine = open_engine(start_ckpt, self.cfg.sample, seed=self.cfg.run.seed,
                                  trainer=self.trainer)
        return last + 1

    def _start_critic(self, last: int, resume: bool):
        """PPO (estimator gae/ppo): the critic beside the policy: on resume the one saved with the
        last step, else [critic] model or a new critic from the policy (checkpoints/critic_0)."""
        from tcli.algos.estimators import CRITIC_ESTIMATORS

        if self.cfg.advantages.estimator not in CRITIC_ESTIMATORS:
            return None
        from tcli.models.critic import init_critic
        from tcli.train.critic import CriticTrainer

        c = self.cfg.critic
        path = self.run.critic_ckpt(last)
        if not resume and c.model:
            path = c.model
        elif not resume:
            init_critic(self.cfg.run.model, path)
        return CriticTrainer(path, c.update_options(), seed=self.cfg.run.seed)

    def _restore_metrics(self, last: int) -> None:
        """Keep metrics of completed steps only; restore a step's line lost between checkpoint
        and metrics append from the copy kept in its checkpoint state."""
        from tcli.models.checkpoint import read_state

        kept = [m for m in self.run.read_metrics() if m.get("step", 0) <= last]
        have = {(m.get("kind"), m.get("step")) for m in kept}
        for m in read_state(self.run.ckpt(last)).get("metrics", []):
            if (m.get("kind"), m.get("step")) not in have:
                kept.append(m)
        kept.sort(key=lambda m: (m.get("step", 0), m.get("kind") != "train"))
        self.run.write_metrics(kept)

    # -- stages --------------------------------------------------------------------------
    def sample(self, prompts: list[dict], step: int) -> list[dict]:
        from tcli.stages.sample import sample_records

        return list(sample_records(self.engine, prompts, self.cfg.sample,
                                   seed=step_seed(self.cfg.run.seed, step)))

    def verify(self, records: list[dict]) -> list[dict]:
        from tcli.stages.verify import verify_records

        v = self.cfg.verify
        return list(verify_records(iter(enumerate(records, 1)), "<loop>", task=v.task,
                                   timeout=v.timeout, workers=v.workers, pool=self.verify_pool))

    def advantages(self, records: list[dict]) -> tuple[list[dict], dict]:
        """Advantages per group (the tree is built once and written for show-tree); drops
        zero-variance groups with ``filter_groups``."""
        from tcli.algos.estimators import Group
        from tcli.io import iter_groups
        from tcli.stages.advantages import AdvantageStats, advantages_group
        from tcli.stages.tree import write_tree

        stats = AdvantageStats()
        kept, dropped = [], 0
        if self.critic is not None:
            self._add_critic_values(records)
        for _, recs in iter_groups(enumerate(records, 1), "<loop>"):
            group = Group.from_records(recs)
            advantages_group(group, self.cfg.advantages, stats)
            write_tree(group)
            if self.cfg.run.filter_groups and len(set(group.rewards.tolist())) < 2:
                dropped += 1
                continue
            kept.extend(recs)
        if self.cfg.advantages.whiten:
            from tcli.stages.advantages import whiten

            whiten(kept)
        return kept, {**stats.summary(), "groups_dropped": dropped}

    def _add_critic_values(self, records: list[dict]) -> None:
        """``critic_values`` of every rollout from the current critic (as `tcli values`)."""
        import numpy as np

        from tcli.models.critic import critic_values

        vals = critic_values(self.critic.model, [np.asarray(r["prompt_token_ids"]) for r in records],
                             [np.asarray(r["token_ids"]) for r in records],
                             device=self.critic.device,
                             micro_batch_tokens=self.cfg.critic.micro_batch_tokens,
                             pad_id=self.critic.pad_id)
        for rec, v in zip(records, vals):
            rec["critic_values"] = v.tolist()

    def evaluate(self, step: int) -> dict | None:
        """An eval metrics record, or None when the run has no eval data."""
        from tcli.stages.evaluate import evaluate

        if not self.eval_prompts:
            return None
        c = self.cfg
        _, summary = evaluate(self.engine, self.eval_prompts, c.sample, c.verify, c.eval,
                              seed=step_seed(c.run.seed, step, evaluation=True),
                              pool=self.verify_pool)
        return {"kind": "eval", "step": step, **summary}

    # -- steps ---------------------------------------------------------------------------
    def train_step(self, step: int, budget: Budget) -> dict:
        """Sample, verify, advantages, train, follow: the step's train metrics record."""
        timer = StepTimer()
        prompts = step_prompts(self.train_prompts, self.cfg.run.prompts_per_step,
                               self.cfg.run.seed, step)
        with timer("sample"):
            rollouts = self.sample(prompts, step)
        with timer("verify"):
            rollouts = self.verify(rollouts)
        with timer("advantages"):
            batch, adv = self.advantages(rollouts)
        with timer("train"):
            train = self.trainer.step(batch) if batch else {}
            self.engine.follow(self.trainer)
        critic = {}
        if self.critic is not None:
            with timer("critic"):
                critic = self.critic.step(batch) if batch else {}
        with timer("write"):
            with RecordWriter(self.run.rollout_file(step)) as w:
                w.write_all(rollouts)
        from tcli.stages.sample import token_counts

        sampled, leaf = token_counts(rollouts)  # tree mode: shared segments count once
        budget.sampled += sampled
        return {
            "kind": "train", "step": step, "sampled_tokens": sampled, "leaf_tokens": leaf,
            "sampled_tokens_total": budget.sampled,
            **{k: adv[k] for k in ("reward_mean", "zero_variance_share", "branch_token_share",
                                   "mean_abs_advantage", "groups_dropped")},
            **{f"train_{k}": v for k, v in train.items() if isinstance(v, (int, float))},
            **{f"critic_{k}": v for k, v in critic.items() if isinstance(v, (int, float))
               and k not in ("step", "lr")},
            **{f"seconds_{k}": round(v, 4) for k, v in timer.seconds.items()},
            "tokens_per_s_sample": sampled / max(timer.seconds["sample"], 1e-9),
        }

    def run_step(self, step: int, budget: Budget) -> list[dict]:
        """One step, its evaluation when due, the checkpoint when due; every second counts to
        the budget."""
        t0 = time.perf_counter()
        records = [self.train_step(step, budget)]
        every = self.cfg.eval.every
        if every and (step % every == 0 or self._final(step, budget, t0)):
            ev = self.evaluate(step)
            if ev is not None:
                records.append(ev)
        is_best = self._note_best(records)
        save = is_best or step % self.cfg.run.save_every == 0 or self._final(step, budget, t0)
        t1 = time.perf_counter()
        budget.elapsed += t1 - t0
        for m in records:
            m["wall_time"] = round(budget.elapsed, 3)
            m["sampled_tokens_total"] = budget.sampled
        if save:
            self._save(step, records, is_best)
        for m in records:
            self.run.append_metrics(m)
        if self.sink is not None:
            self.sink.write(records)
        budget.elapsed += time.perf_counter() - t1  # saving counts too (from the next record on)
        return records

    def _final(self, step: int, budget: Budget, t0: float) -> bool:
        return step == self.cfg.run.steps or budget.exhausted(time.perf_counter() - t0) is not None

    def _save(self, step: int, records: list[dict], is_best: bool) -> None:
        if self.critic is not None:  # first: a complete step_N always has its critic_N
            self.critic.save(self.run.critic_ckpt(step), {"step": step})
        self.trainer.save(self.run.ckpt(step), {"step": step, "metrics": records,
                                                "loop_config": self.cfg.to_dict()})
        if is_best:
            self.run.set_best(step)
        self.run.prune(self.cfg.run.keep_last)

    def _note_best(self, records: list[dict]) -> bool:
        evals = [m for m in records if m["kind"] == "eval"]
        if not evals or evals[-1]["accuracy"] < self.best:
            return False
        self.best = evals[-1]["accuracy"]
        return True

    def run_steps(self, first: int) -> dict:
        """Steps ``first``..``steps`` until a budget ends the run; a resumed run continues its
        clocks and best accuracy from the completed steps' metrics."""
        done = self.run.read_metrics()
        budget = Budget(self.cfg.run.max_wall_seconds, self.cfg.run.max_sampled_tokens,
                        elapsed=max((m.get("wall_time", 0.0) for m in done), default=0.0),
                        sampled=max((m.get("sampled_tokens_total", 0) for m in done), default=0))
        self.best = max((m["accuracy"] for m in done if m.get("kind") == "eval"), default=-1.0)
        if first == 1 and self.cfg.eval.every:
            self._initial_eval(budget)
        for step in range(first, self.cfg.run.steps + 1):
            if budget.exhausted():
                self.log(budget.exhausted())
                break
            records = self.run_step(step, budget)
            self.log(format_step(records))
            if self.on_step is not None:
                self.on_step(records)
        return {"best_accuracy": self.best}

    def close(self) -> None:
        """Stop the verifier workers, flush TensorBoard, release the run directory."""
        if self.verify_pool is not None:
            self.verify_pool.close()
        if self.sink is not None:
            self.sink.close()
        self.run.release()

    def _initial_eval(self, budget: Budget) -> None:
        t0 = time.perf_counter()
        ev = self.evaluate(0)
        budget.elapsed += time.perf_counter() - t0
        if ev is not None:
            self.best = max(self.best, ev["accuracy"])
            rec = {**ev, "wall_time": round(budget.elapsed, 3), "sampled_tokens_total": 0}
            self.run.append_metrics(rec)
            if self.sink is not None:
                self.sink.write([rec])
            self.log(f"step 0 eval accuracy {ev['accuracy']:.3f}")


def format_step(records: list[dict]) -> str:
    m = records[0]
    s = (f"step {m['step']:>4}  reward {m['reward_mean']:.3f}  zero-var "
         f"{m['zero_variance_share']:.2f}  branch {m['branch_token_share']:.2f}  "
         f"{m['wall_time']:.0f}s")
    if len(records) > 1:
        s += f"  eval acc {records[1]['accuracy']:.3f}"
    return s


def run_loop(cfg: LoopConfig, resume: bool = False, log: Callable[[str], None] = print,
             on_step: Callable[[list[dict]], None] | None = None) -> dict:
    loop = Loop(cfg, log=log, on_step=on_step)
    try:
        result = loop.run_steps(loop.start(resume))
    finally:
        loop.close()
    try:
        from tcli.plot import plot_runs

        plot_runs([cfg.run.run_dir], os.path.join(cfg.run.run_dir, "metrics.png"))
    except ImportError:  # matplotlib missing: metrics.jsonl is still there
        pass
    return result


def resume_config(run_dir: str, flags: dict) -> LoopConfig:
    """The run's own config.toml, with flags overriding it (run_dir stays the run's)."""
    path = os.path.join(run_dir, "config.toml")
    if not os.path.isfile(path):
        raise UsageError(f"{run_dir} is not a tcli run directory (no config.toml)")
    return load_config(path, {**flags, "run_dir": run_dir})
