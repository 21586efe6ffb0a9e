"""What a stage asks an engine for: the leaves of every prompt, n independent samples or a tree.

Where a tree splits is a registered branch rule (``BRANCH_RULES``): ``segments`` (every
``segment_tokens``), ``entropy`` (``EntropyRule``: where the sampling entropy exceeds a
threshold) or ``tool`` (after each tool result; needs a toolset, docs/design.md §5.8). Each
rule runs the engine's own sampler (native on ``hf``) or, with ``native=False``, the generic one
of the ``Engine`` base. ``opts`` is any object with the sample settings
(``SampleOptions``).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Callable

from tcli.engines.base import (ENTROPY_TOP_K, Engine, EntropyRule, SamplingConfig, ToolPlan,
                               TreeLeaf, sample_entropy_tree_generic, sample_tree_generic)
from tcli.errors import UsageError
from tcli.registry import Registry

TreeSampler = Callable[..., "list[list[TreeLeaf]]"]
BRANCH_RULES: Registry[TreeSampler] = Registry("branch rule")


@BRANCH_RULES.register("segments")
def _segments_tree(engine: Engine, ids, opts, cfg: SamplingConfig, native: bool
                   ) -> list[list[TreeLeaf]]:
    """Every node gets ``width`` children of at most ``segment_tokens`` tokens."""
    if native:
        return engine.sample_tree(ids, width=opts.width, depth=opts.depth,
                                  segment_tokens=opts.segment_tokens, cfg=cfg,
                                  entropy=opts.record_entropy)
    return sample_tree_generic(engine, ids, opts.width, opts.depth, opts.segment_tokens, cfg,
                               opts.record_entropy)


@BRANCH_RULES.register("entropy")
def _entropy_tree(engine: Engine, ids, opts, cfg: SamplingConfig, native: bool
                  ) -> list[list[TreeLeaf]]:
    """Nodes split where the sampling entropy exceeds ``branch_entropy`` (``EntropyRule``)."""
    rule = EntropyRule(opts.width, opts.depth, opts.branch_entropy, opts.min_segment_tokens)
    if native:
        return engine.sample_entropy_tree(ids, rule, cfg, record=opts.record_entropy,
                                          probe_tokens=opts.segment_tokens)
    return sample_entropy_tree_generic(engine, ids, replace(rule, top_k=ENTROPY_TOP_K),
                                       opts.segment_tokens, cfg, opts.record_entropy)


@BRANCH_RULES.register("tool")
def _tool_tree(engine: Engine, ids, opts, cfg: SamplingConfig, native: bool
               ) -> list[list[TreeLeaf]]:
    """Nodes split at the root and right after each tool result: needs a toolset."""
    raise UsageError("--branch tool splits after tool results: give --tools")


def tool_plan(opts, toolset) -> ToolPlan:
    """Independent episodes (``n`` per prompt), or a tree split after tool results."""
    if opts.mode == "tree":
        return ToolPlan(toolset, opts.max_turns, opts.width, opts.depth)
    return ToolPlan(toolset, opts.max_turns, opts.n, 1)


def sample_leaves(engine: Engine, ids, opts, cfg: SamplingConfig, native: bool = True,
                  toolset=None) -> list[list[TreeLeaf]]:
    """Leaves per prompt: a tree (its branch rule, native or generic) or n independent samples;
    with a ``toolset``, multi-turn episodes with tool calls (``--branch tool`` trees)."""
    if toolset is not None:
        return engine.sample_with_tools(ids, tool_plan(opts, toolset), cfg,
                                        entropy=opts.record_entropy)
    if opts.mode == "tree":
        return BRANCH_RULES.get(opts.branch)(engine, ids, opts, cfg, native)
    return engine.sample_independent(ids, opts.n, cfg, entropy=opts.record_entropy, native=native)
