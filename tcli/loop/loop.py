"""`tcli loop`: sample -> verify -> advantages -> train-step per step, in 1 or N (torchrun) processes.

The loop calls the same stage functions as the commands, with the same option objects. Every
step's randomness derives from (seed, step), so a run killed at any moment and resumed from its
last complete step ends with the same checkpoint as an uninterrupted run.

Under torchrun every rank samples, verifies and scores its block of the step's prompts (whole
groups; sampling depends on (seed, prompt, path) only, so the rollouts are the 1-process ones),
the blocks are gathered in prompt order onto every rank, and the trainer's DDP/FSDP update runs
on the whole batch (global token counts). Rank 0 alone writes the run directory and decides
when the run stops; an error on any rank ends every rank (:mod:`tcli.train.dist`).
"""

from __future__ import annotations

import os
import time
import tomllib
from typing import Callable

import numpy as np

from tcli.algos.estimators import needs
from tcli.config.loop import LoopConfig, dump_toml, resume_changes
from tcli.config.threads import ThreadOptions
from tcli.engines import open_engine
from tcli.errors import DataError, UsageError
from tcli.io import RecordWriter, iter_groups, write_atomic_bytes
from tcli.loop.expand_step import expand_metrics, expand_step
from tcli.loop.ranks import SamplingWeights, fold_stats
from tcli.loop.inputs import check_models, check_prompts_encode, eval_is_train, loop_prompts
from tcli.loop.refill import step_rollouts
from tcli.loop.rundir import RunDir
from tcli.loop.steps import Budget, StepTimer, format_step, step_seed
from tcli.models.checkpoint import read_state
from tcli.models.critic import init_critic
from tcli.models.recorded import sampling_state, with_recorded_sampling
from tcli.plot import plot_runs
from tcli.stages.advantages import AdvantageStats, stage_end, stage_group
from tcli.stages.evaluate import evaluate, summarise
from tcli.stages.sample import sample_records, token_counts, tool_metrics
from tcli.stages.values import add_critic_values
from tcli.stages.verify import start_pool, verify_records
from tcli.trackers import start_trackers
from tcli.train.critic import CriticTrainer
from tcli.train.dist import DistInfo, block_share, gather_or_raise, run_on_main
from tcli.train.trainer import Trainer
from tcli.verifiers.weighted import reward_means


