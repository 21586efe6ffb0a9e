"""Multi-turn sampling with tool calls on the hf engine (tcli/engines/turns.py, docs/design.md
§5.8): the token and mask layout, log-probs against a teacher-forced forward, the KV-cache path
against a sampler that recomputes every step, determinism across batching, the turn and token
caps, tool trees, and the stage's records through build-tree, advantages and train-step.

The toolset here is test-local (the protocol of tcli.tools: ``stop_strings``, ``step``,
``observation``), so these tests do not need tcli.tools."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import orjson
import pytest

torch = pytest.importorskip("torch")

from conftest import TINY, jsonl, run_tcli, shared_model  # noqa: E402
from tcli.config.stages import SampleOptions  # noqa: E402
from tcli.engines.sampling import SamplingConfig, ToolPlan  # noqa: E402
from tcli.stages.sample import sample_records  # noqa: E402

ALPHABET = "abcdefghij"   # a small vocabulary: a random model writes the stop strings often
PROMPTS = [{"id": "p0", "prompt": "abc"}, {"id": "p1", "prompt": "defghij"},
           {"id": "p2", "prompt": "jihgfedcbajihg"}]


@dataclass
class Turn:
    call: dict | None
    raw: str
    result: str
    error: str | None
    seconds: float = 0.0

    def as_record(self) -> dict:
        return {"call": self.call, "raw": self.raw, "result": self.result, "error": self.error,
                "seconds": self.seconds}


class Rev:
    """A call ends with "ab" or "j"; the tool reverses the last five characters of the turn.
    A turn that ends with "j" and holds an "i" has no call (the episode ends); a body with an
    "h" is a tool error. Every call is logged."""

    stop_strings = ("ab", "j")

    def __init__(self):
        self.log: list[str] = []

    def system_text(self) -> str:
        return "ij"

    def step(self, text: str):
        self.log.append(text)
        assert any(text.endswith(s) for s in self.stop_strings), text
        if text.endswith("j") and "i" in text:
            return None
        body = text[-5:]
        return Turn({"name": "rev"}, text, body[::-1], "tool_error" if "h" in body else None)

    def observation(self, turn) -> str:
        return turn.result + "c"


class Never(Rev):
    stop_strings = ("xyz",)   # not in the alphabet: no call ever


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield shared_model(tmp_path_factory, seed=3, alphabet=ALPHABET, **TINY)
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def engine(model):
    from tcli.engines.hf import HFEngine

    return HFEngine(model)


def ids(engine, prompts=PROMPTS):
    return [engine.tokenizer(p["prompt"])["input_ids"] for p in prompts]


def episodes(engine, plan_kw=None, prompts=PROMPTS, tools=None, **cfg_kw):
    cfg = SamplingConfig(**{"temperature": 1.0, "max_new_tokens": 40, "seed": 5, **cfg_kw})
    plan = ToolPlan(tools or Rev(), **{"max_turns": 3, "width": 4, "depth": 1, **(plan_kw or {})})
    return engine.sample_with_tools(ids(engine, prompts), plan, cfg)


def spans(mask):
    """(start, end) of every run of 0s."""
    out, t = [], 0
    while t < len(mask):
        if mask[t] == 0:
            e = t
            while e < len(mask) and mask[e] == 0:
                e += 1
            out.append((t, e))
            t = e
        else:
            t += 1
    return out


def test_layout_tokens_mask_logprobs_and_turns(engine, monkeypatch):
    import tcli.engines.turns as turns

    tok, tools, batches = engine.tokenizer, Rev(), []
    real = turns._run_calls
    monkeypatch.setattr(turns, "_run_calls", lambda steps, plan: batches.append(len(steps))
                        or real(steps, plan))
    leaves = [lf for g in episodes(engine, tools=tools) for lf in g]
    assert max(batches) >= 2   # rows that paused at the same step: their calls ran together
    assert sum(len(lf.turns) for lf in leaves) >= 5 and any(not lf.turns for lf in leaves)
    assert any(lf.tool_errors for lf in leaves)
    for lf in leaves:
        n = len(lf.token_ids)
        assert len(lf.loss_mask) == len(lf.logprobs) == n <= 40 and set(lf.loss_mask) <= {0, 1}
        env = [t for t in range(n) if lf.loss_mask[t] == 0]
        assert all(lf.logprobs[t] == 0.0 for t in env)
        assert all(lf.logprobs[t] < 0.0 for t in range(n) if lf.loss_mask[t])
        assert lf.tool_errors == sum(t["error"] is not None for t in lf.turns)
        runs = spans(lf.loss_mask)
        assert len(runs) == len(lf.turns)   # every result's observation is one span here
        for (s, e), turn in zip(runs, lf.turns):
            assert turn["result"] == turn["raw"][-5:][::-1]   # each row got its own call's result
            obs = tok(turn["result"] + "c", add_special_tokens=False)["input_ids"]
            assert lf.token_ids[s:e] == obs[:e - s] and (e - s == len(obs) or e == 40)
            assert turn["raw"] == tok.decode(lf.token_ids[(runs[runs.index((s, e)) - 1][1]
                                                           if runs.index((s, e)) else 0):s])
        if lf.finish_reason == "stop" and lf.token_ids[-1] != tok.eos_token_id:
            assert lf.loss_mask[-1] == 1   # a stop string without a call ends the episode
    assert len(tools.log) >= sum(len(lf.turns) for lf in leaves)


def test_policy_logprobs_equal_a_teacher_forced_forward(engine):
    """The KV cache fed with observation tokens gives the logits of one forward over the whole
    trajectory: policy log-probs agree up to float32 summation order (~1e-6 here; 1e-4 as the
    other teacher-forced checks use), while a missed observation token, a wrong position or a
    stale cache row moves them by 1e-2 or more."""
    prompts = ids(engine)
    for p, group in zip(prompts, episodes(engine, temperature=0.7)):
        for lf in group:
            x = torch.tensor([p + lf.token_ids])
            with torch.no_grad():
                logits = engine.model(input_ids=x).logits[0, len(p) - 1:-1].float()
            lp = torch.log_softmax(logits / 0.7, -1).gather(
                1, torch.tensor(lf.token_ids)[:, None])[:, 0].numpy()
            m = np.array(lf.loss_mask, dtype=bool)
            np.testing.assert_allclose(np.array(lf.logprobs)[m], lp[m], atol=1e-4, rtol=0)


def recomputed(engine, prompt, c, plan, cfg):
    """One episode sampled by recomputing the whole sequence at every token (no cache)."""
    from tcli.engines.rng import child_key, prompt_key, uniforms_at
    from tcli.engines.turns import StopScan

    key, tokens, mask, turn_start, turns = child_key(prompt_key(cfg.seed, prompt), c), [], [], 0, 0
    scan, queue = StopScan(engine.tokenizer, plan.toolset.stop_strings), []
    while True:
        if queue:
            tokens.append(queue.pop(0))
            mask.append(0)
            turn_start = len(tokens) if not queue else turn_start
            if len(tokens) >= cfg.max_new_tokens:
                return tokens, mask, "length"
            continue
        with torch.no_grad():
            logits = engine.model(input_ids=torch.tensor([prompt + tokens])).logits[:, -1].float()
        u = torch.from_numpy(uniforms_at(np.array([key], dtype=np.uint64), [len(tokens)]))
        t, _ = engine._sample(logits, None, np.array([len(tokens)]), cfg, u=u)
        tokens.append(int(t))
        mask.append(1)
        if int(t) in engine.eos_token_ids:
            return tokens, mask, "stop"
        if len(tokens) >= cfg.max_new_tokens:
            return tokens, mask, "length"
        text = scan.call_text(tokens, turn_start)
        if text is not None:
            if turns >= plan.max_turns:
                return tokens, mask, "length"
            turn = plan.toolset.step(text)
            if turn is None:
                return tokens, mask, "stop"
            turns += 1
            queue = engine.tokenizer(plan.toolset.observation(turn),
                                     add_special_tokens=False)["input_ids"]
            queue = queue[:cfg.max_new_tokens - len(tokens)]


def test_kv_reuse_gives_the_tokens_of_recomputing_from_scratch(engine):
    cfg = SamplingConfig(temperature=1.0, max_new_tokens=40, seed=5)
    plan = ToolPlan(Rev(), 2, 4, 1)
    prompts = ids(engine)[:2]
    out = engine.sample_with_tools(prompts, plan, cfg)
    for p, group in zip(prompts, out):
        for c, lf in enumerate(group):
            assert (lf.token_ids, lf.loss_mask, lf.finish_reason) == recomputed(engine, p, c, plan,
                                                                                cfg)


def records(engine, tools_cls=Rev, **kw):
    opts = SampleOptions(**{"n": 3, "max_new_tokens": 30, "prompt_template": "plain",
                            "chat_template": False, "temperature": 1.0, **kw})
    return list(sample_records(engine, PROMPTS, opts, seed=7, toolset=tools_cls()))


@pytest.mark.parametrize("kw", [{}, dict(mode="tree", branch="tool", width=2, depth=2,
                                         tools="rev")], ids=["independent", "tree"])
def test_same_seed_same_rollouts_for_any_batching(model, kw):
    """Tokens, masks, turns and finish reasons are identical for any batching (one row per
    piece at batch_tokens 40); log-probs agree up to the round-off of batched matmuls
    (docs/design.md §6.1)."""
    from tcli.engines.hf import HFEngine

    runs = [records(HFEngine(model, batch_tokens=bt), prompts_per_batch=ppb, **kw)
            for bt, ppb in ((1 << 20, 3), (40, 1), (200, 2))]
    assert any(0 in r["loss_mask"] for r in runs[0])
    for other in runs[1:]:
        for a, b in zip(map(dict, runs[0]), other, strict=True):
            np.testing.assert_allclose(a.pop("logprobs"), b.pop("logprobs"), atol=1e-5, rtol=0)
            assert a == b
    again = records(HFEngine(model), prompts_per_batch=3, **kw)
    assert [r["token_ids"] for r in again] == [r["token_ids"] for r in runs[0]]


def test_turn_and_token_caps(engine):
    tok = engine.tokenizer
    for max_turns, cap in ((1, 40), (3, 12)):
        for lf in (lf for g in episodes(engine, {"max_turns": max_turns},
                                        max_new_tokens=cap) for lf in g):
            assert len(lf.token_ids) <= cap and len(lf.turns) <= max_turns
            if lf.finish_reason == "length" and len(lf.token_ids) < cap:
                # a call beyond the limit: the episode ends right after it, the call not run
                text = tok.decode(lf.token_ids[spans(lf.loss_mask)[-1][1]
                                               if lf.turns else 0:])
                assert len(lf.turns) == max_turns and text.endswith(Rev.stop_strings)
            if len(lf.token_ids) == cap and lf.token_ids[-1] != tok.eos_token_id:
                assert lf.finish_reason == "length"
    cut = [lf for g in episodes(engine, max_new_tokens=8) for lf in g]
    assert any(lf.loss_mask[-1] == 0 for lf in cut)   # an observation cut to the room left
    assert all(lf.token_ids == [] and lf.finish_reason == "length"
               for g in episodes(engine, max_new_tokens=0) for lf in g)


def test_an_episode_without_calls_is_the_plain_sample(engine):
    cfg = SamplingConfig(temperature=1.0, max_new_tokens=30, seed=5, min_new_tokens=3)
    prompts = ids(engine)
    plain = engine.sample_independent(prompts, 4, cfg)
    tools = engine.sample_with_tools(prompts, ToolPlan(Never(), 3, 4, 1), cfg)
    for a, b in zip(plain, tools):
        for x, y in zip(a, b):
            assert (x.token_ids, x.logprobs, x.finish_reason) == (y.token_ids, y.logprobs,
                                                                  y.finish_reason)
            assert y.loss_mask == [1] * len(y.token_ids) and y.turns == []


def test_min_new_tokens_masks_eos_per_row(engine):
    for lf in (lf for g in episodes(engine, min_new_tokens=6) for lf in g):
        assert engine.tokenizer.eos_token_id not in lf.token_ids[:6]


def test_stop_scan_decodes_the_tail_and_cuts_after_the_stop_string():
    from tcli.engines.turns import StopScan

    class Pieces:
        vocab = ["<r", "ev>", "ab", "c</", "rev>\n", "x"]

        def decode(self, ids, skip_special_tokens=False):
            return "".join(self.vocab[i] for i in ids)

    scan = StopScan(Pieces(), ("</rev>",))
    assert scan.call_text([0, 1, 2, 3], 0) is None
    assert scan.call_text([0, 1, 2, 3, 4], 0) == "<rev>abc</rev>"   # the token runs past it
    assert scan.call_text([0, 1, 2, 3, 4, 5], 0) is None             # not in the newest token
    assert scan.call_text([5, 0, 1, 2, 3, 4], 1) == "<rev>abc</rev>"
    assert StopScan(Pieces(), ()).call_text([0, 1], 0) is None


def test_tool_tree_siblings_share_everything_up_to_the_observation(engine):
    groups = episodes(engine, {"width": 2, "depth": 3})
    splits = 0
    for group in groups:
        assert 2 <= len(group) <= 8
        by_path = {tuple(lf.node_path): lf for lf in group}
        assert len(by_path) == len(group) and {p[0] for p in by_path} == {0, 1}
        for lf in group:
            assert len(lf.segment_ends) == len(lf.node_path) and lf.segment_ends[-1] == len(
                lf.token_ids)
            for k, end in enumerate(lf.segment_ends[:-1]):   # a split right after a result
                assert lf.loss_mask[end - 1] == 0
                sib = [o for o in group if o.node_path[:k + 1] == lf.node_path[:k + 1]
                       and o.node_path[k + 1] != lf.node_path[k + 1]]
                assert sib and all(o.token_ids[:end] == lf.token_ids[:end] for o in sib)
                splits += 1
    assert splits


def test_entropies_with_tools_are_zero_on_environment_tokens(engine):
    cfg = SamplingConfig(temperature=1.0, max_new_tokens=30, seed=5)
    out = engine.sample_with_tools(ids(engine), ToolPlan(Rev(), 3, 2, 1), cfg, entropy=True)
    for lf in (lf for g in out for lf in g):
        assert len(lf.entropies) == len(lf.token_ids)
        assert all(h == 0.0 for h, m in zip(lf.entropies, lf.loss_mask) if not m)
        assert all(h > 0.0 for h, m in zip(lf.entropies, lf.loss_mask) if m)


def test_records_carry_the_mask_turns_and_tool_counts(engine):
    recs = records(engine)
    assert len(recs) == 9 and any(r["tool_calls"] for r in recs)
    for r in recs:
        assert len(r["loss_mask"]) == len(r["token_ids"]) == len(r["logprobs"])
        assert r["tool_calls"] == len(r["turns"]) and r["node_path"] == []
        assert r["prompt_token_ids"][:3] == engine.tokenizer("ij\n\n")["input_ids"][:3]
    tree = records(engine, mode="tree", branch="tool", width=2, depth=2, tools="rev")
    assert all(r["node_path"] and r["segment_ends"][-1] == len(r["token_ids"]) for r in tree)


def test_the_stage_passes_tree_shape_and_entropy_recording_to_episodes(engine):
    """--branch tool --width 2 --depth 2 splits after tool results (two-level paths, more leaves
    than the root's width), and --record-entropy gives every token its entropy, tools or not."""
    tree = records(engine, mode="tree", branch="tool", width=2, depth=2, tools="rev",
                   record_entropy=True)
    assert max(len(r["node_path"]) for r in tree) == 2
    by_prompt: dict = {}
    for r in tree:
        by_prompt.setdefault(r["prompt_id"], []).append(r)
    assert max(map(len, by_prompt.values())) > 2 and all(len(g) <= 4 for g in by_prompt.values())
    for r in tree + records(engine, record_entropy=True):
        assert len(r["entropies"]) == len(r["token_ids"])


def test_sampled_rollouts_train_without_gradient_from_environment_tokens(engine, model,
                                                                         monkeypatch):
    """sample (tools) | build-tree | advantages | train-step: the gradient w.r.t. every
    environment token's log-prob is exactly 0 even with a non-zero advantage written there,
    and every policy token gets one."""
    from tcli.config.stages import TrainOptions
    from tcli.train.batching import MicroBatch
    from tcli.train.trainer import Trainer

    recs = records(engine, n=4)
    for i, r in enumerate(recs):
        r["reward"], r["verdict"] = float(i % 2), {}
    out = run_tcli(["build-tree"], input=jsonl(recs))
    out = run_tcli(["advantages", "-e", "grpo"], input=out.stdout)
    assert out.returncode == 0, out.stderr
    recs = [orjson.loads(x) for x in out.stdout.splitlines()]
    assert any(0 in r["loss_mask"] for r in recs)
    for r in recs:
        assert all(a == 0.0 for a, m in zip(r["advantages"], r["loss_mask"]) if not m)
        r["advantages"] = [a if m else 1.0 for a, m in zip(r["advantages"], r["loss_mask"])]
    grids = []
    real = MicroBatch.logprobs

    def spy(self, model_, samples, *a, **k):
        logp, ent, mask = real(self, model_, samples, *a, **k)
        if logp.requires_grad:
            logp.retain_grad()
            grids.append((list(self.idxs), logp))
        return logp, ent, mask

    monkeypatch.setattr(MicroBatch, "logprobs", spy)
    Trainer(model, TrainOptions(lr=1e-3, max_grad_norm=0.0)).step(recs)
    assert grids
    for idxs, logp in grids:
        for row, i in enumerate(idxs):
            m = np.array(recs[i]["loss_mask"], dtype=bool)
            g = logp.grad[row, :len(m)].numpy()
            assert (g[~m] == 0.0).all(), (i, g)
            assert (g[m] != 0.0).all(), (i, g)


@pytest.mark.parametrize("kw, words", [
    (dict(tools="calc", mode="tree"), "needs --branch (sample.branch) tool"),
    (dict(mode="tree", branch="tool"), "give --tools"),
    (dict(tools="calc", engine="vllm"), "vllm engine cannot sample with tools"),
    (dict(tools="calc,calc"), "names a tool twice"),
    (dict(tools="calc", max_turns=0), "--max-turns (sample.max_turns) must be >= 1"),
    (dict(tools="calc", tool_format="json"), "unknown value 'json'"),
])
def test_tool_settings_are_checked(kw, words):
    from tcli.errors import UsageError

    with pytest.raises(UsageError, match=words.replace("(", r"\(").replace(")", r"\)")):
        SampleOptions(**kw)
    assert SampleOptions(tools="").tools == () and SampleOptions().max_turns == 4


def test_the_loop_refuses_expand_with_tools(tmp_path):
    from tcli.config.loop import load_config
    from tcli.errors import UsageError

    with pytest.raises(UsageError, match=r"--expand-tokens \(expand.tokens\) > 0 .* --tools"):
        load_config(None, {"tools": ["calc"], "mode": "tree", "branch": "tool",
                           "expand_tokens": 64})


def test_engines_without_tool_sampling_refuse(engine):
    from tcli.engines.base import as_engine
    from tcli.errors import UsageError

    class Plain:
        name = "plain"
        tokenizer = engine.tokenizer

        def generate(self, prompts, n, cfg):
            raise AssertionError("not reached")

    with pytest.raises(UsageError, match="plain engine cannot sample with tools"):
        list(sample_records(as_engine(Plain()), PROMPTS, SampleOptions(
            prompt_template="plain", chat_template=False, tools="rev"), toolset=Rev()))


def test_the_stage_closes_the_toolset_it_opened(engine, monkeypatch):
    import tcli.stages.sample as stage

    made = []

    class Closing(Rev):
        closed = False

        def close(self):
            self.closed = True

    monkeypatch.setattr(stage, "open_toolset", lambda opts, tok: made.append(Closing()) or made[-1])
    opts = SampleOptions(n=2, max_new_tokens=10, prompt_template="plain", chat_template=False,
                         tools="rev")
    it = sample_records(engine, PROMPTS, opts)
    next(it)
    assert made and not made[0].closed
    it.close()   # a consumer that stops early (| head) still ends the toolset
    assert made[0].closed
    given = Closing()
    list(sample_records(engine, PROMPTS[:1], opts, toolset=given))
    assert not given.closed   # the caller's own toolset stays open


def test_tool_metrics_of_a_step():
    from tcli.stages.sample import tool_metrics

    assert tool_metrics([{"token_ids": [1]}]) == {}
    recs = [{"tool_calls": 3, "tool_errors": 1}, {"tool_calls": 1, "tool_errors": 0},
            {"tool_calls": 0, "tool_errors": 0}]
    assert tool_metrics(recs) == {"tool_calls_mean": 4 / 3, "tool_error_share": 0.25}
    assert tool_metrics(recs[2:]) == {"tool_calls_mean": 0.0, "tool_error_share": 0.0}


@pytest.mark.parametrize("plan_kw", [{}, {"width": 2, "depth": 3}], ids=["independent", "tree"])
def test_the_graph_pool_path_gives_the_same_episodes(model, plan_kw):
    """The cache path of CUDA graphs (docs/design.md §5.7; the pool without capture runs on a
    CPU): the same episodes, also with a pool of 4 rows (pieces of 4 rows; a tree that outgrows
    the pool continues on a slab cache)."""
    from tcli.engines.cuda_graphs import GraphDecoder, GraphPool, PoolCache
    from tcli.engines.hf import HFEngine

    def shape(out):
        return [[(lf.node_path, lf.token_ids, lf.loss_mask, lf.finish_reason, lf.segment_ends)
                 for lf in g] for g in out]

    ref = episodes(HFEngine(model), plan_kw)
    for rows in (None, 4):
        engine = HFEngine(model)
        engine._graphs = GraphDecoder(engine, capture=False)
        if rows:
            engine._graphs.pool = GraphPool(engine, rows, 256, capture=False)
            engine._graphs.max_rows = rows
        pooled = []
        real = engine.advance
        engine.advance = lambda st, tok: (pooled.append(isinstance(st.cache, PoolCache)),
                                          real(st, tok))[1]
        out = episodes(engine, plan_kw)
        assert shape(out) == shape(ref) and any(pooled)
        assert all(pooled) != bool(rows and plan_kw)   # only the tree outgrows 4 rows
        for a, b in zip((lf for g in out for lf in g), (lf for g in ref for lf in g)):
            np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-5, rtol=0)


