"""expand-tree's stage (docs/design.md §4.17): which nodes get new children and in what order
(mixed rewards first, by variance, then the recorded entropy), the token budget, seeds that do
not depend on batching, and expanded groups that build-tree, TEMPO and TreeRPO read as trees."""

from __future__ import annotations

import numpy as np
import pytest

from tcli.config.expand import ExpandOptions
from tcli.engines.sampling import Completion
from tcli.errors import DataError, UsageError
from tcli.stages.expand import ExpandStats, Node, child_seed, expand_groups, read_tree

SEG = 2     # tokens per segment of the hand-made trees
CAP = 12    # their max_new_tokens


def _record(path, rew, entropy=None, pid="g", sid=0):
    """A leaf of a hand-made segments tree: segment k holds [10 + path[k], 30 + k], so leaves
    below one node share its prefix; ``entropy``: node path -> entropy of its children's first
    token (others 0.1)."""
    toks, ends = [], []
    for k, c in enumerate(path):
        toks += [10 + c, 30 + k]
        ends.append(len(toks))
    rec = {"schema": "tcli.rollout/1", "prompt_id": pid, "sample_id": sid, "prompt": "1+1=",
           "answer": "2", "prompt_token_ids": [5, 6, 7], "token_ids": toks,
           "text": "x", "logprobs": [-1.0 - 0.01 * i for i in range(len(toks))],
           "node_path": list(path), "segment_ends": ends, "finish_reason": "stop",
           "temperature": 1.0, "top_p": 1.0, "max_new_tokens": CAP, "reward": float(rew),
           "verdict": {"correct": bool(rew)}, "values": [0.5] * (len(toks) + 1),
           "meta": {"source": "hand"}}
    if entropy is not None:
        ents = [0.1] * len(toks)
        for k in range(len(path)):
            ents[ends[k - 1] if k else 0] = entropy.get(tuple(path[:k]), 0.1)
        rec["entropies"] = ents
    return rec


# root (): children 0..4, 6 of 12 leaves right (var .25); (0,): rewards 1,0 (var .25); (1,):
# 1,1,1,0 (var .1875); (2,), (4,): all 0; (3,): all 1
LEAVES = [((0, 0), 1), ((0, 1), 0), ((1, 0), 1), ((1, 1), 1), ((1, 2), 1), ((1, 3), 0),
          ((2, 0), 0), ((2, 1), 0), ((3, 0), 1), ((3, 1), 1), ((4, 0), 0), ((4, 1), 0)]
ENTROPY = {(): 1.0, (0,): 2.0, (1,): 3.0, (2,): 0.5, (3,): 0.9, (4,): 0.7}


def _group(entropy=ENTROPY, pid="g"):
    return [_record(p, r, entropy, pid, i) for i, (p, r) in enumerate(LEAVES)]


def _order(tree) -> list:
    return [n.path for n in sorted(tree.nodes, key=Node.key)]


def test_mixed_nodes_first_by_variance_then_entropy():
    tree = read_tree(_group())
    # root and (0,) tie at p(1-p) = .25: the larger entropy first; (1,) .1875; then the nodes
    # without mixed rewards by entropy
    assert _order(tree) == [(0,), (), (1,), (3,), (4,), (2,)]
    var = {n.path: n.variance for n in tree.nodes}
    assert var[(0,)] == var[()] == 0.25 and var[(1,)] == 0.1875 and var[(2,)] == 0.0
    assert {n.path: n.entropy for n in tree.nodes} == ENTROPY


def test_without_entropies_ties_go_deeper_first():
    assert _order(read_tree(_group(entropy=None))) == [(0,), (), (1,), (2,), (3,), (4,)]


def test_only_nodes_that_branch_are_candidates():
    # an entropy tree: the root segment (0,) is shared by every leaf, the empty prefix has one child
    recs = [_record(p, r, None, "e", i) for i, (p, r) in
            enumerate([((0, 0), 1), ((0, 1), 0), ((0, 2, 0), 1), ((0, 2, 1), 1)])]
    assert sorted(n.path for n in read_tree(recs).nodes) == [(0,), (0, 2)]


