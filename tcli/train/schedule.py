"""Learning-rate schedules over optimizer steps (``--lr-schedule``, ``--warmup-steps``,
``--min-lr-ratio``, ``--schedule-steps``).

The position in a schedule is the checkpoint's ``optimizer_steps`` counter (``tcli_state.json``),
so chained ``train-step`` calls and ``loop --resume`` continue a schedule exactly where it was:
the lr of an optimizer step depends only on the options and on how many steps came before it.

For the optimizer step with index ``k`` (0 = the first step ever taken from the start model),
warm-up ``W``, span ``S`` (warm-up included) and end ratio ``m``:

- ``k < W``: ``lr * (k + 1) / W`` (linear warm-up; the first step is not wasted at lr 0);
- else, with progress ``p = min(1, (k - W) / (S - W))``:
  ``constant``: ``lr``; ``linear``: ``lr * (1 - (1 - m) p)``;
  ``cosine``: ``lr * (m + (1 - m) (1 + cos(pi p)) / 2)``.

Steps beyond the span keep the end value (``m * lr`` for linear and cosine). With ``m = 0`` the
decay part equals transformers' ``get_linear_schedule_with_warmup`` /
``get_cosine_schedule_with_warmup``.
"""

from __future__ import annotations

import math
from typing import Callable

from tcli.registry import Registry

# name -> factor(p, m): the multiplier of lr after warm-up at progress p in [0, 1]
LR_SCHEDULES: Registry[Callable[[float, float], float]] = Registry("lr schedule")


@LR_SCHEDULES.register("constant")
def constant(p: float, m: float) -> float:
    return 1.0


@LR_SCHEDULES.register("linear")
def linear(p: float, m: float) -> float:
    return 1.0 - (1.0 - m) * p


@LR_SCHEDULES.register("cosine")
def cosine(p: float, m: float) -> float:
    return m + (1.0 - m) * 0.5 * (1.0 + math.cos(math.pi * p))


def lr_factor(name: str, k: int, warmup: int, span: int, min_ratio: float) -> float:
    """The multiplier of lr for the optimizer step with index ``k`` (0-based)."""
    if k < warmup:
        return (k + 1) / warmup
    decay = span - warmup
    p = 1.0 if decay <= 0 else min(1.0, (k - warmup) / decay)
    return LR_SCHEDULES.get(name)(p, min_ratio)


def lr_at(opts, k: int) -> float:
    """The lr of optimizer step ``k`` under TrainOptions ``opts``."""
    return opts.lr * lr_factor(opts.lr_schedule, k, opts.warmup_steps, opts.schedule_steps,
                               opts.min_lr_ratio)
