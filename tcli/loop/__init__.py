"""`tcli loop`: sample -> verify -> build-tree -> advantages -> train-step in one process.

The loop calls the same library functions as the subcommands. Every step is made deterministic by
deriving its seeds from (seed, step), so a run killed at any moment and resumed from its last
complete step ends with the same checkpoint as an uninterrupted run.

Run directory:
    config.toml            resolved configuration
    checkpoints/step_N/    model + tokenizer + optimizer.pt + tcli_state.json (last k and the best)
    rollouts/step_N.arrow  every record of step N (inspect with `tcli show-tree`)
    metrics.jsonl          one record per step (and per evaluation)
    metrics.png            reward and eval accuracy vs step and vs wall time
"""

from __future__ import annotations

import os
import random
import re
import shutil
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import orjson

from tcli.config import LoopConfig, dump_toml, load_config
from tcli.errors import TcliError, UsageError
from tcli.io import RecordWriter, write_atomic_bytes
from tcli.prompts import read_prompts

STEP_DIR = re.compile(r"^step_(\d+)$")


# ----------------------------------------------------------------------------- run directory

@dataclass
class RunDir:
    path: str

    @property
    def checkpoints(self) -> str:
        return os.path.join(self.path, "checkpoints")

    @property
    def rollouts(self) -> str:
        return os.path.join(self.path, "rollouts")

    @property
    def metrics(self) -> str:
        return os.path.join(self.path, "metrics.jsonl")

    @property
    def config(self) -> str:
        return os.path.join(self.path, "config.toml")

    def ckpt(self, step: int) -> str:
        return os.path.join(self.checkpoints, f"step_{step}")

    def complete_steps(self) -> list[int]:
        """Checkpoints that were completely written (atomic rename + state file present)."""
        from tcli.models.checkpoint import STATE_FILE

        if not os.path.isdir(self.checkpoints):
            return []
        steps = []
        for name in os.listdir(self.checkpoints):
            m = STEP_DIR.match(name)
            if m and os.path.exists(os.path.join(self.checkpoints, name, STATE_FILE)):
                steps.append(int(m.group(1)))
        return sorted(steps)

    def read_metrics(self) -> list[dict]:
        """Complete lines only: a torn last line from a kill is dropped (rewritten on resume)."""
        from tcli.plot import read_metrics

        return read_metrics(self.path)

    def write_metrics(self, records: list[dict]) -> None:
        write_atomic_bytes(self.metrics, b"".join(orjson.dumps(r) + b"\n" for r in records))

    def append_metrics(self, rec: dict) -> None:
        with open(self.metrics, "ab") as f:
            f.write(orjson.dumps(rec) + b"\n")
            f.flush()
            os.fsync(f.fileno())


# ----------------------------------------------------------------------------- data

def step_prompts(prompts: list[dict], k: int, seed: int, step: int) -> list[dict]:
    """The prompts of one step: a deterministic function of (seed, step), so resume repeats it."""
    rng = random.Random(f"{seed}:{step}")
    if k >= len(prompts):
        return list(prompts)
    return rng.sample(prompts, k)


# ----------------------------------------------------------------------------- the loop

@dataclass
class StepTimer:
    seconds: dict = field(default_factory=dict)

    def time(self, name: str):
        timer = self

        class _T:
            def __enter__(self):
                self.t = time.perf_counter()

            def __exit__(self, *a):
                timer.seconds[name] = timer.seconds.get(name, 0.0) + time.perf_counter() - self.t

        return _T()


