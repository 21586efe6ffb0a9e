"""The methods examples/gradient_error.py measures, the regime options that reshape them (group
size, temperature) and how one method's groups are drawn (sample, verify, and for the expand
methods expand-tree's extra children, verified in turn).

A method is a row of loop-config overrides. ``--n`` sets every method's leaves per prompt: n
independent samples, or binary trees (width 2) of depth log2(n); an expand method samples a tree of
half the leaves and gives ``EXPAND_TOKENS_PER_LEAF`` x n extra sampled tokens per prompt to the
nodes whose rewards diverge (docs/design.md §4.17). Every method is then held to the same token
budget, so the expand methods compare at equal total tokens. ``--temperature`` sets the sampling
temperature of every method and of the reference: the reference is the gradient of the expected
reward of the policy that samples, so each temperature has its own.
"""

from __future__ import annotations

import math
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from examples.compare import ENTROPY_TREE, TREE  # noqa: E402
from tcli.config.stages import SampleOptions  # noqa: E402

INDEPENDENT = {"mode": "independent"}
# expand: a tree of half the leaves plus extra children where its rewards diverge
EXPAND = {"expand_width": 2, "expand_rounds": 2}
EXPAND_TOKENS_PER_LEAF = 15   # x n extra tokens per prompt (n = 8: 120, design §4.17's example)
METHODS: dict[str, dict] = {
    "rloo": {"estimator": "rloo", **INDEPENDENT},
    "grpo": {"estimator": "grpo", **INDEPENDENT},
    "dr_grpo": {"estimator": "dr_grpo", **INDEPENDENT},
    "tempo0.5": {"estimator": "tempo", "td_coef": 0.5, **INDEPENDENT},
    "tempo": {"estimator": "tempo", "td_coef": 1.0, **INDEPENDENT},
    "tempo2": {"estimator": "tempo", "td_coef": 2.0, **INDEPENDENT},
    "tempo-tree": {"estimator": "tempo", **TREE},
    "treerpo-tree": {"estimator": "treerpo", **TREE},
    "tempo-entropy": {"estimator": "tempo", **ENTROPY_TREE},
    "treerpo-entropy": {"estimator": "treerpo", **ENTROPY_TREE},
    "tempo-tree-expand": {"estimator": "tempo", **TREE, **EXPAND},
    "tempo-entropy-expand": {"estimator": "tempo", **ENTROPY_TREE, **EXPAND},
}
SAMPLE_KEYS = ("mode", "n", "width", "depth", "segment_tokens", "branch", "branch_entropy",
               "min_segment_tokens", "temperature")


def regime(row: dict, n: int | None, temperature: float | None) -> dict:
    """``row`` reshaped to ``n`` leaves per prompt and ``temperature`` (None: the row's own).
    Expand rows without ``n`` keep half their tree's leaves (8 → 4) and 15 x 8 extra tokens."""
    out = dict(row)
    if temperature is not None:
        out["temperature"] = temperature
    leaves = n if n is not None else out.get("width", 2) ** out.get("depth", 3)
    expand = "expand_width" in out
    if expand:
        out["expand_tokens"] = EXPAND_TOKENS_PER_LEAF * leaves
        leaves //= 2
    if out.get("mode") == "tree":
        out["depth"] = int(round(math.log2(leaves)))
        out["n"] = SampleOptions().n  # the task's n is the independent methods': not a tree's
    elif n is not None:
        out["n"] = n
    return out


def check_n(n: int | None) -> str | None:
    """None when ``n`` fits every method (a power of 2, at least 4: an expand tree has n/2 >= 2
    leaves), else the reason."""
    if n is None or (n >= 4 and n & (n - 1) == 0):
        return None
    return f"--n must be a power of 2 and at least 4 (trees are binary), got {n}"


def reference_row(ref_samples: int, temperature: float | None) -> dict:
    """The reference's overrides: ``ref_samples`` independent responses per prompt, RLOO."""
    row = {**INDEPENDENT, "n": ref_samples, "estimator": "rloo"}
    return {**row, "temperature": temperature} if temperature is not None else row


def sample_groups(s, cfg, prompts: list[dict], seed: int) -> list[list[dict]]:
    """One group per prompt (``cfg``'s sampling), verified, in order; with ``[expand]`` on, each
    group followed by its new leaves (expand-tree's ranking and budget, the same seed), verified."""
    from tcli.io import iter_groups
    from tcli.stages.expand import expand_groups
    from tcli.stages.sample import sample_records

    recs = verify(s, cfg, sample_records(s.engine, prompts, cfg.sample, seed=seed))
    groups = [g for _, g in iter_groups(enumerate(recs, 1), "<gradient-error>")]
    if not cfg.expand.enabled:
        return groups
    out = list(expand_groups(s.engine, groups, cfg.expand, seed=seed,
                             min_new_tokens=cfg.sample.min_new_tokens,
                             groups_per_call=len(groups)))
    fresh = iter(verify(s, cfg, [r for g in out for r in g if "reward" not in r]))
    return [[r if "reward" in r else next(fresh) for r in g] for g in out]


def verify(s, cfg, recs) -> list[dict]:
    """``recs`` scored by the task's verifier, in order."""
    from tcli.stages.verify import verify_records

    v = cfg.verify
    return list(verify_records(iter(enumerate(recs, 1)), "<gradient-error>", task=v.task,
                               timeout=v.timeout, workers=v.workers, pool=s.pool,
                               weights=v.weights, max_verifier_errors=v.max_verifier_errors))