class Loop:
    """Owns the engine, trainer and run directory of one training run."""

    def __init__(self, cfg: LoopConfig, log: Callable[[str], None] = lambda s: None,
                 on_step: Callable[[list[dict]], None] | None = None,
                 dist: DistInfo | None = None):
        """Everything that can be checked without touching disk is checked here. ``dist``: this
        process's rank under torchrun (default: one process)."""
        self.cfg = cfg
        self.dist = dist or DistInfo()
        self.log = log
        self.on_step = on_step
        self.sink = None
        self.verify_pool = None
        self.critic = None
        self.weights = None  # under torchrun: what this rank's engine samples from
        if self.dist.enabled and cfg.sample.engine != "hf":
            raise UsageError(f"loop under torchrun samples with the hf engine (each rank from its "
                             f"own copy of the policy), not {cfg.sample.engine!r}")
        self.run = RunDir(cfg.run.run_dir, warn=log)
        for name in ("model", "train_data"):  # required: nothing could stand in for them
            if not getattr(cfg.run, name):
                raise UsageError(f"no {name}: give {cfg.run.flag(name)} or `{name} = ...` in the "
                                 "--config file")
        unread_eval = cfg.check_eval_used()  # a warning or None: a note
        if not os.path.isdir(cfg.run.model):
            raise UsageError(f"{cfg.where('model')}: model directory not found: "
                             f"{cfg.run.model!r}")
        check_models(cfg)
        # said once the run directory is taken (not before its error)
        self.notes: list[str] = [unread_eval] * bool(unread_eval)
        self.cfg = cfg = with_recorded_sampling(cfg, self.notes.append)  # before config.toml
        self.record_no: dict = {}  # id(prompt) -> (file, line): errors found later name it
        self.train_prompts = loop_prompts(cfg, "train_data", origin=self.record_no)
        ev = cfg.eval
        self.eval_prompts = (loop_prompts(cfg, "eval_data", ev.limit or None, self.record_no)
                             if cfg.run.eval_data and ev.every else [])
        if self.eval_prompts and (same := eval_is_train(cfg)):
            self.notes.append(same)
        self._on_main(lambda: check_prompts_encode(cfg, self.train_prompts, self.eval_prompts,
                                                   self._locate))  # one rank says it
        self.best = -1.0

    # -- ranks ---------------------------------------------------------------------------
    def _on_main(self, fn: Callable):
        """``fn()`` on rank 0 (the run directory's writer); its result, or its error, on every
        rank. The identity in one process."""
        return run_on_main(fn, self.dist)

    def _share(self, items: list) -> list:
        """This rank's contiguous block of ``items`` (all of them in one process)."""
        return [items[i] for i in block_share(len(items), self.dist)]

    def _gathered(self, fn: Callable[[], list]) -> list:
        """``fn()`` on every rank (its share of the work), the ranks' lists concatenated in rank
        order on every rank; an error on any rank is raised on all of them."""
        return [x for part in gather_or_raise(fn, self.dist) for x in part]

    # -- start ---------------------------------------------------------------------------
    def start(self, resume: bool, overwrite: bool = False) -> int:
        """Take the run directory (rank 0), load trainer and engine; return the first step."""
        last, start_ckpt = self._on_main(lambda: self._take_run_dir(resume, overwrite))
        for line in self.notes:
            self.log(line)
        # verifier workers fork now, before any model exists, and serve every step
        v = self.cfg.verify
        self.verify_pool = start_pool(v.task, v.timeout, v.workers)
        ThreadOptions(self.cfg.run.threads).apply()  # before any model runs
        if self.dist.is_main:  # trackers (TensorBoard, W&B, MLflow): the run's writer only
            config = tomllib.loads(dump_toml(self.cfg))  # the resolved TOML, as config.toml
            self.sink = start_trackers(self.cfg.run, config, first_step=last + 1)
        self.trainer = Trainer(start_ckpt, self.cfg.train, seed=self.cfg.run.seed,
                               dist_info=self.dist)
        self.critic = self._start_critic(last, last > 0)  # a restarted run makes a new one
        if self.dist.enabled:
            self.weights = SamplingWeights(self.trainer, start_ckpt, dtype=self.cfg.sample.dtype)
        self.engine = open_engine(start_ckpt, self.cfg.sample, seed=self.cfg.run.seed,
                                  trainer=self.weights or self.trainer)
        self.engine.model_path = self.cfg.run.model  # rollouts name the run's model, resumed or not
        return last + 1

    def _take_run_dir(self, resume: bool, overwrite: bool = False) -> tuple[int, str]:
        """Lock the run directory and check it: resumable (started again when it has no complete
        checkpoint), empty, or a previous run to overwrite; (last step, its weights)."""
        self.run.acquire()
        last = self.run.check_resumable() if resume else 0
        changed = resume_changes(self.cfg) if resume else {}  # the resolved settings it runs
        if last:
            start_ckpt = self.run.ckpt(last)
            self._restore_metrics(last)
            self.log(f"resuming from step {last} ({start_ckpt})")
        else:
            if resume:
                self.run.restart()  # keeps config.toml
            elif overwrite:
                self.run.overwrite()
            else:
                self.run.check_fresh()
            if not resume:
                write_atomic_bytes(self.run.config, dump_toml(self.cfg).encode())
            start_ckpt = self.cfg.run.model
            self.run.write_metrics([])
        if resume:
            self.run.record_resume(last + 1, {k: new for k, (_, new) in changed.items()})
        self.run.make_dirs()
        return last, start_ckpt

    def _start_critic(self, last: int, resume: bool):
        """PPO (estimator gae/ppo): the critic beside the policy: on resume the one saved with the
        last step, else [critic] model or a new critic from the policy (checkpoints/critic_0)."""
        if not needs(self.cfg.advantages.estimator).critic:
            return None
        c = self.cfg.critic
        path = self.run.critic_ckpt(last)
        if not resume and c.model:
            path = c.model
        elif not resume:
            self._on_main(lambda: init_critic(self.cfg.run.model, path))
        return CriticTrainer(path, c.update_options(), seed=self.cfg.run.seed, dist_info=self.dist)

    def _restore_metrics(self, last: int) -> None:
        """Keep metrics of completed steps only; restore a step's line lost between checkpoint
        and metrics append from the copy kept in its checkpoint state. A run with nothing left
        to do stops first, with the setting to change."""
        kept = [m for m in self.run.read_metrics() if m.get("step", 0) <= last]
        have = {(m.get("kind"), m.get("step")) for m in kept}
        for m in read_state(self.run.ckpt(last)).get("metrics", []):
            if (m.get("kind"), m.get("step")) not in have:
                kept.append(m)
        kept.sort(key=lambda m: (m.get("step", 0), m.get("kind") != "train"))
        self.run.check_can_continue(last, kept, self.cfg.run)
        self.run.write_metrics(kept)

    # -- stages --------------------------------------------------------------------------
    def sample(self, prompts: list[dict], seed: int) -> list[dict]:
        try:
            return list(sample_records(self.engine, prompts, self.cfg.sample, seed=seed))
        except DataError as e:
            raise self._locate(e, prompts) from None

    def _locate(self, e: DataError, prompts: list[dict]) -> DataError:
        """A bad prompt found while sampling, named by its file and record number."""
        i = getattr(e, "index", None)
        if e.file is None and isinstance(i, int) and 0 <= i < len(prompts):
            e.located(*self.record_no.get(id(prompts[i]), (None, None)))
        return e

    def verify(self, records: list[dict]) -> list[dict]:
        v = self.cfg.verify
        return list(verify_records(iter(enumerate(records, 1)), "<loop>", task=v.task,
                                   timeout=v.timeout, workers=v.workers, pool=self.verify_pool,
                                   weights=v.weights,
                                   max_verifier_errors=v.max_verifier_errors))

    def group_advantages(self, records: list[dict]) -> list[tuple]:
        """Per group of ``records`` (in order): (size, its AdvantageStats, informative?: rewards
        not all equal); the records get their advantages (and critic values) in place (the tree
        is built once and written for show-tree)."""
        if self.critic is not None:
            self._add_critic_values(records)
        out = []
        for _, recs in iter_groups(enumerate(records, 1), "<loop>"):
            stats = AdvantageStats()
            group = stage_group(recs, self.cfg.advantages, stats, tree=True)
            out.append((len(recs), stats, not group.all_equal))
        return out

    def batch(self, records: list[dict], groups: list[tuple],
              keep: list[bool] | None = None) -> tuple[list[dict], dict]:
        """The records to train on and the step's advantage metrics, from ``group_advantages``
        of all the step's records (whitening over all kept tokens: global statistics). ``keep``:
        the groups that train (default: all, or the informative ones with ``filter_groups``)."""
        if keep is None:
            keep = [inf or not self.cfg.run.filter_groups for _, _, inf in groups]
        kept, at = [], 0
        for (size, _, _), train in zip(groups, keep):
            if train:
                kept.extend(records[at:at + size])
            at += size
        stats = fold_stats([s for _, s, _ in groups])
        dropped = len(groups) - sum(keep)
        return stage_end(kept, self.cfg.advantages, stats), {**stats.summary(),
                                                             "groups_dropped": dropped}

    def _add_critic_values(self, records: list[dict]) -> None:
        """``critic_values`` of every rollout from the current critic (as `tcli values`)."""
        batch = [(i, r, np.asarray(r["prompt_token_ids"]), np.asarray(r["token_ids"]))
                 for i, r in enumerate(records, 1)]
        add_critic_values(self.critic.model, batch, device=self.critic.device, source="<loop>",
                          micro_batch_tokens=self.cfg.critic.micro_batch_tokens)

    def evaluate(self, step: int) -> dict | None:
        """An eval metrics record, or None when the run has no eval data (every rank evaluates
        its block of the prompts; the summary is over all of them)."""
        if not self.eval_prompts:
            return None
        c = self.cfg
        seed = step_seed(c.run.seed, step, evaluation=True)
        records = self._gathered(lambda: evaluate(
            self.engine, self._share(self.eval_prompts), c.sample, c.verify, c.eval, seed=seed,
            pool=self.verify_pool, origin=self.record_no)[0])
        return {"kind": "eval", "step": step, **summarise(records, ks=c.eval.ks, seed=seed)}

    # -- steps ---------------------------------------------------------------------------
    def rollouts(self, step: int, timer: StepTimer) -> tuple[list[dict], list[dict], dict]:
        """The step's rollouts (all ranks' blocks, in prompt order; with refill every round's,
        §5.9), the batch to train on and the advantage (and refill) metrics."""
        rollouts, groups, keep, refill = step_rollouts(
            self.train_prompts, self.cfg.run, step, lambda p, s: self._round(p, s, timer))
        with timer("advantages"):
            batch, adv = self.batch(rollouts, groups, keep)
        return rollouts, batch, {**adv, "refill": refill}

    def _round(self, prompts: list[dict], seed: int, timer: StepTimer) -> tuple[list, list]:
        """Every rank samples (``seed``), verifies and scores its block of ``prompts``: all
        ranks' records and groups (``group_advantages``) in prompt order. Timers: this rank's own
        work; ``gather``: waiting for the others."""
        prompts = self._share(prompts)

        def mine() -> list[tuple[list[dict], list[tuple]]]:
            with timer("sample"):
                recs = self.sample(prompts, seed)
            with timer("verify"):
                recs = self.verify(recs)
            recs = expand_step(self, recs, seed, timer)  # [expand]: new leaves, verified
            with timer("advantages"):
                groups = self.group_advantages(recs)
            return [(recs, groups)]

        t0, before = time.perf_counter(), sum(timer.seconds.values())
        parts = self._gathered(mine)
        if self.dist.enabled:
            timer.seconds["gather"] = timer.seconds.get("gather", 0.0) + (
                time.perf_counter() - t0 - (sum(timer.seconds.values()) - before))
        return [r for recs, _ in parts for r in recs], [g for _, gs in parts for g in gs]

    def train_step(self, step: int, budget: Budget) -> dict:
        """Sample, verify, advantages, train, follow: the step's train metrics record."""
        timer = StepTimer()
        rollouts, batch, adv = self.rollouts(step, timer)
        with timer("train"):
            train = self.trainer.step(batch) if batch else {}
            if self.weights is not None:
                self.weights.refresh()
            self.engine.follow(self.weights or self.trainer)
        critic = {}
        if self.critic is not None:
            with timer("critic"):
                critic = self.critic.step(batch) if batch else {}
        with timer("write"):
            self._on_main(lambda: self._write_rollouts(step, rollouts))
        sampled, leaf = token_counts(rollouts)  # tree mode: shared segments count once
        budget.sampled += sampled
        return {
            "kind": "train", "step": step, "sampled_tokens": sampled, "leaf_tokens": leaf,
            "sampled_tokens_total": budget.sampled,
            **{k: adv[k] for k in ("reward_mean", "zero_variance_share", "branch_token_share",
                                   "mean_abs_advantage", "groups_dropped")},
            **adv["refill"],  # refill on: informative_share, refill_rounds, ... (§5.9)
            **reward_means(rollouts),  # several tasks: rewards/<task>, each one's mean
            **tool_metrics(rollouts),  # with tools: calls per response, failed share
            **expand_metrics(rollouts, self.cfg),
            **{f"train_{k}": v for k, v in train.items() if isinstance(v, (int, float))},
            **{f"critic_{k}": v for k, v in critic.items()  # None: undefined, written as null
               if (v is None or isinstance(v, (int, float))) and k not in ("step", "lr")},
            **{f"seconds_{k}": round(v, 4) for k, v in timer.seconds.items()},
            "tokens_per_s_sample": sampled / max(timer.seconds["sample"], 1e-9),
        }

    def run_step(self, step: int, budget: Budget) -> tuple[list[dict], bool]:
        """One step, its evaluation when due, the checkpoint when due; every second counts to
        the budget. Also whether it is the run's last (then evaluated and saved)."""
        t0 = time.perf_counter()
        records = [self.train_step(step, budget)]
        every = self.cfg.eval.every
        final = self._agreed_final(step, budget, t0)
        if every and (step % every == 0 or final):
            if (ev := self.evaluate(step)) is not None:
                records.append(ev)
            final = final or self._agreed_final(step, budget, t0)  # the eval's seconds count
        is_best = self._note_best(records)
        save = is_best or step % self.cfg.run.save_every == 0 or final
        t1 = time.perf_counter()
        budget.elapsed += t1 - t0
        for m in records:
            m["wall_time"] = round(budget.elapsed, 3)
            m["sampled_tokens_total"] = budget.sampled
        if save:
            self._save(step, records, is_best)
        self._on_main(lambda: self._publish(records))
        budget.elapsed += time.perf_counter() - t1  # saving counts too (from the next record on)
        return records, final

    def _agreed_final(self, step: int, budget: Budget, t0: float) -> bool:
        """Is this the run's last step? Rank 0's clock decides for every rank (a budget must
        stop all ranks at the same step)."""
        return self._on_main(lambda: step == self.cfg.run.steps
                             or budget.exhausted(time.perf_counter() - t0) is not None)

    def _publish(self, records: list[dict]) -> None:
        """metrics.jsonl (and the trackers): rank 0."""
        for m in records:
            self.run.append_metrics(m)
        if self.sink is not None:
            self.sink.write(records)

    def _write_rollouts(self, step: int, rollouts: list[dict]) -> None:
        with RecordWriter(self.run.rollout_file(step)) as w:
            w.write_all(rollouts)

    def _save(self, step: int, records: list[dict], is_best: bool) -> None:
        if self.critic is not None:  # first: a complete step_N always has its critic_N
            self.critic.save(self.run.critic_ckpt(step), {"step": step})
        self.trainer.save(self.run.ckpt(step), {"step": step, "metrics": records,
                                                "loop_config": self.cfg.to_dict(),
                                                "sampling": sampling_state(self.cfg.sample)})
        self._on_main(lambda: self._keep(step, is_best))

    def _keep(self, step: int, is_best: bool) -> None:
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
        """Steps ``first``..``steps`` until a budget ends the run after a step found to be its last
        (evaluated, saved); a resumed run continues its clocks and best from the done steps."""
        done = self._on_main(self.run.read_metrics)
        budget = Budget(self.cfg.run.max_wall_seconds, self.cfg.run.max_sampled_tokens,
                        elapsed=max((m.get("wall_time", 0.0) for m in done), default=0.0),
                        sampled=max((m.get("sampled_tokens_total", 0) for m in done), default=0))
        self.best = self._resumed_best(done)
        if first == 1 and self.cfg.eval.every:
            self._initial_eval(budget)
        final = False
        for step in range(first, self.cfg.run.steps + 1):
            if (step == first or final) and (why := self._on_main(budget.exhausted)):
                self.log(why)
                break
            records, final = self.run_step(step, budget)
            self.log(format_step(records))
            if self.on_step is not None:
                self.on_step(records)
        return {"best_accuracy": self.best}

    def _resumed_best(self, done: list[dict]) -> float:
        """The best eval accuracy of the completed steps among evals of this run's size."""
        evals = [m for m in done if m.get("kind") == "eval"]
        same = [m["accuracy"] for m in evals if m.get("prompts") == len(self.eval_prompts)]
        if len(same) < len(evals):
            self.log(f"best eval accuracy starts anew: {len(evals) - len(same)} earlier eval(s) "
                     f"scored another number of prompts than this run's {len(self.eval_prompts)}")
        return max(same, default=-1.0)

    def close(self, ok: bool = True) -> None:
        """Stop the verifier workers, finish the trackers (failed unless ``ok``), release the run
        directory."""
        if self.verify_pool is not None:
            self.verify_pool.close()
        if self.sink is not None:
            self.sink.close(ok)
        self.run.release()  # a no-op where the lock was not taken (ranks > 0)

    def _initial_eval(self, budget: Budget) -> None:
        t0 = time.perf_counter()
        ev = self.evaluate(0)
        budget.elapsed += time.perf_counter() - t0
        if ev is not None:
            self.best = max(self.best, ev["accuracy"])
            rec = {**ev, "wall_time": round(budget.elapsed, 3), "sampled_tokens_total": 0}
            self._on_main(lambda: self._publish([rec]))
            self.log(f"step 0 eval accuracy {ev['accuracy']:.3f}")


def run_loop(cfg: LoopConfig, resume: bool = False, log: Callable[[str], None] = print,
             on_step: Callable[[list[dict]], None] | None = None,
             dist: DistInfo | None = None, overwrite: bool = False) -> dict:
    """The whole run; under torchrun (``dist``) every rank calls this, rank 0 draws the plot.
    ``overwrite``: a new run replaces a previous run in its run_dir (RunDir.overwrite)."""
    loop = Loop(cfg, log=log, on_step=on_step, dist=dist)
    ok = False
    try:
        result = loop.run_steps(loop.start(resume, overwrite))
        ok = True
    finally:
        loop.close(ok)
    if not loop.dist.is_main:
        return result
    try:
        plot_runs([cfg.run.run_dir], os.path.join(cfg.run.run_dir, "metrics.png"))
    except ImportError:  # matplotlib missing: metrics.jsonl is still there
        pass
    return result