class Loop:
    """Owns the engine, trainer and run directory of one training run."""

    def __init__(self, cfg: LoopConfig, log: Callable[[str], None] = lambda s: None):
        self.cfg = cfg
        self.run = RunDir(cfg.run_dir)
        self.log = log
        self.train_prompts = read_prompts(cfg.train_data)
        self.eval_prompts = read_prompts(cfg.eval_data, cfg.eval_limit) if cfg.eval_data else []
        self._validate()

    def _validate(self) -> None:
        from tcli.engines import ENGINES
        from tcli.algos.estimators import ESTIMATORS

        ESTIMATORS.get(self.cfg.estimator)
        ENGINES.get(self.cfg.engine)
        if self.cfg.mode not in ("independent", "tree"):
            raise UsageError(f"mode must be independent or tree, got {self.cfg.mode!r}")
        if self.cfg.estimator == "treerpo" and self.cfg.mode != "tree":
            raise UsageError("estimator treerpo needs mode = \"tree\"")
        if not self.cfg.model or not os.path.isdir(self.cfg.model):
            raise UsageError(f"model directory not found: {self.cfg.model!r}")

    # -- stages ------------------------------------------------------------------------
    def sampling_config(self, step: int, eval_: bool = False):
        from tcli.engines.base import SamplingConfig

        c = self.cfg
        return SamplingConfig(
            temperature=c.eval_temperature if eval_ else c.temperature,
            top_p=1.0 if eval_ else c.top_p, max_new_tokens=c.max_new_tokens,
            min_new_tokens=0 if eval_ else c.min_new_tokens,
            seed=(c.seed * 1_000_003 + step * 7919 + (1 if eval_ else 0)) % (2**31))

    def sample(self, prompts: list[dict], step: int) -> list[dict]:
        from tcli.stages.sample import sample_records

        c = self.cfg
        return list(sample_records(
            self.engine, prompts, mode=c.mode, n=c.n, width=c.width, depth=c.depth,
            segment_tokens=c.segment_tokens, cfg=self.sampling_config(step),
            template=c.prompt_template, chat_template=c.chat_template,
            chunk_size=max(1, len(prompts))))

    def verify(self, records: list[dict]) -> list[dict]:
        from tcli.stages.verify import verify_records

        c = self.cfg
        return list(verify_records(iter(enumerate(records, 1)), "<loop>", task=c.task,
                                   timeout=c.verify_timeout, workers=c.verify_workers))

    def advantages(self, records: list[dict]) -> tuple[list[dict], dict]:
        from tcli.algos.estimators import EstimatorOptions
        from tcli.io import iter_groups
        from tcli.stages.advantages import AdvantageStats, advantages_group
        from tcli.stages.tree import build_tree_group

        c = self.cfg
        opt = EstimatorOptions(std=c.std, td_coef=c.td_coef, norm=c.norm, prune_std=c.prune_std)
        stats = AdvantageStats()
        kept, dropped = [], 0
        for _, group in iter_groups(enumerate(records, 1), "<loop>"):
            build_tree_group(group)
            advantages_group(group, c.estimator, opt, stats)
            if c.filter_groups and len({r["reward"] for r in group}) < 2:
                dropped += 1
                continue
            kept.extend(group)
        summary = stats.summary()
        summary["groups_dropped"] = dropped
        return kept, summary

    # -- run ---------------------------------------------------------------------------
    def start(self, resume: bool) -> int:
        """Prepare the run directory; return the first step to run."""
        from tcli.engines import make_engine
        from tcli.train.trainer import Trainer, TrainConfig

        os.makedirs(self.run.checkpoints, exist_ok=True)
        os.makedirs(self.run.rollouts, exist_ok=True)
        done = self.run.complete_steps()
        if resume and done:
            last = done[-1]
            start_ckpt = self.run.ckpt(last)
            self._restore_metrics(last)
            self.log(f"resuming from step {last} ({start_ckpt})")
        else:
            if done and not resume:
                raise UsageError(f"{self.run.path} already holds a run; use --resume or another run_dir")
            last = 0
            start_ckpt = self.cfg.model
            write_atomic_bytes(self.run.config, dump_toml(self.cfg).encode())
            self.run.write_metrics([])
        self.trainer = Trainer(start_ckpt, TrainConfig.from_mapping(self.cfg.to_dict()))
        kw = {"batch_tokens": self.cfg.batch_tokens} if self.cfg.engine == "hf" else {"seed": self.cfg.seed}
        self.engine = make_engine(self.cfg.engine, start_ckpt, **kw)
        if self.cfg.engine == "hf":  # share the trainer's module: no weight copy after each step
            self.engine.model = self.trainer.model
        return last + 1

    def _restore_metrics(self, last: int) -> None:
        """Keep metrics of completed steps only; restore a step's line lost between checkpoint
        and metrics append from the copy kept in its checkpoint state."""
        from tcli.models.checkpoint import read_state

        kept = [m for m in self.run.read_metrics() if m.get("step", 0) <= last]
        have = {(m.get("kind"), m.get("step")) for m in kept}
        state = read_state(self.run.ckpt(last))
        for m in state.get("metrics", []):
            if (m.get("kind"), m.get("step")) not in have:
                kept.append(m)
        kept.sort(key=lambda m: (m.get("step", 0), m.get("kind") != "train"))
        self.run.write_metrics(kept)

    def evaluate(self, step: int) -> dict:
        from tcli.stages.evaluate import evaluate

        if not self.eval_prompts:
            return {}
        c = self.cfg
        _, summary = evaluate(self.engine, self.eval_prompts, n=c.eval_n, cfg=self.sampling_config(step, eval_=True),
                              task=c.task, template=c.prompt_template, chat_template=c.chat_template,
                              ks=(1,), timeout=c.verify_timeout, workers=c.verify_workers,
                              batch_tokens=c.batch_tokens, seed=c.seed)
        return summary

    def run_steps(self, first: int) -> dict:
        c = self.cfg
        # a resumed run continues its clocks and best accuracy from the completed steps' metrics
        done = self.run.read_metrics()
        elapsed = max((m.get("wall_time", 0.0) for m in done), default=0.0)
        sampled_total = max((m.get("sampled_tokens_total", 0) for m in done), default=0)
        best = max((m.get("accuracy", 0.0) for m in done if m.get("kind") == "eval"), default=-1.0)
        if first == 1 and c.eval_every:
            ev = self.evaluate(0)
            if ev:
                rec = {"kind": "eval", "step": 0, "wall_time": elapsed, "sampled_tokens_total": 0, **ev}
                self.run.append_metrics(rec)
                self.log(f"step 0 eval accuracy {ev.get('accuracy', 0):.3f}")
        def exhausted() -> str | None:
            if c.max_wall_seconds and elapsed >= c.max_wall_seconds:
                return f"wall-clock budget reached at {elapsed:.0f}s"
            if c.max_sampled_tokens and sampled_total >= c.max_sampled_tokens:
                return f"sampled-token budget reached ({sampled_total} tokens)"
            return None

        for step in range(first, c.steps + 1):
            if exhausted():
                self.log(exhausted())
                break
            t0 = time.perf_counter()
            timer = StepTimer()
            prompts = step_prompts(self.train_prompts, c.prompts_per_step, c.seed, step)
            with timer.time("sample"):
                rollouts = self.sample(prompts, step)
            with timer.time("verify"):
                rollouts = self.verify(rollouts)
            with timer.time("advantages"):
                batch, adv_stats = self.advantages(rollouts)
            with timer.time("train"):
                train_metrics = self.trainer.step(batch) if batch else {}
            self.engine_sync()
            sampled = sum(len(r["token_ids"]) for r in rollouts)
            sampled_total += sampled
            with timer.time("write"):
                with RecordWriter(os.path.join(self.run.rollouts, f"step_{step}.arrow")) as w:
                    w.write_all(rollouts)
            elapsed += time.perf_counter() - t0
            metrics = {
                "kind": "train", "step": step, "wall_time": round(elapsed, 3),
                "sampled_tokens": sampled, "sampled_tokens_total": sampled_total,
                "reward_mean": adv_stats["reward_mean"],
                "zero_variance_share": adv_stats["zero_variance_share"],
                "branch_token_share": adv_stats["branch_token_share"],
                "mean_abs_advantage": adv_stats["mean_abs_advantage"],
                "groups_dropped": adv_stats["groups_dropped"],
                **{f"train_{k}": v for k, v in train_metrics.items() if isinstance(v, (int, float))},
                **{f"seconds_{k}": round(v, 4) for k, v in timer.seconds.items()},
                "tokens_per_s_sample": sampled / max(timer.seconds["sample"], 1e-9),
            }
            step_metrics = [metrics]
            last = step == c.steps or exhausted() is not None
            if c.eval_every and (step % c.eval_every == 0 or last):
                ev = self.evaluate(step)
                if ev:
                    step_metrics.append({"kind": "eval", "step": step, "wall_time": round(elapsed, 3),
                                         "sampled_tokens_total": sampled_total, **ev})
                    acc = ev.get("accuracy", 0.0)
                    if acc > best:
                        best = acc
            self._save(step, step_metrics, best)
            for m in step_metrics:
                self.run.append_metrics(m)
            self.log(_format_step(metrics, step_metrics[1] if len(step_metrics) > 1 else None))
        return {"best_accuracy": best}

    def engine_sync(self) -> None:
        """The hf engine shares the trainer's module; other engines reload weights."""
        if self.cfg.engine == "hf":
            self.engine.policy_version = self.trainer.policy_version
        else:
            tmp = os.path.join(self.run.path, ".sync")
            self.trainer.save(tmp, {})
            self.engine.load_weights(tmp, self.trainer.policy_version)

    def _save(self, step: int, step_metrics: list[dict], best: float) -> None:
        evals = [m for m in step_metrics if m["kind"] == "eval"]
        is_best = bool(evals) and evals[-1].get("accuracy", -1) >= best
        self.trainer.save(self.run.ckpt(step), {"step": step, "metrics": step_metrics,
                                                  "loop_config": self.cfg.to_dict()})
        if is_best:
            best_dir = os.path.join(self.run.checkpoints, "best")
            tmp = best_dir + ".tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(self.run.ckpt(step), tmp)
            if os.path.exists(best_dir):
                shutil.rmtree(best_dir)
            os.replace(tmp, best_dir)
        for s in self.run.complete_steps()[: -max(1, self.cfg.keep_last)]:
            shutil.rmtree(self.run.ckpt(s), ignore_errors=True)


