"""Refill (DAPO's dynamic sampling, docs/design.md §5.9): a step keeps sampling further prompts
until it holds ``prompts_per_step`` informative groups (responses whose rewards are not all
equal: under group-relative estimators the only groups whose advantages are not all zero),
within a cap on rounds and on extra sampled tokens, and trains on those groups alone.

Every choice is a function of (seed, step, round) and of the rewards already gathered, never of
a rank or a clock: under torchrun each rank sees the same gathered groups and takes the same
decisions without a collective of its own, and a resumed run repeats the step exactly.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Callable

from tcli.loop.steps import step_prompts, step_seed
from tcli.stages.sample import token_counts

# one sampling round: (its prompts, its seed) -> (all ranks' records, their groups as
# (size, advantage stats, informative?) in prompt order)
RoundFn = Callable[[list[dict], int], tuple[list[dict], list[tuple]]]


def refill_seed(seed: int, step: int, round_: int) -> int:
    """The sampling seed of refill round ``round_`` (>= 1) of ``step``; round 0 keeps
    :func:`step_seed`, so the first round samples what a run without refill samples."""
    if round_ == 0:
        return step_seed(seed, step)
    return random.Random(f"{seed}:{step}:refill:{round_}").getrandbits(31)


def refill_prompts(prompts: list[dict], used: set[int], k: int, seed: int, step: int,
                   round_: int) -> list[dict]:
    """``k`` prompts (fewer when fewer are left) drawn from those this step has not sampled yet
    (``used``: their ``id()``), a deterministic function of (seed, step, round)."""
    left = [p for p in prompts if id(p) not in used]
    rng = random.Random(f"{seed}:{step}:refill-prompts:{round_}")
    return rng.sample(left, min(k, len(left)))


def round_size(want: int, found: int, seen: int) -> int:
    """Prompts for the next round: the groups still missing divided by the informative rate seen
    so far (rounded up), a full step's worth when none was informative yet, never more."""
    if found == 0:
        return want
    return min(want, -(-(want - found) * seen // found))


def keep_first(informative: list[bool], want: int) -> list[bool]:
    """Which groups train: the first ``want`` informative ones, in the order they were sampled."""
    keep, n = [], 0
    for inf in informative:
        keep.append(inf and n < want)
        n += keep[-1]
    return keep


@dataclass
class Refill:
    """The state of one step's rounds; :meth:`run` samples them."""

    prompts: list[dict]             # the run's training prompts (the pool)
    want: int                       # prompts_per_step
    seed: int
    step: int
    max_rounds: int
    max_tokens: int                 # 0 = no cap
    records: list[dict] = field(default_factory=list)
    groups: list[tuple] = field(default_factory=list)
    used: set = field(default_factory=set)
    rounds: int = 0                 # refill rounds run (after the first)
    extra_tokens: int = 0           # tokens the refill rounds sampled
    first_share: float = 0.0
    stop: str = "filled"

    @property
    def found(self) -> int:
        return sum(g[2] for g in self.groups)

    def take(self, prompts: list[dict], sample_round: RoundFn) -> list[dict]:
        """Sample one round: ``prompts`` with this round's seed; its records (also appended)."""
        recs, groups = sample_round(prompts, refill_seed(self.seed, self.step, self.rounds))
        self.used.update(id(p) for p in prompts)
        self.records += recs
        self.groups += groups
        return recs

    def why_stop(self) -> str | None:
        """Why no further round starts (None: one does)."""
        if self.found >= self.want:
            return "filled"
        if self.rounds >= self.max_rounds:
            return "max_rounds"
        if self.max_tokens and self.extra_tokens >= self.max_tokens:
            return "max_tokens"
        if len(self.used) >= len(self.prompts):
            return "no_prompts"
        return None

    def run(self, first: list[dict], sample_round: RoundFn) -> "Refill":
        """The first round (``first``: the step's own prompts and seed), then refill rounds until
        :meth:`why_stop` says no."""
        self.take(first, sample_round)
        self.first_share = self.found / max(len(self.groups), 1)
        while (why := self.why_stop()) is None:
            k = round_size(self.want, self.found, len(self.groups))
            self.rounds += 1
            batch = refill_prompts(self.prompts, self.used, k, self.seed, self.step, self.rounds)
            self.extra_tokens += token_counts(self.take(batch, sample_round))[0]
        self.stop = why
        return self

    def keep(self) -> list[bool]:
        return keep_first([g[2] for g in self.groups], self.want)

    def metrics(self) -> dict:
        """The step's refill metrics (docs/design.md §5.9); its sampled tokens are all rounds'."""
        kept = min(self.found, self.want)
        sampled = token_counts(self.records)[0]
        return {"informative_share": self.first_share, "refill_rounds": self.rounds,
                "refill_tokens": self.extra_tokens, "refill_stop": self.stop,
                "informative_groups": kept,
                "tokens_per_informative_group": sampled / kept if kept else None}


def step_rollouts(prompts: list[dict], run, step: int, sample_round: RoundFn
                  ) -> tuple[list[dict], list[tuple], list[bool] | None, dict]:
    """A step's rollouts (``run``: the loop's RunOptions): (records of every round, their groups,
    which groups train (None: as ``filter_groups`` says), the refill metrics). Without refill:
    one round, the step's prompts with the step's seed."""
    first = step_prompts(prompts, run.prompts_per_step, run.seed, step)
    if not run.refill:
        return (*sample_round(first, step_seed(run.seed, step)), None, {})
    r = Refill(prompts, run.prompts_per_step, run.seed, step, run.refill_max_rounds,
               run.refill_max_tokens).run(first, sample_round)
    return r.records, r.groups, r.keep(), r.metrics()
