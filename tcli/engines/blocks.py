"""The hf engine's segment decoder with a host check every k tokens (docs/design.md §5.7).

Decoding a token per step and asking the host after each one whether a row ended (EOS, length)
costs a device-to-host synchronisation per token, which on a GPU stalls the launch queue. Here k
tokens are drawn and fed on the device in a row, for every row of the batch; only then are the
tokens, log-probs (and entropies) read back at once and walked row by row on the host, exactly as
the per-token loop would have appended them: a row's tokens after its EOS or its length limit are
dropped ("trimmed"). A row that ended keeps decoding garbage until the check; every row's samples
depend on its own logits and its own random stream only, so the rows that go on get the same
tokens as with a check per token, and the finish reasons are the same.

The uniforms of the k steps come from the same counter-based streams (engines/rng.py), computed
on the host for the block and copied once.

Imports torch: import this module only where an engine is created.
"""

from __future__ import annotations

import numpy as np
import torch

from tcli.engines.cuda_graphs import PoolCache
from tcli.engines.rng import uniforms, uniforms_at
from tcli.engines.rows import Rows
from tcli.engines.sampling import SamplingConfig, logprob_temperature, topk_entropy


def _uniforms(engine, st: Rows, first, k: int, cfg: SamplingConfig):
    """The (k, rows) uniforms of steps first..first+k-1 on the device, or None when greedy;
    ``first``: one step, or an array of one per row."""
    if cfg.temperature <= 0:
        return None
    keys = st.keys()
    at = uniforms if np.ndim(first) == 0 else uniforms_at
    u = torch.from_numpy(np.stack([at(keys, first + j) for j in range(k)]))
    if engine.device.type == "cuda":
        return u.pin_memory().to(engine.device, non_blocking=True)
    return u.to(engine.device)


def _entropy(logits, cfg: SamplingConfig, top_k):
    """What ``HFEngine.entropies`` computes, left on the device: exact entropies (R,) or the
    ``top_k`` largest log-probs (R, top_k)."""
    t = logprob_temperature(cfg.temperature)
    logp = torch.log_softmax(logits if t == 1 else logits / t, dim=-1)
    if top_k is not None and top_k < logp.shape[-1]:
        return logp.topk(top_k, dim=-1).values.double()
    h = -torch.where(logp > float("-inf"), logp.exp() * logp, 0.0).sum(-1)
    return h.clamp_(min=0.0)


def draw_block(engine, st: Rows, first, k: int, cfg: SamplingConfig, top_k, feed_last: bool,
               forced=None):
    """k tokens for every row without a host sync; feeds each token (the last one only when
    ``feed_last``); ``first``: the step of the first token, one or one per row; ``forced``:
    (tokens, where) of shape (k, rows) on the device, tokens that replace the sampled ones where
    set (observation tokens). Returns host lists per row: tokens, log-probs, entropies (or
    None)."""
    u = _uniforms(engine, st, first, k, cfg)
    keys = st.keys()
    toks, lps, ents = [], [], []
    for j in range(k):
        if top_k is not False:
            ents.append(_entropy(st.logits, cfg, top_k))
        tok, lp = engine._sample(st.logits, keys, first + j, cfg, u=None if u is None else u[j])
        if forced is not None:
            tok = torch.where(forced[1][j], forced[0][j], tok)
        toks.append(tok)
        lps.append(lp)
        if j < k - 1 or feed_last:
            engine.advance(st, tok)
    tok_rows = torch.stack(toks, 1).tolist()
    lp_rows = torch.stack(lps, 1).tolist()
    if top_k is False:
        return tok_rows, lp_rows, None
    ent = torch.stack(ents, 1)
    if ent.ndim == 3:  # top-k log-probs: the estimate on the host, as ``entropies`` does
        ent = torch.from_numpy(topk_entropy(ent.cpu().numpy().reshape(-1, ent.shape[-1]))
                               .reshape(ent.shape[:2]))
    return tok_rows, lp_rows, ent.tolist()


def decode_segment(engine, st: Rows, last_level: bool, seg: int, cfg: SamplingConfig,
                   leaves, top_k=False) -> Rows | None:
    """``HFEngine._segment`` with a host check every ``engine.stop_every`` tokens: the same
    leaves, and the same rows still running (their cache and logits ready for the next token,
    out of the graph pool), or None when all finished."""
    start = len(st.nodes[0].tokens)
    eos = set(engine.eos_token_ids)
    t = 0
    while t < seg:
        k = min(engine.stop_every, seg - t)
        # the last token of a segment is fed only when rows can go on (children need its logits)
        ends_all = start + t + k >= cfg.max_new_tokens or (last_level and t + k == seg)
        toks, lps, ents = draw_block(engine, st, start + t, k, cfg, top_k,
                                      feed_last=not ends_all)
        keep = []
        for i, node in enumerate(st.nodes):
            for j in range(k):
                step = start + t + j
                if ents is not None:
                    node.entropies.append(ents[i][j])
                node.tokens.append(toks[i][j])
                node.logprobs.append(lps[i][j])
                engine.generated_tokens += 1
                stop = toks[i][j] in eos
                if (stop or step + 1 >= cfg.max_new_tokens or node.capped()
                        or (last_level and t + j == seg - 1)):
                    node.ends.append(len(node.tokens))
                    leaves[node.prompt].append(node.leaf("stop" if stop else "length"))
                    break
            else:
                keep.append(i)
        t += k
        if not keep:
            return None
        if len(keep) < len(st.nodes):
            idx = torch.tensor(keep, dtype=torch.long, device=engine.device)
            st.nodes = [st.nodes[i] for i in keep]
            st.logits = st.logits[idx]
            engine.select(st, keep)
    for node in st.nodes:
        node.ends.append(len(node.tokens))
    return out_of_pool(st)


def rewind(st: Rows, drop: torch.Tensor, pos: torch.Tensor) -> None:
    """Take fed tokens back: of the last ``drop.shape[1]`` cache columns, those where ``drop``
    (rows, m) is set are masked, and ``pos`` (rows,) becomes each row's next position. The keys
    stay where they are, never attended again, so nothing is copied."""
    m = drop.shape[1]
    if m:
        st.mask = st.mask.clone()
        st.mask[:, -m:].masked_fill_(drop, 0)
    st.pos = pos
    if isinstance(st.cache, PoolCache):
        st.cache.rewind(drop, pos)


def keep_drawn(st: Rows, kept: list[int], k: int, pos0: torch.Tensor) -> None:
    """After a block of ``k`` draws with the last one not fed (positions were ``pos0``), row i
    keeps its first ``kept[i]`` tokens: the columns of the ones after are taken back (``rewind``)
    and its next fed token is its ``kept[i]``-th, at its position."""
    r = torch.tensor(kept, dtype=torch.long, device=pos0.device)
    rewind(st, torch.arange(k - 1, device=r.device).unsqueeze(0) >= (r - 1).unsqueeze(1),
           pos0 + r - 1)


def out_of_pool(st: Rows) -> Rows:
    """Rows that outlive their segment leave the graph pool (the next fork reads them while the
    pool decodes their children); their logits are copied off the graph's output buffer."""
    if isinstance(st.cache, PoolCache):
        st.cache = st.cache.detach(st.mask.shape[1])
        st.logits = st.logits.clone()
    return st
