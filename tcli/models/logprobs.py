"""Teacher-forced log-probs of response tokens: the one place that turns (prompt, response) into
per-token log pi(token | prefix), shared by train-step (with gradients) and checks of sampled logprobs.

Convention (project-wide): log-softmax of the model's logits divided by the sampling temperature T
(``temperature``, default 1: the raw logits; never top-p renormalised, as verl and TRL do), in
float32. Sequences are right-padded, so with causal attention no real token ever sees a pad and no
attention mask is needed (the fast ``is_causal`` attention path stays available, and the padded
batch gives the same numbers as one sequence at a time up to float rounding).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Sequence


def pack_micro_batches(lengths: Sequence[int], max_tokens: int) -> list[list[int]]:
    """Group indices into micro-batches whose padded size (rows x longest row) fits ``max_tokens``.

    Longest first, greedy, deterministic (ties by index). A sequence longer than the budget gets a
    micro-batch of its own rather than failing: the budget bounds memory, it is not a data rule.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-int(lengths[i]), i))
    batches: list[list[int]] = []
    cur: list[int] = []
    cur_max = 0
    for i in order:
        n = int(lengths[i])
        new_max = max(cur_max, n)
        if cur and new_max * (len(cur) + 1) > max_tokens:
            batches.append(cur)
            cur, cur_max = [], 0
            new_max = n
        cur.append(i)
        cur_max = new_max
    if cur:
        batches.append(cur)
    return batches


@dataclass
class PaddedBatch:
    """Right-padded (prompt + response) rows and where each row's response sits."""

    input_ids: "object"        # LongTensor [B, L]
    targets: "object"          # LongTensor [B, R] response tokens, 0-padded
    mask: "object"             # BoolTensor [B, R] True on real response tokens
    gather_pos: "object"       # LongTensor [B, R] index into the kept logits for each target
    keep: int                  # number of trailing positions whose logits are needed
    resp_lens: list[int]


def make_batch(prompts: Sequence, responses: Sequence, device, pad_id: int = 0) -> PaddedBatch:
    """Build a right-padded batch. The logits of position p predict token p+1, so the response
    token at offset t of a row with prompt length P is scored from position P-1+t."""
    import torch

    rows = []
    for p, r in zip(prompts, responses):
        p = torch.as_tensor(p, dtype=torch.long).reshape(-1)
        r = torch.as_tensor(r, dtype=torch.long).reshape(-1)
        rows.append((p, r))
    B = len(rows)
    L = max(len(p) + len(r) for p, r in rows)
    R = max(1, max(len(r) for _, r in rows))
    input_ids = torch.full((B, L), pad_id, dtype=torch.long)
    targets = torch.zeros((B, R), dtype=torch.long)
    mask = torch.zeros((B, R), dtype=torch.bool)
    first = min(len(p) for p, _ in rows) - 1  # earliest position whose logits we need
    first = max(first, 0)
    keep = L - first
    gather_pos = torch.zeros((B, R), dtype=torch.long)
    for b, (p, r) in enumerate(rows):
        P, T = len(p), len(r)
        input_ids[b, :P] = p
        input_ids[b, P:P + T] = r
        targets[b, :T] = r
        mask[b, :T] = True
        gather_pos[b, :T] = torch.arange(P - 1, P - 1 + T) - first
    return PaddedBatch(input_ids.to(device), targets.to(device), mask.to(device),
                       gather_pos.to(device), keep, [len(r) for _, r in rows])


def _accepts_logits_to_keep(model) -> bool:
    fwd = getattr(model, "forward", None)
    try:
        return "logits_to_keep" in inspect.signature(fwd).parameters
    except (TypeError, ValueError):
        return False


# Logits elements of one chunk of the LM head (2^24 fp32 = 64 MB; two such tensors are alive at
# once): rows = this // vocabulary size (341 for a 49k vocabulary), at most MAX_CHUNK_ROWS.
# Memory beyond one chunk is O(tokens), not O(tokens x vocabulary).
CHUNK_ELEMENTS = 1 << 24
MAX_CHUNK_ROWS = 4096