def _format_step(m: dict, ev: Optional[dict]) -> str:
    s = (f"step {m['step']:>4}  reward {m['reward_mean']:.3f}  zero-var {m['zero_variance_share']:.2f}  "
         f"branch {m['branch_token_share']:.2f}  {m['wall_time']:.0f}s")
    if ev:
        s += f"  eval acc {ev.get('accuracy', 0):.3f}"
    return s


def run_loop(cfg: LoopConfig, resume: bool = False, log: Callable[[str], None] = print) -> dict:
    loop = Loop(cfg, log=log)
    first = loop.start(resume)
    result = loop.run_steps(first)
    try:
        from tcli.plot import plot_runs

        plot_runs([cfg.run_dir], os.path.join(cfg.run_dir, "metrics.png"))
    except ImportError:  # matplotlib missing: metrics.jsonl is still there
        pass
    return result


def resume_config(run_dir: str, overrides: dict) -> LoopConfig:
    path = os.path.join(run_dir, "config.toml")
    if not os.path.exists(path):
        raise UsageError(f"{run_dir} is not a tcli run directory (no config.toml)")
    return load_config(path, {**overrides, "run_dir": run_dir})


__all__ = ["Loop", "LoopConfig", "RunDir", "run_loop", "resume_config", "TcliError"]