@pytest.mark.parametrize("plan_kw", [{}, {"width": 2, "depth": 3},
                                     {"width": 3, "depth": 2, "max_turns": 1}],
                         ids=["independent", "tree", "one-turn-tree"])
@pytest.mark.parametrize("pool", [False, True], ids=["slab", "pool"])
def test_episodes_drawn_k_tokens_ahead_are_the_per_token_ones(model, monkeypatch, plan_kw, pool):
    """A host check every k tokens (the graphed path's, docs/design.md §5.7): observation tokens
    forced on the device, what follows a call, an end or a split taken back; episodes, masks,
    turns, entropies and token counts are the per-token loop's. The pool, sized to exactly the
    room it reserves, never fills."""
    from tcli.engines import blocks, cuda_graphs
    from tcli.engines.cuda_graphs import GraphDecoder
    from tcli.engines.hf import HFEngine

    masked = []
    real = blocks.rewind
    monkeypatch.setattr(blocks, "rewind",
                        lambda st, drop, pos: (masked.append(int(drop.sum())), real(st, drop, pos)))
    monkeypatch.setattr(cuda_graphs, "capacity_for", lambda columns: columns)

    def run(engine, temperature):
        cfg = SamplingConfig(temperature=temperature, max_new_tokens=40, seed=5)
        plan = ToolPlan(Rev(), **{"max_turns": 3, "width": 4, "depth": 1, **plan_kw})
        return engine.sample_with_tools(ids(engine), plan, cfg, entropy=True)

    def shape(out):
        return [[(lf.node_path, lf.token_ids, lf.loss_mask, lf.finish_reason, lf.segment_ends,
                  lf.turns) for lf in g] for g in out]

    for temperature in (1.0, 0.0):
        base = HFEngine(model)
        ref = run(base, temperature)
        assert any(lf.turns for g in ref for lf in g)
        for every in (2, 8):
            engine = HFEngine(model)
            engine.stop_every = every
            if pool:
                engine._graphs = GraphDecoder(engine, capture=False)
            out = run(engine, temperature)
            assert shape(out) == shape(ref)
            assert engine.generated_tokens == base.generated_tokens
            for a, b in zip((lf for g in out for lf in g), (lf for g in ref for lf in g)):
                np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-5, rtol=0)
                np.testing.assert_allclose(a.entropies, b.entropies, atol=1e-5, rtol=0)
    assert sum(masked) > 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_graphed_tool_episodes_equal_eager_ones_on_cuda(model):
    """Greedy episodes with tools: the graphed decode step gives the eager path's tokens,
    log-probs within 1e-3 (as docs/design.md §5.7 promises for plain sampling)."""
    from tcli.engines.hf import HFEngine

    out = [episodes(HFEngine(model, device="cuda", cuda_graphs=g), {"width": 2, "depth": 3},
                    temperature=0.0) for g in ("off", "on")]
    a, b = ([lf for g in o for lf in g] for o in out)
    assert [(x.token_ids, x.loss_mask, x.node_path) for x in a] == [
        (x.token_ids, x.loss_mask, x.node_path) for x in b]
    assert max(abs(p - q) for x, y in zip(a, b) for p, q in zip(x.logprobs, y.logprobs)) <= 1e-3