class FakeEngine:
    """A plain engine class (the base Engine's generic continue_prefixes): ``length`` tokens per
    continuation, drawn from the request's seed; remembers what it was asked."""

    name, policy_version, model_path = "fake", 3, "fake-model"

    class tokenizer:
        @staticmethod
        def decode(ids, skip_special_tokens=True):
            return " ".join(map(str, ids))

    def __init__(self, length: int = 1):
        self.length, self.calls = length, []

    def _one(self, prompt, cfg, seed):
        self.calls.append((list(prompt), cfg.max_new_tokens, seed))
        k = min(self.length, cfg.max_new_tokens)
        return Completion([(seed >> j) % 50 + 1 for j in range(k)], [-0.5] * k, "stop",
                          [0.7] * k)

    def generate(self, prompts, n, cfg):
        return [[self._one(p, cfg, cfg.seed)] for p in prompts]

    def generate_entropy(self, prompts, n, cfg, *, top_k=20, seeds=None):
        return [[self._one(p, cfg, s)] for p, s in zip(prompts, seeds)]


def _expand(groups, engine, seed=0, per_call=16, **opts):
    stats = ExpandStats()
    out = list(expand_groups(engine, groups, ExpandOptions(**opts), seed=seed,
                             groups_per_call=per_call, stats=stats))
    return out, stats


def _new(recs):
    return [r for r in recs if "expand_round" in r]


def test_budget_goes_to_the_ranked_nodes_and_is_never_exceeded():
    # rooms: depth-1 nodes CAP - 2 = 10, the root 12. Round 1 (30 tokens): (0,) 10, root 12,
    # (1,) no longer fits. Round 2 (30 - 2 spent = 28): mixed nodes given nothing yet first:
    # (1,) 10, then (0,) 10; the root (12) no longer fits.
    (out,), stats = _expand([_group()], FakeEngine(1), tokens=30, width=1, rounds=2)
    new = _new(out)
    assert [(r["node_path"][:-1], r["expand_round"]) for r in new] == [
        ([0], 1), ([], 1), ([1], 2), ([0], 2)]
    assert [r["node_path"] for r in new] == [[0, 2], [5], [1, 4], [0, 3]]
    assert stats.spent == 4 and stats.requested == 30 and stats.leaves == 4
    assert stats.mixed_tokens == 4  # every new token went below a node with mixed rewards
    for length in (1, 5, 12):
        (out,), stats = _expand([_group()], FakeEngine(length), tokens=40, width=3, rounds=4)
        spent = sum(len(r["token_ids"]) - (r["segment_ends"][-2] if len(r["segment_ends"]) > 1
                                           else 0) for r in _new(out))
        assert 0 < spent == stats.spent <= 40


def test_new_records_continue_their_node_and_carry_nothing_of_the_old_response():
    eng = FakeEngine(3)
    (out,), _ = _expand([_group()], eng, seed=5, tokens=200, width=2, rounds=1)
    old, new = out[:len(LEAVES)], _new(out)
    assert old == _group()  # the originals pass unchanged
    assert [r["sample_id"] for r in new] == list(range(len(LEAVES), len(LEAVES) + len(new)))
    for r in new:
        path = tuple(r["node_path"][:-1])
        src = next(o for o in old if tuple(o["node_path"][:len(path)]) == path)
        cut = SEG * len(path)
        assert r["token_ids"][:cut] == src["token_ids"][:cut]
        assert r["logprobs"][:cut] == src["logprobs"][:cut]
        assert r["entropies"][:cut] == src["entropies"][:cut]
        assert r["segment_ends"] == src["segment_ends"][:len(path)] + [len(r["token_ids"])]
        assert len(r["logprobs"]) == len(r["entropies"]) == len(r["token_ids"]) == cut + 3
        for field in ("reward", "verdict", "values", "rewards", "advantages"):
            assert field not in r
        assert r["meta"] == {"source": "hand"} and r["policy_version"] == 3
        assert r["model"] == "fake-model" and r["text"] == " ".join(map(str, r["token_ids"]))
    # every child its own seed, a function of (seed, prompt, node path, child index)
    seeds = [s for _, _, s in eng.calls]
    assert len(set(seeds)) == len(seeds) == len(new)
    assert seeds[0] == child_seed(5, [5, 6, 7], tuple(new[0]["node_path"][:-1]),
                                  new[0]["node_path"][-1])


