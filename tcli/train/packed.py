"""Forward of a packed prefix-tree row (see :mod:`tcli.train.trie`) through a transformers model.

The row holds several tries back to back. Each trie is one block: its tokens attend to their
ancestors only (a boolean [n, n] mask from the pre-order ``end`` array, ``j <= i < end[j]``) and
their position ids are their depths, so every token sees exactly the context it has in its own
(prompt + response) sequence and gets the same hidden state, to float rounding. Blocks never see
each other: attention runs block by block (varlen), so its cost is the sum of the blocks' n^2,
not the row's, and no padding is ever computed.

How it plugs into transformers (5.x): the decoder layers pass unknown forward kwargs through to
the attention function they look up by ``config._attn_implementation``. :func:`tree_attention`
switches the model's implementation to ``tcli_tree`` for the duration of the forward AND the
backward (gradient checkpointing recomputes the forward inside backward), and the blocks ride
along as the ``tcli_tree_blocks`` kwarg. With an implementation name that has no mask function,
transformers builds no [L, L] mask of its own. Models with sliding-window or softcapped
attention are refused there (the per-sequence path handles them).
"""

from __future__ import annotations

import contextlib

import numpy as np

from tcli.errors import TcliError
from tcli.train.trie import PackedRow

IMPL = "tcli_tree"
KWARG = "tcli_tree_blocks"
_registered: list = []


def _tree_attention_forward(module, query, key, value, attention_mask, scaling=None,
                            dropout: float = 0.0, **kwargs):
    """Block-by-block SDPA with each block's tree mask; falls back to transformers' SDPA when
    called without blocks (any other forward while the switch is on)."""
    import torch
    import torch.nn.functional as F
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

    blocks = kwargs.pop(KWARG, None)
    if blocks is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling,
                                      dropout=dropout, **kwargs)
    if kwargs.get("sliding_window") is not None or kwargs.get("softcap") is not None \
            or getattr(module, "sinks", None) is not None:
        raise TcliError("share_prefix: this model's attention (sliding window, softcap or sinks) "
                        "is not supported; use --no-share-prefix")
    groups = getattr(module, "num_key_value_groups", 1)
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    p = dropout if module.training else 0.0
    outs = [F.scaled_dot_product_attention(query[:, :, s:e], key[:, :, s:e], value[:, :, s:e],
                                           attn_mask=mask, dropout_p=p, scale=scaling)
            for s, e, mask in blocks]
    out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)
    return out.transpose(1, 2).contiguous(), None


def _register() -> None:
    if not _registered:
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        ALL_ATTENTION_FUNCTIONS[IMPL] = _tree_attention_forward
        _registered.append(True)


@contextlib.contextmanager
def tree_attention(*models):
    """Route the models' attention through the block tree attention while the block is open
    (forward and backward); the previous implementation is restored on exit."""
    _register()
    configs = [getattr(m, "module", m).config for m in models if m is not None]
    saved = [c._attn_implementation for c in configs]
    try:
        for c in configs:
            c._attn_implementation = IMPL
        yield
    finally:
        for c, impl in zip(configs, saved):
            c._attn_implementation = impl


def block_masks(row: PackedRow, device) -> list:
    """(start, stop, bool mask [n, n]) per block: token i attends to j iff j <= i < end[j]."""
    import torch

    out = []
    for (s, e), end in zip(row.blocks, row.ends):
        ar = torch.arange(e - s, device=device)
        end_t = torch.from_numpy(end).to(device)
        out.append((s, e, (ar[None, :] <= ar[:, None]) & (ar[:, None] < end_t[None, :])))
    return out


def packed_node_logprobs(model, row: PackedRow, device, *, with_entropy: bool,
                         temperature: float = 1.0):
    """Log-probs (and entropies) of the row's unique nodes [U]: the LM head runs once per
    unique (parent, token) pair. Call inside :func:`tree_attention`."""
    import torch

    from tcli.models.logprobs import final_hidden, head_logprobs

    ids = torch.from_numpy(row.input_ids).to(device).unsqueeze(0)
    pos = torch.from_numpy(row.position_ids).to(device).unsqueeze(0)
    node_pos = torch.from_numpy(row.node_pos).to(device)
    targets = torch.from_numpy(row.node_tok).to(device)
    kw = {"input_ids": ids, "position_ids": pos, KWARG: block_masks(row, device)}
    found = final_hidden(model, **kw)
    if found is not None:
        hidden, head = found
        return head_logprobs(hidden[0, node_pos], head, targets, with_entropy=with_entropy,
                             temperature=temperature)
    logits = model(use_cache=False, **kw).logits[0, node_pos].float()  # not a plain head
    if temperature != 1.0:
        logits = logits / temperature
    lp_all = torch.log_softmax(logits, dim=-1)
    lp = lp_all.gather(1, targets[:, None]).squeeze(1)
    ent = None
    if with_entropy:
        with torch.no_grad():
            ent = -(lp_all.exp() * lp_all).sum(-1)
    return lp, ent


def node_grid(row: PackedRow, device):
    """Node index [B, R] of each (member, token) (0 past a response's end) and its mask."""
    import torch

    lens = np.array([len(n) for n in row.node_of], dtype=np.int64)
    R = max(1, int(lens.max())) if len(lens) else 1
    mask = np.arange(R)[None, :] < lens[:, None]
    grid = np.zeros((len(lens), R), dtype=np.int64)
    if len(lens):
        grid[mask] = np.concatenate(row.node_of)
    return torch.from_numpy(grid).to(device), torch.from_numpy(mask).to(device)


def packed_logprobs(model, row: PackedRow, device, *, with_entropy: bool = False,
                    temperature: float = 1.0):
    """Per-(member, token) log-probs [B, R] (0 outside ``mask``), entropies and the mask, in the
    members' order; gradients flow through the gather back to the shared nodes."""
    lp, ent = packed_node_logprobs(model, row, device, with_entropy=with_entropy,
                                   temperature=temperature)
    grid, mask = node_grid(row, device)
    logp = lp[grid].masked_fill(~mask, 0.0)
    ent_g = ent[grid].masked_fill(~mask, 0.0) if with_entropy else None
    return logp, ent_g, mask
