"""Edges of the trainer's parts, each against a hand-computed number or an independent reference:
how groups split and bins fill, what a tile of the tree attention gathers, the tree attention
itself against a dense float64 softmax, token accounting per layout, record checks at their
boundaries, the loss flags outside the mask, the schedule past a zero-length decay, the parameter
subsets of ``tcli.train.gradient``, and the step metrics."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tcli.errors import DataError, TcliError, UsageError
from tcli.train.samples import TrainSample


def _sample(prompt, tokens, *, temperature=1.0, line=0):
    n = len(tokens)
    return TrainSample(np.asarray(prompt, dtype=np.int64), np.asarray(tokens, dtype=np.int64),
                       np.full(n, -1.0, dtype=np.float32), np.ones(n, dtype=np.float32),
                       line=line, temperature=temperature)


# ----------------------------------------------------------------------------- tries and tiles

def test_sub_tries_fill_up_to_exactly_the_budget():
    """Prompt [5, 6] and responses 789, 78(10), 78(11), 20 21 22: the whole trie has
    2 + 5 + 3 = 10 unique tokens. At budget 7 the first three share '7 8' and fill a sub-trie of
    2 + 3 + 1 + 1 = 7 exactly; the last needs its own (2 + 3 = 5). A run grows by each
    response's tokens past the prefix it shares, not by its length."""
    from tcli.train.trie import group_units

    prompts = [np.array([5, 6])] * 4
    resps = [np.array(r) for r in ([7, 8, 9], [7, 8, 10], [7, 8, 11], [20, 21, 22])]
    units = group_units(prompts, resps, [0, 1, 2, 3], budget=7)
    assert [(u.size, sorted(u.members)) for u in units] == [(7, [0, 1, 2]), (5, [3])]
    assert [u.size for u in group_units(prompts, resps, [0, 1, 2, 3], budget=10)] == [10]


def _random_row(seed):
    """A packed row of a few tries whose responses share random-length beginnings."""
    from tcli.train.trie import group_units, pack_row

    rng = np.random.default_rng(seed)
    prompts, resps = [], []
    for _ in range(3):
        prompt = rng.integers(3, 50, int(rng.integers(1, 5)))
        base = rng.integers(3, 50, 6)
        for _ in range(int(rng.integers(1, 5))):
            cut = int(rng.integers(0, 7))
            prompts.append(prompt)
            resps.append(np.concatenate([base[:cut], rng.integers(3, 50, int(rng.integers(1, 4)))]))
    units = group_units(prompts, resps, range(len(resps)), budget=10_000)
    return pack_row(units)


@pytest.mark.parametrize("q", [1, 3, 5, 64])
def test_tiles_gather_only_keys_a_query_attends_to_and_no_row_is_empty(q):
    """Every key a tile gathers is an ancestor of one of its queries (the path above the tile,
    not subtrees that ended before it), and every query row, padding rows past the end included,
    attends to at least one key (a fully masked softmax row is NaN on some kernels)."""
    from tcli.train.trie import tile_plan

    for seed in range(5):
        row = _random_row(seed)
        n = len(row.end)
        kidx, mask = tile_plan(row.end, q)
        assert mask.any(-1).all(), (seed, q)
        for t in range(kidx.shape[0]):
            real = min(q, n - t * q)
            # real keys are increasing positions; the 0-padding after them breaks the run
            up = np.diff(kidx[t]) > 0
            count = 1 + (len(up) if up.all() else int(np.argmin(up)))
            used = mask[t, :real, :count].any(0)
            assert used.all(), (seed, q, t, kidx[t, :count][~used])