def test_generic_path_without_entropies_calls_generate_per_request():
    eng = FakeEngine(2)
    (out,), _ = _expand([_group(entropy=None)], eng, tokens=24, width=1, rounds=1)
    assert all("entropies" not in r for r in out)
    assert [c[1] for c in eng.calls] == [CAP - SEG, CAP]  # each asks for its own room
    assert eng.calls[0][0] == [5, 6, 7, 10, 30]            # prompt + the node's prefix


@pytest.mark.parametrize("change,field", [
    (lambda rs: rs[3].pop("reward"), "reward"),
    (lambda rs: rs[2].update(node_path=[], segment_ends=[]), "node_path"),
    (lambda rs: rs[4].update(temperature=0.7), "temperature"),
    (lambda rs: rs[1].update(segment_ends=[2, 5]), "segment_ends"),
    (lambda rs: rs[1].update(token_ids=[11, 30, 10, 31]), "segment_ends"),  # not (0,)'s prefix
    (lambda rs: rs[5].update(node_path=[1, 0]), "node_path"),               # a leaf twice
    (lambda rs: rs[0].update(loss_mask=[1, 1, 0, 0]), "loss_mask"),
])
def test_bad_groups_name_the_record_and_field(change, field):
    recs = _group()
    change(recs)
    with pytest.raises(DataError) as e:
        read_tree(recs)
    assert e.value.field == field and e.value.index is not None


def test_options_and_the_vllm_engine():
    with pytest.raises(UsageError, match="--expand-tokens"):
        ExpandOptions().require_budget()
    with pytest.raises(UsageError, match="expand.width"):
        ExpandOptions(tokens=8, width=0)
    with pytest.raises(UsageError, match="tree"):
        ExpandOptions(tokens=8).check_sampling("independent", "--mode (sample.mode)")
    vllm = pytest.importorskip("tcli.engines.vllm_engine")
    with pytest.raises(UsageError, match="--engine hf"):
        vllm.VLLMEngine.continue_prefixes(None, [[1]], [[]], None, seeds=[0])


# ----------------------------------------------------------------------------- on a real model

@pytest.fixture(scope="module")
def sampled(tiny_model):
    """Three prompts' trees from the tiny model, rewards from their last token (mixed)."""
    pytest.importorskip("torch")
    from tcli.config.stages import SampleOptions
    from tcli.engines.hf import HFEngine
    from tcli.stages.sample import sample_records

    import torch
    torch.set_num_threads(1)
    engine = HFEngine(tiny_model, device="cpu")
    opts = SampleOptions(mode="tree", width=2, depth=2, segment_tokens=4, max_new_tokens=10,
                         record_entropy=True, prompt_template="plain")
    prompts = [{"id": f"p{i}", "prompt": f"{i}+{i}=", "answer": str(2 * i)} for i in range(3)]
    recs = list(sample_records(engine, prompts, opts, seed=3))
    for r in recs:
        r["reward"] = _fake_reward(r)
    return engine, recs


def _fake_reward(rec) -> float:
    return float(rec["token_ids"][-1] % 2) if rec["token_ids"] else 0.0


def _groups(recs):
    from tcli.io import iter_groups

    return [g for _, g in iter_groups(enumerate(recs, 1), "<test>")]


