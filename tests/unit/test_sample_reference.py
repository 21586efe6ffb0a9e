"""The hf engine's draws against a naive sampler written here (docs/design.md §3.4, §4.6).

Every token of every response is replayed from one uncached forward pass over prompt + response:
the naive sampler takes the node's uniform for that position (tcli/engines/rng.py: prompt key,
child key per level of the node's path, response position), masks EOS before
``min_new_tokens``, tempers, keeps the smallest most-likely prefix reaching ``top_p`` and walks
its renormalised cumulative sum (the whole vocabulary in token-id order when top-p is 1). It
must pick the recorded token (a draw within round-off of a boundary is not judged), the recorded
log-prob must be log_softmax(logits / T) of it, and a response ends exactly at its first EOS or
at ``max_new_tokens``. The last tests pin the top-p boundary and zero-probability tokens with
hand-computed distributions, which ids count as EOS, and how prompts are chunked.
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from conftest import shared_model  # noqa: E402
from tcli.engines.rng import child_key, prompt_key, uniforms  # noqa: E402
from tcli.engines.sampling import SamplingConfig  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PROMPTS = [[3, 4, 3], [4, 4, 3, 3, 4, 3, 4, 4, 3]]   # token ids of the "ab" alphabet; left padding
CONFIGS = [SamplingConfig(temperature=0.7, top_p=0.8, max_new_tokens=9, min_new_tokens=3, seed=5),
           SamplingConfig(temperature=1.3, top_p=1.0, max_new_tokens=8, seed=6),
           SamplingConfig(temperature=0.0, max_new_tokens=7, min_new_tokens=4, seed=7)]
SHAPES = {"independent": dict(width=3, depth=1, segment_tokens=9),
          "tree": dict(width=2, depth=3, segment_tokens=2)}
MARGIN = 1e-5   # how close to a cumulative boundary a draw may be and still be judged


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    """Vocabulary pad/eos/unk/a/b: EOS is likely, so responses stop at every length."""
    from tcli.engines.hf import HFEngine

    return HFEngine(shared_model(tmp_path_factory, seed=4, alphabet="ab", hidden=32, layers=2,
                                 heads=2, kv_heads=1, intermediate=64), batch_tokens=64)


def _naive_draw(logits: np.ndarray, u: float, cfg: SamplingConfig, eos: list[int], step: int):
    """The token a plain loop draws, and how far its target lies from the nearest boundary."""
    s = logits.astype(np.float64)
    if step < cfg.min_new_tokens:
        s[eos] = -math.inf
    if cfg.temperature == 0:
        order = np.argsort(-s, kind="stable")
        return int(order[0]), float(s[order[0]] - s[order[1]])
    p = np.exp((s - s.max()) / cfg.temperature)
    p /= p.sum()
    kept, before = [], 0.0   # top-p walks the most likely first; without it, token-id order
    for i in sorted(range(len(p)), key=lambda i: -p[i]) if cfg.top_p < 1 else range(len(p)):
        if before >= cfg.top_p:
            break
        kept.append(i)
        before += p[i]
    target, acc, gap = u * sum(p[i] for i in kept), 0.0, math.inf
    for i in kept:
        acc += p[i]
        gap = min(gap, abs(acc - target))
        if acc > target:
            return i, gap
    return kept[-1], 0.0


def _key(prompt, seed: int, path) -> int:
    """The random-stream key of the node at the end of ``path`` (the root of a tree is the
    prompt's key; each level's child index derives its child's)."""
    key = prompt_key(seed, prompt)
    for c in path:
        key = child_key(key, c)
    return key


def _replay(engine, prompt, leaf, cfg: SamplingConfig) -> int:
    """Check one leaf token by token against the naive sampler; returns the draws judged."""
    toks, eos = leaf.token_ids, engine.eos_token_ids
    with torch.inference_mode():
        logits = engine.model(input_ids=torch.tensor([list(prompt) + toks])).logits[0].float()
    logits = logits[len(prompt) - 1:len(prompt) - 1 + len(toks)]
    t = cfg.temperature if cfg.temperature > 0 else 1.0
    ref_lp = torch.log_softmax(logits / t, -1)[torch.arange(len(toks)), torch.tensor(toks)]
    assert np.allclose(leaf.logprobs, ref_lp.numpy(), atol=1e-4, rtol=0), leaf.node_path
    key, seg, judged = _key(prompt, cfg.seed, ()), 0, 0
    for step, tok in enumerate(toks):
        while seg < len(leaf.segment_ends) - 1 and step >= leaf.segment_ends[seg]:
            seg += 1
        key = _key(prompt, cfg.seed, leaf.node_path[:seg + 1])
        u = float(uniforms(np.array([key], dtype=np.uint64), step)[0])
        want, gap = _naive_draw(logits[step].numpy(), u, cfg, eos, step)
        if gap > MARGIN:
            assert tok == want, (leaf.node_path, step, tok, want)
            judged += 1
    assert not set(toks[:-1]) & set(eos) and not set(toks[:cfg.min_new_tokens]) & set(eos)
    if leaf.finish_reason == "stop":
        assert toks[-1] in eos
    else:
        assert leaf.finish_reason == "length" and len(toks) == cfg.max_new_tokens
    return judged


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("cfg", CONFIGS, ids=["nucleus", "hot", "greedy"])
def test_every_token_is_the_naive_samplers_draw(engine, shape, cfg):
    trees = engine.sample_tree(PROMPTS, cfg=cfg, **SHAPES[shape])
    judged = sum(_replay(engine, p, leaf, cfg) for p, leaves in zip(PROMPTS, trees)
                 for leaf in leaves)
    total = sum(len(leaf.token_ids) for leaves in trees for leaf in leaves)
    assert judged >= 0.95 * total > 0
    assert cfg.temperature == 0 or any(lf.finish_reason == "stop" for ls in trees for lf in ls)


def _one(engine, logits, cfg, u, step=0):
    """``_sample`` of one row of ``logits`` with the uniform ``u``."""
    tok, lp = engine._sample(torch.tensor([logits], dtype=torch.float32), None, step, cfg,
                             u=torch.tensor([u], dtype=torch.float64))
    return int(tok[0]), float(lp[0])


def test_top_p_keeps_the_smallest_prefix_that_reaches_it(engine):
    """Four tokens of probability 1/4 (exact in binary): top-p 0.5 keeps two of them, each then
    1/2 likely; a hair above 0.5 keeps three (the third is needed to reach it)."""
    v = len(engine.tokenizer)
    flat = [0.0] * 4 + [-math.inf] * (v - 4)
    half = SamplingConfig(temperature=1.0, top_p=0.5)
    assert [_one(engine, flat, half, u)[0] for u in (0.0, 0.49, 0.5, 0.99)] == [0, 0, 1, 1]
    more = SamplingConfig(temperature=1.0, top_p=0.5 + 1e-9)
    assert [_one(engine, flat, more, u)[0] for u in (0.3, 0.4, 0.7, 0.99)] == [0, 1, 2, 2]
    assert _one(engine, flat, half, 0.9)[1] == pytest.approx(math.log(0.25), abs=1e-6)


def test_a_token_of_zero_probability_is_never_drawn(engine):
    """EOS masked before ``min_new_tokens`` has probability 0: not even u = 0 draws it, greedy
    or sampled, while its log-prob stays the unmasked one (docs/design.md §3.4)."""
    (eos,) = engine.eos_token_ids
    v = len(engine.tokenizer)
    logits = [-math.inf] * v
    logits[eos], logits[3], logits[4] = 2.0, 0.0, 0.0
    held = SamplingConfig(temperature=1.0, min_new_tokens=1)
    for u in (0.0, 0.5, 1.0 - 2.0 ** -53):
        assert _one(engine, logits, held, u, step=0)[0] in (3, 4)
    greedy = list(logits)
    greedy[4] = -1.0
    assert _one(engine, greedy, replace(held, temperature=0.0), 0.0)[0] == 3
    assert _one(engine, logits, held, 0.0, step=1)[0] == eos   # from min_new_tokens on
    unmasked = -2.0 - math.log(1 + 2 * math.exp(-2.0))   # log(1 / (e^2 + 2))
    assert _one(engine, logits, held, 0.9, step=0)[1] == pytest.approx(unmasked, abs=1e-5)


def test_eos_ids_are_those_of_the_generation_config_the_config_and_the_tokenizer(engine):
    """A response stops at any EOS id a model declares: its generation config, its config and
    its tokenizer may each name other ones (an int or a list), and all of them count."""
    from tcli.engines.hf import HFEngine

    engine = HFEngine(engine.model_path)
    tok_eos = engine.tokenizer.eos_token_id
    engine.model.generation_config.eos_token_id = None
    a = engine.tokenizer.convert_tokens_to_ids("a")
    engine.model.config.eos_token_id = [a]
    engine._attach(engine.model, engine.model_path)
    assert engine.eos_token_ids == sorted({tok_eos, a})
    for every in (1, 3):  # a check per token, or every 3 tokens
        engine.stop_every = every
        (comps,) = engine.generate([[a, a]], 6, SamplingConfig(max_new_tokens=10, seed=2))
        for c in comps:
            ends = [i for i, t in enumerate(c.token_ids) if t in (tok_eos, a)]
            assert ends == ([len(c.token_ids) - 1] if c.finish_reason == "stop" else [])
        assert any(c.token_ids[-1] == a for c in comps)
    engine.stop_every = 1
    engine.model.generation_config.eos_token_id = 2
    engine.model.config.eos_token_id = None
    engine._attach(engine.model, engine.model_path)
    assert engine.eos_token_ids == sorted({tok_eos, 2})
    assert engine._eos_t.tolist() == engine.eos_token_ids


def test_prompts_are_chunked_so_that_their_first_fork_fits_batch_tokens(engine):
    """Width 2, first segment 4, 40 tokens: prompts of 3 and 2 tokens fork 2 x 2 x (3 + 4) = 28
    columns; a third of 5 would make 3 x 2 x 9 = 54, so it opens the next chunk; a prompt over
    the bound alone still gets a chunk of its own."""
    old = engine.batch_tokens
    engine.batch_tokens = 40
    try:
        chunks = list(engine.prefill_chunks([[1] * 3, [1] * 2, [1] * 5, [1], [1] * 30], 2, 4))
    finally:
        engine.batch_tokens = old
    assert chunks == [[0, 1], [2, 3], [4]]
    with pytest.raises(ValueError, match="prompt #1 has no tokens"):
        list(engine.prefill_chunks([[1], []], 2, 4))