def chunk_rows_for(vocab_size: int, chunk_elements: int = CHUNK_ELEMENTS) -> int:
    return max(1, min(MAX_CHUNK_ROWS, chunk_elements // max(int(vocab_size), 1)))


def batch_logprobs(model, batch: PaddedBatch, *, with_entropy: bool = False,
                   chunked: bool = True, chunk_rows: int | None = None, temperature: float = 1.0):
    """Log-probs [B, R] (float32, zero where ``mask`` is False) of a padded batch, and the
    per-token entropy of the full distribution when asked (computed without gradient), both of
    softmax(logits / ``temperature``) (T = 1 computes exactly what it did before T existed).

    Runs in the caller's grad mode: train-step calls it with gradients on.

    ``chunked`` (default): the model runs once up to its final hidden states; the LM head,
    log-softmax, gather and entropy then run over the real response tokens only, ``chunk_rows``
    positions at a time, inside :class:`ChunkedHeadLogprobs`, whose backward recomputes each
    chunk's logits instead of keeping them. Memory is O(tokens) beyond one chunk, where the
    unchunked path keeps several [B, R, V] float32 tensors for backward. Used when the model has
    a plain linear LM head on its decoder's output (checked on every call against the logits the
    model itself returns for the last position: softcapped or scaled heads fall back). Values
    and gradients equal the unchunked path's to float rounding.
    """
    if chunked:
        out = _chunked_logprobs(model, batch, with_entropy, chunk_rows, temperature)
        if out is not None:
            return out
    return full_batch_logprobs(model, batch, with_entropy=with_entropy, temperature=temperature)


def full_batch_logprobs(model, batch: PaddedBatch, *, with_entropy: bool = False,
                        temperature: float = 1.0):
    """The unchunked path: [B, R, V] logits, log-softmax and gather (the reference for tests)."""
    import torch

    core = getattr(model, "module", model)  # DDP wrapper: inspect the wrapped model
    kwargs = {"use_cache": False}
    keep = batch.keep
    if _accepts_logits_to_keep(core):
        kwargs["logits_to_keep"] = keep
        out = model(input_ids=batch.input_ids, **kwargs)
        logits = out.logits
    else:
        out = model(input_ids=batch.input_ids, **kwargs)
        logits = out.logits[:, -keep:, :]
    B, R = batch.targets.shape
    idx = batch.gather_pos.unsqueeze(-1).expand(B, R, logits.shape[-1])
    picked = torch.gather(logits, 1, idx).float()            # [B, R, V] logits scoring targets
    if temperature != 1.0:
        picked = picked / temperature
    logp_all = torch.log_softmax(picked, dim=-1)
    logp = torch.gather(logp_all, -1, batch.targets.unsqueeze(-1)).squeeze(-1)
    logp = logp.masked_fill(~batch.mask, 0.0)
    ent = None
    if with_entropy:
        with torch.no_grad():
            lp = logp_all.detach()
            ent = -(lp.exp() * lp).sum(-1).masked_fill(~batch.mask, 0.0)
    return logp, ent


def _plain_head(core):
    """The model's LM head when it is a plain ``nn.Linear`` on the decoder's output, else None."""
    import torch

    try:
        head = core.get_output_embeddings()
        decoder = core.get_decoder()
    except (AttributeError, NotImplementedError):
        return None
    if not isinstance(head, torch.nn.Linear) or decoder is None or decoder is core:
        return None
    if not _accepts_logits_to_keep(core):
        return None
    return head, decoder


def final_hidden(model, **forward_kwargs):
    """(final hidden states [B, L, H], LM head) of one forward through ``model`` (the DDP
    wrapper, if any, so data parallelism sees a normal forward), or None when the model does not
    have a plain linear head: only the last position's logits are computed there, and they are
    checked against the head applied to the captured hidden states (softcapped or scaled heads
    fall back)."""
    import torch

    core = getattr(model, "module", model)
    found = _plain_head(core)
    if found is None:
        return None
    head, decoder = found
    captured = []

    def grab(module, args, output):
        captured.append(output.last_hidden_state if hasattr(output, "last_hidden_state")
                        else output[0])

    handle = decoder.register_forward_hook(grab)
    try:
        out = model(use_cache=False, logits_to_keep=1, **forward_kwargs)
    finally:
        handle.remove()
    B, L = forward_kwargs["input_ids"].shape
    if len(captured) != 1 or tuple(captured[0].shape) != (B, L, head.in_features):
        return None
    hidden = captured[0]
    with torch.no_grad():
        mine = head(hidden[:, -1:, :]).float()
        theirs = out.logits[:, -1:, :].float()
        if mine.shape != theirs.shape or not torch.allclose(
                mine, theirs, rtol=1e-3, atol=1e-3 * float(theirs.abs().max().clamp(min=1.0))):
            return None  # the model transforms its head's output (softcap, scale): not plain
    return hidden, head


def head_logprobs(h, head, targets, *, with_entropy: bool, temperature: float = 1.0,
                  chunk_rows: int | None = None):
    """log softmax(head(h) / T)[target] per row of h [N, H] (and the entropy, no gradient)
    through :class:`ChunkedHeadLogprobs`: memory O(N) beyond one chunk."""
    import torch

    dtype = None
    dev = h.device.type
    if torch.is_autocast_enabled(dev):
        dtype = torch.get_autocast_dtype(dev)
    rows_per_chunk = chunk_rows or chunk_rows_for(head.out_features)
    return ChunkedHeadLogprobs.apply(h, head.weight, head.bias, targets, rows_per_chunk, dtype,
                                     with_entropy, 1.0 / float(temperature))


def _chunked_logprobs(model, batch: PaddedBatch, with_entropy: bool, chunk_rows: int | None,
                      temperature: float = 1.0):
    """The chunked path, or None when the model does not have a plain head (caller falls back)."""
    found = final_hidden(model, input_ids=batch.input_ids)
    if found is None:
        return None
    hidden, head = found
    B, L = batch.input_ids.shape
    R = batch.targets.shape[1]
    rows, cols = batch.mask.nonzero(as_tuple=True)
    pos = batch.gather_pos[rows, cols] + (L - batch.keep)
    lp, ent = head_logprobs(hidden[rows, pos], head, batch.targets[rows, cols],
                            with_entropy=with_entropy, temperature=temperature,
                            chunk_rows=chunk_rows)
    logp = lp.new_zeros((B, R)).index_put((rows, cols), lp)
    ent_full = None
    if with_entropy:
        ent_full = ent.new_zeros((B, R)).index_put((rows, cols), ent)
    return logp, ent_full


def _head_logits(h, weight, bias, dtype, inv_t: float = 1.0):
    """float32 logits of one chunk, computed in ``dtype`` (the autocast dtype) when given, and
    multiplied by 1 / temperature unless that is 1."""
    import torch
    import torch.nn.functional as F

    with torch.autocast(device_type=h.device.type, enabled=False):
        if dtype is not None:
            h, weight = h.to(dtype), weight.to(dtype)
            bias = bias.to(dtype) if bias is not None else None
        logits = F.linear(h, weight, bias).float()
    return logits if inv_t == 1.0 else logits.mul_(inv_t)


def _head_forward(ctx, hidden, weight, bias, targets, chunk, dtype, with_entropy, inv_t=1.0):
    """log softmax((h W^T + b) / T)[target] per row, and the entropy (no gradient), chunk by
    chunk."""
    import torch

    N = hidden.shape[0]
    dev = hidden.device
    lp = torch.empty(N, dtype=torch.float32, device=dev)
    lse = torch.empty(N, dtype=torch.float32, device=dev)
    ent = torch.empty(N if with_entropy else 0, dtype=torch.float32, device=dev)
    for s in range(0, N, chunk):
        e = min(N, s + chunk)
        logits = _head_logits(hidden[s:e], weight, bias, dtype, inv_t)
        lse[s:e] = torch.logsumexp(logits, dim=-1)
        logits.sub_(lse[s:e].unsqueeze(-1))                      # log-softmax, in place
        lp[s:e] = logits.gather(1, targets[s:e].unsqueeze(-1)).squeeze(-1)
        if with_entropy:
            ent[s:e] = -logits.exp().mul_(logits).sum(-1)
        del logits
    ctx.save_for_backward(hidden, weight, bias, targets, lse)
    ctx.chunk, ctx.dtype, ctx.inv_t = chunk, dtype, inv_t
    ctx.mark_non_differentiable(ent)
    return lp, ent


def _head_backward(ctx, g_lp, g_ent):
    """Recompute each chunk's logits from the saved hidden states and log-sum-exp;
    d log p_target / d logits = (onehot(target) - softmax) / T."""
    import torch

    hidden, weight, bias, targets, lse = ctx.saved_tensors
    need_h, need_w, need_b = ctx.needs_input_grad[:3]
    chunk, dtype, inv_t = ctx.chunk, ctx.dtype, ctx.inv_t
    cdt = dtype or torch.float32
    f32 = torch.float32
    gh = torch.empty_like(hidden) if need_h else None
    gw = torch.zeros(weight.shape, dtype=f32, device=weight.device) if need_w else None
    gb = torch.zeros(bias.shape, dtype=f32, device=bias.device) \
        if need_b and bias is not None else None
    w = weight.to(cdt) if need_h else None
    with torch.autocast(device_type=hidden.device.type, enabled=False):
        for s in range(0, hidden.shape[0], chunk):
            e = min(hidden.shape[0], s + chunk)
            g = g_lp[s:e].float().unsqueeze(-1)
            if inv_t != 1.0:
                g = g * inv_t
            grad = _head_logits(hidden[s:e], weight, bias, dtype, inv_t)
            grad.sub_(lse[s:e].unsqueeze(-1)).exp_().mul_(-g)
            grad.scatter_add_(1, targets[s:e].unsqueeze(-1), g)
            grad = grad.to(cdt)
            if need_h:
                gh[s:e] = (grad @ w).to(hidden.dtype)
            if need_w and cdt == f32:
                gw.addmm_(grad.t(), hidden[s:e])               # no [V, H] temporary
            elif need_w:
                gw += (grad.t() @ hidden[s:e].to(cdt)).float()
            if gb is not None:
                gb += grad.float().sum(0)
            del grad
    return (gh, gw.to(weight.dtype) if gw is not None else None,
            gb.to(bias.dtype) if gb is not None else None, None, None, None, None, None)


def _chunked_head_logprobs_function():
    import torch

    class ChunkedHeadLogprobs(torch.autograd.Function):
        """log softmax(h W^T + b)[target] (and the entropy, without gradient) for N rows,
        ``chunk`` rows at a time; backward recomputes each chunk's logits from the saved hidden
        states and log-sum-exp, so no [N, V] tensor outlives its chunk."""

        forward = staticmethod(_head_forward)
        backward = staticmethod(_head_backward)

    return ChunkedHeadLogprobs


class _LazyFunction:
    """The autograd Function is built on first use (importing this module must not import torch)."""

    _fn = None

    def apply(self, *args):
        if _LazyFunction._fn is None:
            _LazyFunction._fn = _chunked_head_logprobs_function()
        return _LazyFunction._fn.apply(*args)


ChunkedHeadLogprobs = _LazyFunction()


def sequence_logprobs(model, prompt_ids_list: Sequence, response_ids_list: Sequence,
                      micro_batch_tokens: int = 8192, *, with_entropy: bool = False,
                      grad: bool = False, pad_id: int | None = None, temperature: float = 1.0):
    """Per-token log pi(response_t | prompt, response_<t) for every (prompt, response) pair.

    Returns a list of 1-D float32 tensors (one per pair, length = len(response), on the CPU unless
    ``grad``), or ``(logprobs, entropies)`` with ``with_entropy``. Batches are packed by
    ``micro_batch_tokens`` (padded tokens per forward). Without ``grad`` it runs under no_grad and
    in eval mode is the caller's business (dropout would make the numbers random).
    """
    import contextlib

    import torch

    n = len(prompt_ids_list)
    if n != len(response_ids_list):
        raise ValueError("prompt_ids_list and response_ids_list differ in length")
    core = getattr(model, "module", model)
    device = next(core.parameters()).device
    if pad_id is None:
        pad_id = getattr(core.config, "pad_token_id", None) or 0
    lengths = [len(p) + len(r) for p, r in zip(prompt_ids_list, response_ids_list)]
    for i, p in enumerate(prompt_ids_list):
        if len(p) == 0:
            raise ValueError(f"pair {i}: empty prompt (the first response token needs a context)")
    out: list = [None] * n
    ents: list = [None] * n
    ctx = contextlib.nullcontext() if grad else torch.no_grad()
    with ctx:
        for idxs in pack_micro_batches(lengths, micro_batch_tokens):
            batch = make_batch([prompt_ids_list[i] for i in idxs],
                               [response_ids_list[i] for i in idxs], device, pad_id)
            logp, ent = batch_logprobs(model, batch, with_entropy=with_entropy,
                                       temperature=temperature)
            for row, i in enumerate(idxs):
                T = batch.resp_lens[row]
                v = logp[row, :T]
                out[i] = v if grad else v.detach().cpu()
                if with_entropy:
                    ents[i] = ent[row, :T].cpu()
    return (out, ents) if with_entropy else out