def _dense_tree_attention(q, k, v, end, scaling):
    """softmax(q k^T * scaling) v over the ancestors (j <= i < end[j]), in float64 by hand."""
    H, N, _ = q.shape
    k = k.repeat_interleave(H // k.shape[0], 0)
    v = v.repeat_interleave(H // v.shape[0], 0)
    ar = torch.arange(N)
    allowed = (ar[None, :] <= ar[:, None]) & (ar[:, None] < torch.from_numpy(end)[None, :])
    s = (q @ k.transpose(1, 2)) * scaling
    s = s.masked_fill(~allowed, float("-inf"))
    return (torch.softmax(s, -1) @ v).transpose(0, 1)  # [N, H, d]


@pytest.mark.parametrize("q_tile", [1, 5, 64])
def test_tree_attention_equals_a_dense_masked_softmax(q_tile):
    """The tiled kernel against the dense ancestor-masked softmax, with grouped KV heads and a
    scaling that is not 1/sqrt(d) (some models scale otherwise). float64: both sides sum at most
    N = 60 terms of size O(1), so they agree to ~1e-13; 1e-10 leaves a wide margin."""
    from tcli.train.packed import _tree_attention_forward
    from tcli.train.trie import tile_plan

    row = _random_row(11)
    N, H, Hkv, d = len(row.end), 4, 2, 8
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, h, N, d, generator=g, dtype=torch.float64) for h in (H, Hkv, Hkv))
    plan = tuple(torch.from_numpy(a) for a in tile_plan(row.end, q_tile))
    module = torch.nn.Module().eval()
    out, _ = _tree_attention_forward(module, q, k, v, None, scaling=0.37,
                                     tcli_tree_blocks=plan)
    want = _dense_tree_attention(q[0], k[0], v[0], row.end, 0.37)
    assert out.shape == (1, N, H, d)
    assert (out[0] - want).abs().max() < 1e-10


@pytest.mark.parametrize("kw, sinks", [({"sliding_window": 4}, None), ({"softcap": 30.0}, None),
                                       ({}, torch.zeros(4))])
def test_tree_attention_refuses_what_it_cannot_mask(kw, sinks):
    from tcli.train.packed import _tree_attention_forward
    from tcli.train.trie import tile_plan

    row = _random_row(1)
    N = len(row.end)
    q = torch.zeros(1, 4, N, 8)
    module = torch.nn.Module()
    if sinks is not None:
        module.sinks = sinks
    plan = tuple(torch.from_numpy(a) for a in tile_plan(row.end, 8))
    with pytest.raises(TcliError, match="--no-share-prefix"):
        _tree_attention_forward(module, q, q, q, None, scaling=1.0, tcli_tree_blocks=plan, **kw)


def test_tree_attention_switches_every_model_and_restores_it():
    """The policy and a DDP-wrapped (``.module``) reference are both switched, and both get
    their own implementation back, also when the block raises."""
    from types import SimpleNamespace as NS

    from tcli.train.packed import IMPL, tree_attention

    a = NS(config=NS(_attn_implementation="sdpa"))
    b = NS(module=NS(config=NS(_attn_implementation="eager")))
    with pytest.raises(RuntimeError):
        with tree_attention(a, None, b):
            assert a.config._attn_implementation == b.module.config._attn_implementation == IMPL
            raise RuntimeError
    assert (a.config._attn_implementation, b.module.config._attn_implementation) == \
        ("sdpa", "eager")


# ----------------------------------------------------------------------------- layouts

def test_padded_micro_batch_counts_prompt_and_response_tokens():
    """Samples of 2 + 3 and 2 + 1 tokens in one padded micro-batch: 2 rows x 5 positions, of
    which 5 + 3 = 8 are real (padding_share 0.2). Packed, they share the prompt: 2 + 3 + 1 = 6
    positions, all real."""
    from tcli.train.batching import LAYOUTS

    samples = [_sample([5, 6], [7, 8, 9]), _sample([5, 6], [10])]
    (pad,) = LAYOUTS.get("padded")(samples, [0, 1], 100, 1, 0)
    assert (pad.model_tokens, pad.real_tokens) == (10, 8)
    (packed,) = LAYOUTS.get("packed")(samples, [0, 1], 100, 1, 0)
    assert (packed.model_tokens, packed.real_tokens) == (6, 6)
    # a budget of 6 padded tokens cannot hold both rows (2 x 5): one micro-batch each
    small = LAYOUTS.get("padded")(samples, [0, 1], 6, 1, 0)
    assert sorted((m.idxs, m.model_tokens) for m in small) == [([0], 5), ([1], 3)]


def test_ranks_get_tries_balanced_by_unique_tokens():
    """One lone long response (2 + 18 = 20 tokens) and three groups of three identical short
    responses (2 + 5 = 7 unique tokens each): by unique tokens the ranks hold 20 and 21; by
    member count they would hold 14 and 27."""
    from tcli.train.batching import LAYOUTS

    samples = [_sample([3, 4], list(range(10, 28)))]
    for g in range(3):
        samples += [_sample([5 + g, 6], [30, 31, 32, 33, 34])] * 3
    idx = list(range(len(samples)))
    loads = sorted(sum(m.model_tokens for m in LAYOUTS.get("packed")(samples, idx, 100, 2, r))
                   for r in range(2))
    assert loads == [20, 21]