def test_seeds_deterministic_and_batch_independent(sampled):
    engine, recs = sampled
    opts = dict(tokens=40, width=2, rounds=2)
    one, _ = _expand(_groups(recs), engine, seed=7, per_call=1, **opts)
    every, stats = _expand(_groups(recs), engine, seed=7, per_call=3, **opts)
    again, _ = _expand(_groups(recs), engine, seed=7, per_call=2, **opts)
    other, _ = _expand(_groups(recs), engine, seed=8, per_call=3, **opts)

    def key(out, f):
        return [[r[f] for r in _new(g)] for g in out]

    assert stats.leaves > 3 and 0 < stats.spent <= 3 * 40
    for f in ("token_ids", "node_path", "segment_ends", "sample_id", "finish_reason"):
        assert key(one, f) == key(every, f) == key(again, f), f
    for a, b in zip(sum(key(one, "logprobs"), []), sum(key(every, "logprobs"), [])):
        np.testing.assert_allclose(a, b, atol=1e-5)  # float32 matmuls of other batch shapes
    assert key(one, "token_ids") != key(other, "token_ids")


def test_expanded_groups_are_trees_build_tree_and_treerpo_read(sampled):
    from tcli.algos.estimators import ESTIMATORS, Group
    from tcli.config.stages import AdvantageOptions
    from tcli.stages.tree import write_tree

    engine, recs = sampled
    out, stats = _expand(_groups(recs), engine, seed=1, tokens=30, width=2, rounds=2)
    assert stats.leaves > 0
    checked = 0
    for group in out:
        for r in _new(group):
            assert "reward" not in r
            r["reward"] = _fake_reward(r)
        write_tree(Group.from_records(group))
        ESTIMATORS.get("treerpo").fn(Group.from_records(group), AdvantageOptions())
        for r in _new(group):  # the new leaf's prefix is its node's
            path = r["node_path"][:-1]
            cut = r["segment_ends"][-2] if len(path) else 0
            src = next(o for o in group if "expand_round" not in o
                       and o["node_path"][:len(path)] == path)
            assert r["token_ids"][:cut] == src["token_ids"][:cut]
            assert len(r["entropies"]) == len(r["token_ids"]) <= r["max_new_tokens"]
        for node in {tuple(r["node_path"][:k]) for r in group for k in range(len(r["node_path"]))}:
            below = [r for r in group if tuple(r["node_path"][:len(node)]) == node]
            cut = below[0]["segment_ends"][len(node) - 1] if node else 0
            prefix = below[0]["token_ids"][:cut]
            same = [r for r in group if r["token_ids"][:cut] == prefix]
            if len(same) != len(below) or cut >= len(below[0]["token_ids"]):
                continue  # another node drew the same tokens: P2T merges them
            v = below[0]["values"][cut]
            assert v == pytest.approx(np.mean([r["reward"] for r in below]), abs=1e-12)
            checked += 1
    assert checked >= 6


