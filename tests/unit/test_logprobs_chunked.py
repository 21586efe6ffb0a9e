"""Chunked LM head (tcli.models.logprobs): log-probs, entropies and gradients equal the unchunked
[B, R, V] path to 1e-5 relative, for any chunk size, in no-grad mode, under bf16 autocast (same
values), and memory stays O(tokens) (no [N, V] tensor is saved for backward)."""

from __future__ import annotations

import pytest
import torch

from tcli.models.load import load_model
from tcli.models.logprobs import (batch_logprobs, chunk_rows_for, full_batch_logprobs,
                                  head_logprobs, make_batch, sequence_logprobs)


@pytest.fixture
def model(tiny):
    torch.manual_seed(0)
    return load_model(tiny, train=True)


def _batch(model, lens=((5, 6), (9, 2), (3, 11), (7, 8), (1, 1)), seed=0):
    g = torch.Generator().manual_seed(seed)
    V = model.config.vocab_size
    P = [torch.randint(3, V, (p,), generator=g) for p, _ in lens]
    R = [torch.randint(3, V, (r,), generator=g) for _, r in lens]
    return make_batch(P, R, "cpu", 0)


def _run(model, batch, fn, **kw):
    model.zero_grad(set_to_none=True)
    lp, ent = fn(model, batch, with_entropy=True, **kw)
    w = torch.linspace(-1.0, 1.0, lp.numel()).reshape(lp.shape)
    (lp * w).sum().backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return lp.detach(), ent, grads


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-12))


@pytest.mark.parametrize("chunk_rows", [None, 1, 3, 7, 1000])
def test_chunked_equals_unchunked_values_and_gradients(model, chunk_rows):
    batch = _batch(model)
    lp0, ent0, g0 = _run(model, batch, full_batch_logprobs)
    lp1, ent1, g1 = _run(model, batch, batch_logprobs, chunk_rows=chunk_rows)
    assert lp1.shape == lp0.shape and ent1.shape == ent0.shape
    assert _rel(lp1, lp0) < 1e-5
    assert _rel(ent1, ent0) < 1e-5
    assert (lp1[~batch.mask] == 0).all() and (ent1[~batch.mask] == 0).all()
    assert g0.keys() == g1.keys() and g0
    for name in g0:
        assert _rel(g1[name], g0[name]) < 1e-5, name


def test_chunked_no_grad_and_sequence_logprobs(model):
    batch = _batch(model, seed=1)
    with torch.no_grad():
        lp0, ent0 = full_batch_logprobs(model, batch, with_entropy=True)
        lp1, ent1 = batch_logprobs(model, batch, with_entropy=True, chunk_rows=2)
    assert not lp1.requires_grad
    assert _rel(lp1, lp0) < 1e-5 and _rel(ent1, ent0) < 1e-5
    lp2, _ = batch_logprobs(model, batch, chunk_rows=2)  # without entropy
    assert _rel(lp2.detach(), lp0) < 1e-5
    # sequence_logprobs (sft, checks) goes through the same path
    P = [[5, 6, 7], [8]]
    R = [[9, 10], [11, 12, 13]]
    seqs = sequence_logprobs(model, P, R)
    one = [sequence_logprobs(model, [p], [r])[0] for p, r in zip(P, R)]
    for a, b in zip(seqs, one):
        assert torch.allclose(a, b, atol=1e-5)