# ----------------------------------------------------------------------------- records

REC = {"prompt_token_ids": [3, 4], "token_ids": [5, 6], "logprobs": [-1.0, -2.0],
       "advantages": [0.5, 0.5]}


def test_log_prob_tolerance_and_vocabulary_boundaries():
    """A log-prob of 5e-4 is float noise (accepted), 2e-3 is not a log-prob; token id
    vocab_size - 1 is the last valid one, vocab_size the first invalid."""
    from tcli.train.samples import samples_from_records

    ok = samples_from_records([{**REC, "logprobs": [-1.0, 5e-4]}], vocab_size=7)
    assert ok[0].old_logp[1] == np.float32(5e-4)
    with pytest.raises(DataError) as e:
        samples_from_records([{**REC, "logprobs": [-1.0, 2e-3]}])
    assert e.value.field == "logprobs"
    with pytest.raises(DataError) as e:
        samples_from_records([{**REC, "token_ids": [5, 7]}], vocab_size=7)
    assert e.value.field == "token_ids"


def test_finish_reason_is_stop_or_length():
    from tcli.train.samples import record_truncated

    assert [record_truncated(r) for r in ({}, {"finish_reason": "stop"},
                                          {"finish_reason": "length"})] == [False, False, True]
    for bad in ("LENGTH", "abort", {"type": "length"}):
        with pytest.raises(DataError) as e:
            record_truncated({"finish_reason": bad})
        assert e.value.field == "finish_reason"


def test_train_samples_from_the_loop_are_checked_like_records():
    """TrainSamples built in memory get the vocabulary check and the one-temperature check too,
    the error naming the line of the sample that differs (lower or higher)."""
    from tcli.train.samples import as_samples

    with pytest.raises(DataError) as e:
        as_samples([_sample([3], [4, 99], line=1)], vocab_size=99)
    assert e.value.field == "token_ids"
    for second in (0.5, 0.9):
        with pytest.raises(DataError) as e:
            as_samples([_sample([3], [4], temperature=0.7, line=1),
                        _sample([3], [4], temperature=second, line=2)], vocab_size=99)
        assert (e.value.field, e.value.line) == ("temperature", 2)


# ----------------------------------------------------------------------------- the loss

def test_loss_flags_are_false_outside_the_mask():
    """Whatever sits in the padding (here a ratio of e^2 with A = +1 and A = -5), no token there
    counts as clipped or dual-clipped."""
    from tcli.train.loss import policy_loss

    logp = torch.tensor([[-1.0, 1.0, 1.0]])
    old = torch.tensor([[-1.0, -1.0, -1.0]])
    adv = torch.tensor([[1.0, 1.0, -5.0]])
    mask = torch.tensor([[True, False, False]])
    out = policy_loss(logp, old, adv, mask, clip_low=0.2, clip_high=0.28, dual_clip=3.0)
    assert not out.clipped.any() and not out.dual_clipped.any()
    assert out.loss.tolist() == [[-1.0, 0.0, 0.0]]


def test_mismatch_of_an_exact_sampler_caps_nothing_and_gaps_are_clamped():
    """Ratio exactly 1 with cap 1 is not above the cap; a 30-nat gap counts as the log-ratio
    clamp (20), as the ratio itself does."""
    from tcli.train.loss import LOG_RATIO_CLAMP, mismatch_sums

    mask = torch.tensor([[True, True]])
    z = torch.zeros(1, 2)
    assert mismatch_sums(z, z, mask, cap=1.0) == (0.0, 0.0, 0.0, 2.0)
    gap = mismatch_sums(torch.tensor([[0.0, -1.0]]), torch.tensor([[-30.0, -1.0]]), mask, 2.0)
    assert gap == (LOG_RATIO_CLAMP, LOG_RATIO_CLAMP, 1.0, 2.0)


# ----------------------------------------------------------------------------- the schedule

@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_a_schedule_whose_span_is_its_warmup_ends_at_the_end_value(name):
    """Span 3 = warm-up 3: steps 0-2 warm up to lr, step 3 is past the span: m x lr."""
    from tcli.train.schedule import lr_factor

    assert [lr_factor(name, k, 3, 3, 0.25) for k in range(5)] == \
        pytest.approx([1 / 3, 2 / 3, 1.0, 0.25, 0.25], rel=1e-12)


# ----------------------------------------------------------------------------- gradient subsets

