"""What one step of `tcli loop` is, apart from its stages: its prompts and seed (functions of
(seed, step), so a resumed run repeats them), its clocks, the run's budget and its log line."""

from __future__ import annotations

import random
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

from tcli.train.metrics import off_policy_note


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


def format_step(records: list[dict]) -> str:
    m = records[0]
    s = (f"step {m['step']:>4}  reward {m['reward_mean']:.3f}  zero-var "
         f"{m['zero_variance_share']:.2f}  branch {m['branch_token_share']:.2f}  "
         f"{m['wall_time']:.0f}s")
    if len(records) > 1:
        s += f"  eval acc {records[1]['accuracy']:.3f}"
    note = off_policy_note(m)
    return f"{s}\nwarning: {note}" if note else s
