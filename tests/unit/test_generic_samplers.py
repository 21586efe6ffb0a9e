"""The ``Engine`` base's samplers (tcli/engines/base.py) against spy engines: which engine calls
they make and how they cut the budgets (docs/design.md §4.6, §4.17).

A spy answers every request with one repeated token and records the settings of each call, so
the expected calls and leaves are counted by hand.
"""

from __future__ import annotations

import pytest

from tcli.engines.base import (Engine, by_room, sample_entropy_tree_generic,
                               sample_tree_generic)
from tcli.engines.sampling import Completion, EntropyRule, SamplingConfig


class Spy(Engine):
    """``generate`` / ``generate_entropy`` giving ``max_new_tokens`` copies of token 3 (entropy
    0: no split) and recording (prompt lengths, n, max_new_tokens, min_new_tokens)."""

    name = "spy"

    def __init__(self):
        self.calls = []

    def generate(self, prompts, n, cfg):
        self.calls.append(([len(p) for p in prompts], n, cfg.max_new_tokens, cfg.min_new_tokens))
        k = cfg.max_new_tokens
        return [[Completion([3] * k, [-1.0] * k, "length", [0.0] * k) for _ in range(n)]
                for _ in prompts]

    def generate_entropy(self, prompts, n, cfg, *, top_k=None, seeds=None):
        assert seeds is not None and len(seeds) == len(prompts)
        return self.generate(prompts, n, cfg)


def test_a_path_that_reaches_max_new_tokens_before_the_last_level_is_a_leaf_there():
    """Depth 3, segments of 5, 8 tokens at most: level 2 gets the 3 left, and its nodes are
    leaves (no third level of empty segments)."""
    spy = Spy()
    cfg = SamplingConfig(max_new_tokens=8, seed=1)
    (leaves,) = sample_tree_generic(spy, [[5, 6]], width=2, depth=3, segment_tokens=5, cfg=cfg)
    assert [lf.node_path for lf in leaves] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert all(lf.segment_ends == [5, 8] and len(lf.token_ids) == 8 for lf in leaves)
    assert spy.calls == [([2], 2, 5, 0), ([7], 4, 3, 0)]   # the two twins: one request


def test_entropy_probes_count_min_new_tokens_from_the_responses_start():
    """10 tokens, at least 6, probes of 4: the probes ask for 4 (at least 6), 4 (at least the
    2 left) and the 2 left (at least 0)."""
    spy = Spy()
    cfg = SamplingConfig(max_new_tokens=10, min_new_tokens=6, seed=1)
    rule = EntropyRule(width=2, depth=2, threshold=0.5, min_segment=0, top_k=20)
    (leaves,) = sample_entropy_tree_generic(spy, [[5, 6, 7]], rule, 4, cfg)
    assert [(lf.node_path, len(lf.token_ids), lf.segment_ends) for lf in leaves] == [
        ((0,), 10, [10])]
    assert spy.calls == [([3], 1, 4, 6), ([7], 1, 4, 2), ([11], 1, 2, 0)]


def test_continuations_are_grouped_by_their_room_and_share_of_min_new_tokens():
    cfg = SamplingConfig(max_new_tokens=10, min_new_tokens=4, seed=1)
    groups = by_room([[1] * 3, [1], [1] * 3, [1] * 9], cfg)
    assert [(sub.max_new_tokens, sub.min_new_tokens, idx) for sub, idx in groups] == [
        (7, 1, [0, 2]), (9, 3, [1]), (1, 0, [3])]
    with pytest.raises(ValueError, match="prefix #1 leaves no room: 10 of 10"):
        by_room([[1], [1] * 10], cfg)


class SeedSpy(Spy):
    """Answers with token 10 + seed % 1000 (each request's own seed), entropy 1 at a probe's
    first token and 0 after: a node that may split does so at its first token."""

    def generate_entropy(self, prompts, n, cfg, *, top_k=None, seeds=None):
        k = cfg.max_new_tokens
        return [[Completion([10 + s % 1000] * k, [-1.0] * k, "length", [1.0] + [0.0] * (k - 1))
                 for _ in range(n)] for s in seeds]


def test_entropy_tree_siblings_with_the_same_tokens_continue_on_their_own_streams():
    """The root splits at its first token; both children draw the same first probe (one request
    for two completions), then each continues with its own seed: their tails differ."""
    cfg = SamplingConfig(max_new_tokens=8, seed=3)
    rule = EntropyRule(width=2, depth=1, threshold=0.5, min_segment=0, top_k=20)
    (leaves,) = sample_entropy_tree_generic(SeedSpy(), [[5, 6]], rule, 4, cfg)
    assert [(lf.node_path, lf.segment_ends) for lf in leaves] == [((0, 0), [0, 8]),
                                                                   ((0, 1), [0, 8])]
    a, b = (lf.token_ids for lf in leaves)
    assert a[:4] == b[:4] and a[4:] != b[4:]


class SeedGenerateSpy(Spy):
    """``generate`` answering with token 10 + cfg.seed % 1000."""

    def generate(self, prompts, n, cfg):
        super().generate(prompts, n, cfg)
        k = cfg.max_new_tokens
        return [[Completion([10 + cfg.seed % 1000] * k, [-1.0] * k, "length") for _ in range(n)]
                for _ in prompts]


def test_generic_continuations_use_their_own_seeds_not_the_calls():
    """Each continuation's stream is a function of its own seed and tokens (docs/design.md
    §4.17): the same prefix with two seeds gives two continuations, and ``cfg.seed`` changes
    nothing. Room: 6 - 2 = 4 tokens."""
    spy = SeedGenerateSpy()
    got = [[c.token_ids for c in spy.continue_prefixes([[1], [1]], [[2, 2], [2, 2]],
                                                       SamplingConfig(max_new_tokens=6, seed=s),
                                                       seeds=[7, 8])] for s in (0, 1)]
    assert got[0] == got[1] == [[17] * 4, [18] * 4]


@pytest.mark.parametrize("record", [False, True])
def test_generic_entropy_trees_carry_entropies_only_when_asked(record):
    from types import SimpleNamespace

    from tcli.engines.trees import sample_leaves

    opts = SimpleNamespace(mode="tree", branch="entropy", width=2, depth=1, branch_entropy=0.5,
                           min_segment_tokens=0, segment_tokens=4, record_entropy=record)
    (leaves,) = sample_leaves(SeedSpy(), [[5, 6]], opts, SamplingConfig(max_new_tokens=8),
                              native=False)
    assert len(leaves) == 2
    assert all((lf.entropies is not None) == record for lf in leaves)
    assert not record or all(len(lf.entropies) == 8 for lf in leaves)


def test_topk_entropy_is_never_negative_when_round_off_lifts_a_log_prob_above_zero():
    """An engine's top log-prob may come back a hair above 0 (its own float round-off): the
    estimate stays 0, which show-tree accepts, not -2e-7, which it rejects."""
    from tcli.engines.sampling import topk_entropy

    assert topk_entropy([[2e-7, -40.0, float("-inf")]]).tolist() == [0.0]