def test_chunked_bf16_autocast_same_values(model):
    batch = _batch(model, seed=2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lp0, ent0, g0 = _run(model, batch, full_batch_logprobs)
        lp1, ent1, g1 = _run(model, batch, batch_logprobs, chunk_rows=3)
    assert _rel(lp1, lp0) < 1e-5 and _rel(ent1, ent0) < 1e-4
    for name in g0:  # bf16 rounding of per-chunk partial sums differs slightly
        assert _rel(g1[name], g0[name]) < 2e-2, name


def test_softcapped_head_falls_back_to_unchunked(model, monkeypatch):
    """A model that transforms its head's output is detected (the check on the last position's
    logits) and scored by the unchunked path: the numbers still include the transformation."""
    batch = _batch(model, seed=3)
    orig = type(model).forward

    def capped(self, *a, **k):
        out = orig(self, *a, **k)
        out.logits = 5.0 * torch.tanh(out.logits / 5.0)
        return out

    monkeypatch.setattr(type(model), "forward", capped)
    with torch.no_grad():
        lp, _ = batch_logprobs(model, batch)
        ref, _ = full_batch_logprobs(model, batch)
    assert torch.equal(lp, ref)


def test_chunk_rows_default_bounds_memory():
    assert chunk_rows_for(49152) == (1 << 24) // 49152 == 341
    assert chunk_rows_for(10) == 4096
    assert chunk_rows_for(1 << 40) == 1


def test_backward_saves_no_vocab_sized_tensor(model):
    """Nothing the chunked head saves for backward has a vocabulary dimension (except the head's
    own weight): memory is O(tokens x hidden). The unchunked path saves [B, R, V] tensors."""
    batch = _batch(model, lens=((4, 30),) * 6, seed=4)
    V = model.config.vocab_size
    assert V != model.config.hidden_size
    params = {p.data_ptr() for p in model.parameters()}
    shapes = []

    def pack(t):
        if t.data_ptr() not in params:
            shapes.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        batch_logprobs(model, batch, chunk_rows=8)
    assert shapes and not [s for s in shapes if V in s], shapes
    shapes.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        full_batch_logprobs(model, batch)
    assert [s for s in shapes if s[-1:] == (V,)]


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logprobs_at_temperature_match_log_softmax_reference(model, temperature):
    """Both paths score log softmax(logits / T)[target], with the logits taken straight from the
    model (position P-1+t predicts response token t)."""
    g = torch.Generator().manual_seed(5)
    V = model.config.vocab_size
    prompt = torch.randint(3, V, (4,), generator=g)
    response = torch.randint(3, V, (6,), generator=g)
    batch = make_batch([prompt], [response], "cpu", 0)
    with torch.no_grad():
        logits = model(input_ids=torch.cat([prompt, response])[None]).logits[0].float()
        rows = torch.log_softmax(logits[3:9] / temperature, dim=-1)  # positions 3..8 score 4..9
        ref = rows.gather(1, response[:, None])[:, 0]
        full, _ = full_batch_logprobs(model, batch, temperature=temperature)
        chunked, _ = batch_logprobs(model, batch, chunk_rows=2, temperature=temperature)
    # float32 log-softmax over one vocabulary row: rounding ~1e-7 relative, 1e-5 leaves headroom
    assert _rel(full[0], ref) < 1e-5
    assert _rel(chunked[0], ref) < 1e-5


def test_chunked_head_gradient_at_temperature_matches_autograd():
    """The chunked head's hand-written backward carries the 1/T of the forward: its gradients
    w.r.t. h, W and b equal autograd through log_softmax(head(h) / T).gather, chunk by chunk."""
    T = 0.7
    torch.manual_seed(0)
    head = torch.nn.Linear(8, 11)
    h = torch.randn(5, 8, requires_grad=True)
    targets = torch.tensor([0, 3, 10, 7, 3])
    w = torch.tensor([1.0, -2.0, 0.5, 3.0, -1.0])  # a different weight per row
    lp, _ = head_logprobs(h, head, targets, with_entropy=False, temperature=T, chunk_rows=2)
    (lp * w).sum().backward()
    mine = [h.grad.clone(), head.weight.grad.clone(), head.bias.grad.clone()]
    h.grad = head.weight.grad = head.bias.grad = None
    ref = torch.log_softmax(head(h) / T, dim=-1).gather(1, targets[:, None])[:, 0]
    (ref * w).sum().backward()
    assert _rel(lp.detach(), ref.detach()) < 1e-5
    # float32 sums over 11 logits or 5 rows: rounding ~1e-7 relative, 1e-5 leaves headroom
    for a, b in zip(mine, [h.grad, head.weight.grad, head.bias.grad]):
        assert _rel(a, b) < 1e-5