class _Blocks(torch.nn.Module):
    """Parameters named like a 12-block decoder: an input embedding, blocks, a norm, a head."""

    def __init__(self, frozen_head=False):
        super().__init__()
        self.model = torch.nn.Module()
        self.model.embed_tokens = torch.nn.Embedding(3, 2)
        self.model.layers = torch.nn.ModuleList(torch.nn.Linear(2, 2) for _ in range(12))
        self.model.norm = torch.nn.LayerNorm(2)
        self.lm_head = torch.nn.Linear(2, 3)
        self.lm_head.requires_grad_(not frozen_head)

    def get_input_embeddings(self):
        return self.model.embed_tokens


def test_last_k_selects_exactly_the_last_k_blocks_norm_and_head():
    """last:3 of 12 blocks: blocks 9, 10, 11 (two-digit indices), the norm and the head, not the
    embedding, nor a frozen parameter."""
    from tcli.train.gradient import select_parameters

    names = [n for n, _ in select_parameters(_Blocks(), "last:3")]
    assert names == [f"model.layers.{i}.{w}" for i in (9, 10, 11) for w in ("weight", "bias")] + \
        ["model.norm.weight", "model.norm.bias", "lm_head.weight", "lm_head.bias"]
    assert "lm_head.weight" not in [n for n, _ in select_parameters(_Blocks(True), "all")]
    with pytest.raises(UsageError, match="no numbered blocks"):
        select_parameters(torch.nn.Linear(2, 2), "last:1")


def test_only_grad_restores_and_flat_gradient_fills_missing_gradients_with_zeros():
    from tcli.train.gradient import flat_gradient, only_grad, select_parameters

    model = _Blocks()
    params = [p for _, p in select_parameters(model, "last:1")]
    with only_grad(model, params):
        assert sum(p.requires_grad for p in model.parameters()) == len(params)
    assert all(p.requires_grad for p in model.parameters())
    a, b = torch.nn.Parameter(torch.zeros(2, 3)), torch.nn.Parameter(torch.zeros(2))
    b.grad = torch.tensor([1.5, -2.0])
    assert flat_gradient([a, b]).tolist() == [0.0] * 6 + [1.5, -2.0]


# ----------------------------------------------------------------------------- step metrics

def test_step_metrics_hand_computed():
    """Two mini-batches over 2 epochs, the second's gradient norm not finite (skipped)."""
    from tcli.train.metrics import StepStats

    s = StepStats(loss=3.0, pg_loss=1.0, clipped=2.0, dual_clipped=1.0, entropy=8.0,
                  approx_kl=0.4, tokens=8.0, seqs=4.0, model_tokens=20.0, real_tokens=15.0,
                  responses=2, truncated=1)
    assert s.add_grad_norm(2.0) and not s.add_grad_norm(float("nan"))
    s.add_grad_norm(4.0)
    m = s.to_metrics(step=1, policy_version=1, lr=0.1, epochs=2, elapsed=2.0, world_size=1,
                     with_kl=False)
    want = {"loss": 1.0, "pg_loss": 1 / 3, "clip_frac": 0.25, "dual_clip_frac": 0.125,
            "entropy": 1.0, "approx_kl": 0.05, "num_tokens": 4, "num_sequences": 2,
            "model_tokens": 10, "padding_share": 0.25, "optimizer_steps": 2, "skipped_steps": 1,
            "tokens_per_s": 4.0, "truncated_share": 0.5, "mismatch_ratio_max": 1.0}
    assert {k: m[k] for k in want} == pytest.approx(want, rel=1e-12)
    s.grad_norms = [2.0, 4.0]  # (the skipped one's NaN aside)
    m = s.to_metrics(step=1, policy_version=1, lr=0.1, epochs=2, elapsed=2.0, world_size=1,
                     with_kl=False)
    assert (m["grad_norm"], m["grad_norm_max"]) == (3.0, 4.0)


