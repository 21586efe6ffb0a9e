"""The loop's expand step (docs/design.md §4.17): with ``[expand] tokens > 0`` (tree mode only),
each step's verified trees get new children where their rewards diverge, and the new leaves are
verified in turn, before advantages. Every rank expands its own groups (the stage depends on
(seed, prompt, node, child) only), so the metrics are read from the gathered rollouts. Its time
counts as sampling time, as its tokens count in ``sampled_tokens``."""

from __future__ import annotations

from tcli.io import iter_groups
from tcli.stages.expand import expand_groups
from tcli.stages.sample import sampled_tokens


def expand_step(loop, records: list[dict], seed: int, timer) -> list[dict]:
    """``records`` (verified, in groups) followed in each group by its verified new leaves;
    ``records`` themselves when expansion is off. ``seed``: the sampling round's seed."""
    cfg = loop.cfg
    if not cfg.expand.enabled:
        return records
    groups = (recs for _, recs in iter_groups(enumerate(records, 1), "<loop>"))
    with timer("sample"):  # sampled_tokens counts these tokens: tokens/s stays sampling's
        out = [r for g in expand_groups(loop.engine, groups, cfg.expand,
                                        seed=seed,
                                        min_new_tokens=cfg.sample.min_new_tokens,
                                        groups_per_call=cfg.sample.prompts_per_batch) for r in g]
    fresh = [r for r in out if "reward" not in r]
    with timer("verify"):
        scored = iter(loop.verify(fresh))
    return [r if "reward" in r else next(scored) for r in out]


def expand_metrics(rollouts: list[dict], cfg) -> dict:
    """``expand_tokens`` (sampled for new leaves: their last segment) and ``expand_leaves``;
    nothing when expansion is off."""
    if not cfg.expand.enabled:
        return {}
    new = [r for r in rollouts if "expand_round" in r]
    tokens = sum(sampled_tokens(r, r["segment_ends"][-2] if len(r["segment_ends"]) > 1 else 0)
                 for r in new)
    return {"expand_tokens": tokens, "expand_leaves": len(new)}
