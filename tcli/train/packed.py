"""Forward of a packed prefix-tree row (see :mod:`tcli.train.trie`) through a transformers model.

The row holds several tries back to back. Every token attends to its ancestors only (token j is
an ancestor-or-self of i iff ``j <= i < end[j]``, ``end`` from the pre-order layout) and its
position id is its depth, so it sees exactly the context it has in its own (prompt + response)
sequence and gets the same hidden state, to float rounding. Attention runs in query tiles of
QUERY_TILE positions, each against the keys it can see: the tile itself and the path above it
(:func:`tcli.train.trie.tile_plan`), batched into one SDPA call per layer. Its cost is
O(tokens x (depth + tile)), not the O(tokens^2) of one dense tree mask, tries of one row never
see each other, and no padding is computed beyond the last tile's rows.

How it plugs into transformers (5.x): the decoder layers pass unknown forward kwargs through to
the attention function they look up by ``config._attn_implementation``. :func:`tree_attention`
switches the model's implementation to ``tcli_tree`` for the duration of the forward AND the
backward (gradient checkpointing recomputes the forward inside backward), and the tile plan
rides along as the ``tcli_tree_blocks`` kwarg. With an implementation name that has no mask
function, transformers builds no [L, L] mask of its own. Models with sliding-window or softcapped
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
    """Tiled tree attention (see :func:`tcli.train.trie.tile_plan`): one batched SDPA call over
    the query tiles, each with its gathered keys; transformers' SDPA when called without a plan
    (any other forward while the switch is on)."""
    import torch.nn.functional as F
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    plan = kwargs.pop(KWARG, None)
    if plan is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling,
                                      dropout=dropout, **kwargs)
    if kwargs.get("sliding_window") is not None or kwargs.get("softcap") is not None \
            or getattr(module, "sinks", None) is not None:
        raise TcliError("share_prefix: this model's attention (sliding window, softcap or sinks) "
                        "is not supported; use --no-share-prefix")
    kidx, mask = plan
    T, q, _ = mask.shape
    _, H, N, d = query.shape
    Hkv, K = key.shape[1], kidx.shape[1]
    qt = F.pad(query[0], (0, 0, 0, T * q - N)).view(H, T, q, d).transpose(0, 1)   # [T, H, q, d]
    flat = kidx.reshape(-1)
    kt = key[0].index_select(1, flat).view(Hkv, T, K, d).transpose(0, 1)          # [T, Hkv, K, d]
    vt = value[0].index_select(1, flat).view(Hkv, T, K, d).transpose(0, 1)
    out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask[:, None],
                                         dropout_p=dropout if module.training else 0.0,
                                         scale=scaling, enable_gqa=Hkv != H)      # [T, H, q, d]
    return out.permute(0, 2, 1, 3).reshape(1, T * q, H, d)[:, :N], None


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


QUERY_TILE = 64  # attention cost per position ~ its depth + this


def attention_plan(row: PackedRow, device) -> tuple:
    """(key index [T, K], mask [T, q, K]) tensors of the row's tiled tree attention."""
    import torch

    from tcli.train.trie import tile_plan

    kidx, mask = tile_plan(row.end, QUERY_TILE)
    return torch.from_numpy(kidx).to(device), torch.from_numpy(mask).to(device)


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
    kw = {"input_ids": ids, "position_ids": pos, KWARG: attention_plan(row, device)}
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