def test_mismatch_is_the_largest_over_micro_batches_and_ranks():
    from tcli.train.metrics import StepStats, off_policy_note

    s = StepStats()
    s.add_mismatch((0.6, 0.5, 1.0, 2.0))
    s.add_mismatch((0.2, 0.1, 0.0, 2.0))
    assert (s.mismatch_abs, s.mismatch_max, s.tis_capped, s.mismatch_tokens) == (0.8, 0.5, 1.0, 4.0)
    calls = []

    def allreduce(values, op="sum"):
        calls.append(op)
        return [v + 1.0 for v in values] if op == "max" else [2 * v for v in values]

    r = s.reduced(allreduce)
    assert sorted(calls) == ["max", "sum"]
    assert (r.mismatch_max, r.mismatch_abs, r.mismatch_tokens) == (1.5, 1.6, 8.0)
    m = r.to_metrics(step=1, policy_version=1, lr=0.1, epochs=1, elapsed=1.0, world_size=2,
                     with_kl=False, tis=True)
    assert m["mismatch_ratio_max"] == pytest.approx(math.exp(1.5))
    assert m["mismatch_abs_logp"] == pytest.approx(0.2) and m["tis_capped_frac"] == 0.25
    # the note names a gap above 1 nat per token, not one of exactly 1
    assert off_policy_note({"mismatch_abs_logp": 1.0}) == ""
    assert off_policy_note({"mismatch_abs_logp": 0.9}) == ""
    assert "another model" in off_policy_note({"mismatch_abs_logp": 1.01})


# ----------------------------------------------------------------------------- the trainer

PAIRS = [([5, 6, 7], [20, 21, 22, 23]), ([8, 9], [30, 31, 32]), ([5, 6, 7], [20, 24, 25]),
         ([11, 12], [40, 41])]


def _on_policy(tiny) -> list[dict]:
    """Records of PAIRS whose log-probs are the tiny model's own (ratio 1 at the first forward)."""
    from tcli.models.load import load_model
    from tcli.models.logprobs import sequence_logprobs

    lps = sequence_logprobs(load_model(tiny), [p for p, _ in PAIRS], [r for _, r in PAIRS])
    return [{"prompt_token_ids": p, "token_ids": r, "finish_reason": "stop",
             "logprobs": lp.tolist(), "advantages": [1.0 - 0.6 * i] * len(r)}
            for i, ((p, r), lp) in enumerate(zip(PAIRS, lps))]


def _trainer(tiny, **kw):
    from tcli.config.stages import TrainOptions
    from tcli.train.trainer import Trainer

    return Trainer(tiny, TrainOptions(**{"lr": 1e-2, **kw}), seed=0)


def test_mismatch_is_measured_before_the_first_update_only(tiny):
    """On-policy records, two mini-batches: the second runs after an lr 1e-2 update, so only
    the first one's forward is pi_train_old. The records' float32 log-probs are those of the
    per-sequence forward, which the packed one matches to 1e-5 (test_train_packed)."""
    m = _trainer(tiny, mini_batches=2).step(_on_policy(tiny))
    assert m["optimizer_steps"] == 2
    assert m["mismatch_abs_logp"] < 1e-5
    assert m["mismatch_ratio_max"] == pytest.approx(1.0, abs=1e-5)


def test_an_empty_step_keeps_the_policy_version(tiny):
    recs = _on_policy(tiny)
    for r in recs:
        r["finish_reason"] = "length"
    tr = _trainer(tiny, mask_truncated=True)
    before = tr.policy_version
    m = tr.step(recs)
    assert m["optimizer_steps"] == 0 and m["policy_version"] == before == tr.policy_version
    assert tr.step(_on_policy(tiny))["policy_version"] == before + 1


def test_loss_gradient_leaves_truncated_responses_out_too(tiny):
    """mask_truncated applies to the measured gradient as to the step: the gradient over records
    with a truncated one equals the gradient over the others (the same samples, the same sums)."""
    from tcli.train.gradient import select_parameters

    recs = _on_policy(tiny)
    recs[1]["finish_reason"] = "length"
    tr = _trainer(tiny, mask_truncated=True)
    params = [p for _, p in select_parameters(tr.model, "last:1")]
    with_cut = tr.loss_gradient(recs, params)
    without = tr.loss_gradient(recs[:1] + recs[2:], params)
    assert np.allclose(with_cut, without, rtol=1e-6, atol=1e-9)
    plain = _trainer(tiny)
    kept = plain.loss_gradient(recs, [p for _, p in select_parameters(plain.model, "last:1")])
    assert np.abs(kept - without).max() > 1e-3 * np.abs(without).max()


def test_a_rank_without_data_adds_a_zero_gradient(tiny):
    """The stand-in backward of a rank with nothing to train joins the collectives and adds 0."""
    tr = _trainer(tiny)
    tr.pad_id = 7  # not the pad token, whose zero embedding would give a zero gradient anyway
    tr._dummy_backward()
    grads = [p.grad for p in tr.model.parameters() if p.grad is not None]
    assert grads and all(bool((g == 0).all()) for g in grads)
