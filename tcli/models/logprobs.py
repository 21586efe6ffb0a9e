"""Teacher-forced log-probs of response tokens: the one place that turns (prompt, response) into
per-token log pi(token | prefix), shared by train-step (with gradients) and checks of sampled logprobs.

Convention (project-wide): log-softmax of the model's RAW logits (temperature 1, no top-p), in
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


def batch_logprobs(model, batch: PaddedBatch, *, with_entropy: bool = False):
    """Log-probs [B, R] (float32, zero where ``mask`` is False) of a padded batch, and the
    per-token entropy of the full distribution when asked (computed without gradient).

    Runs in the caller's grad mode: train-step calls it with gradients on. Only the logits of
    positions that score response tokens are computed (``logits_to_keep``) when the model allows.
    """
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
    logp_all = torch.log_softmax(picked, dim=-1)
    logp = torch.gather(logp_all, -1, batch.targets.unsqueeze(-1)).squeeze(-1)
    logp = logp.masked_fill(~batch.mask, 0.0)
    ent = None
    if with_entropy:
        with torch.no_grad():
            lp = logp_all.detach()
            ent = -(lp.exp() * lp).sum(-1).masked_fill(~batch.mask, 0.0)
    return logp, ent


def sequence_logprobs(model, prompt_ids_list: Sequence, response_ids_list: Sequence,
                      micro_batch_tokens: int = 8192, *, with_entropy: bool = False,
                      grad: bool = False, pad_id: int | None = None):
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
            logp, ent = batch_logprobs(model, batch, with_entropy=with_entropy)
            for row, i in enumerate(idxs):
                T = batch.resp_lens[row]
                v = logp[row, :T]
                out[i] = v if grad else v.detach().cpu()
                if with_entropy:
                    ents[i] = ent[row, :T].cpu()
    return (out, ents) if with_entropy else out