@pytest.mark.parametrize("every,pool", [(1, False), (3, False), (4, True)])
@pytest.mark.parametrize("least", [0, 5])
def test_continuations_of_any_length_decode_together_as_each_would_alone(tiny_model, every,
                                                                          pool, least):
    """The hf engine continues prefixes of different lengths in one batch, each row stopping at
    its own room: one prefill per share of min_new_tokens (one when it is 0), and every
    continuation what it is when sampled alone (per-token loop, every-k blocks, graph pool)."""
    import torch

    from tcli.engines.cuda_graphs import GraphDecoder
    from tcli.engines.hf import HFEngine
    from tcli.engines.sampling import SamplingConfig

    torch.set_num_threads(1)
    engine = HFEngine(tiny_model, device="cpu")
    engine.stop_every = every
    if pool:
        engine._graphs = GraphDecoder(engine, capture=False)
    rng = np.random.default_rng(0)
    lengths = [0, 2, 5, 9, 11, 2, 0, 7]
    prompts = [rng.integers(5, 60, size=3 + i % 3).tolist() for i in range(len(lengths))]
    prefixes = [rng.integers(5, 60, size=n).tolist() for n in lengths]
    seeds = [100 + i for i in range(len(lengths))]
    cfg = SamplingConfig(temperature=1.0, top_p=0.95, max_new_tokens=12, min_new_tokens=least)
    calls = []
    prefill = engine.prefill
    engine.prefill = lambda *a, **k: calls.append(1) or prefill(*a, **k)
    together = engine.continue_prefixes(prompts, prefixes, cfg, seeds=seeds, entropy=True)
    shares = {max(0, least - n) for n in lengths}
    assert len(calls) == len(shares)
    for i, got in enumerate(together):
        alone, = engine.continue_prefixes([prompts[i]], [prefixes[i]], cfg, seeds=[seeds[i]],
                                          entropy=True)
        assert list(got.token_ids) == list(alone.token_ids), i
        assert got.finish_reason == alone.finish_reason
        np.testing.assert_allclose(got.logprobs, alone.logprobs, atol=1e-5)
        np.testing.assert_allclose(got.entropies, alone.entropies, atol=1e-5)
        room = 12 - lengths[i]
        assert max(1, min(room, least - lengths[i])) <= len(got.token_ids) <= room
        assert (got.finish_reason == "length") == (len(got.token_ids) == room
                                                   and got.token_ids[-1] not in
                                                   engine.eos_token_ids)
    assert any(c.finish_reason == "length" for c in together)


def test_the_loops_expand_step_passes_its_settings_and_verifies_only_the_new_leaves(monkeypatch):
    """The loop's [expand] step: expand_groups gets the round's seed, min_new_tokens and the
    sampler's groups per call; only the new leaves are verified, each in its own place; its time
    counts as sampling's; its metrics count the new leaves' last segments only."""
    from types import SimpleNamespace

    import tcli.loop.expand_step as es
    from tcli.loop.steps import StepTimer

    seen = {}

    def expand_groups(engine, groups, opts, **kw):
        seen.update(kw, engine=engine)
        for g in groups:
            leaf = {k: v for k, v in g[0].items() if k != "reward"}
            yield [*g, {**leaf, "sample_id": 9, "node_path": [0, 1], "segment_ends": [2, 5],
                        "token_ids": [4] * 5, "expand_round": 1}]

    monkeypatch.setattr(es, "expand_groups", expand_groups)
    verified = []

    def verify(recs):
        verified.extend((r["prompt_id"], r["sample_id"]) for r in recs)
        return [{**r, "reward": float(ord(r["prompt_id"]))} for r in recs]

    cfg = SimpleNamespace(expand=SimpleNamespace(enabled=True),
                          sample=SimpleNamespace(min_new_tokens=3, prompts_per_batch=5))
    loop = SimpleNamespace(cfg=cfg, engine="engine", verify=verify)
    recs = [{"prompt_id": p, "sample_id": j, "node_path": [0, j], "segment_ends": [2, 4],
             "token_ids": [4] * 4, "reward": 0.0} for p in "ab" for j in range(2)]
    timer = StepTimer()
    out = es.expand_step(loop, recs, 1234, timer)
    assert seen == {"seed": 1234, "min_new_tokens": 3, "groups_per_call": 5, "engine": "engine"}
    assert verified == [("a", 9), ("b", 9)]
    assert [(r["prompt_id"], r["sample_id"], r["reward"]) for r in out] == [
        ("a", 0, 0.0), ("a", 1, 0.0), ("a", 9, 97.0), ("b", 0, 0.0), ("b", 1, 0.0), ("b", 9, 98.0)]
    assert set(timer.seconds) == {"sample", "verify"}
    assert es.expand_metrics(out, cfg) == {"expand_tokens": 2 * 3, "expand_leaves": 2}
    cfg.expand.enabled = False
    assert es.expand_step(loop, recs, 1, timer) is recs and es.expand_metrics(out, cfg) == {}
