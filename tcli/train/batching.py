"""How train-step cuts a mini-batch into micro-batches and runs each through the model.

Two layouts, chosen by ``TrainOptions.share_prefix`` (a registry, not an if-chain):

- ``packed`` (default): the samples are grouped by prompt, each group is one prefix tree
  (:mod:`tcli.train.trie`) that holds every unique token once, tries are shared out to ranks
  whole and packed first-fit into rows of at most ``micro_batch_tokens`` unique tokens with a
  block-diagonal tree mask (:mod:`tcli.train.packed`). No padding: ``padding_share`` is 0.
- ``padded``: one right-padded row per sample, micro-batches by padded tokens (the reference).

Both give every micro-batch's log-probs as a [B, R] grid in the order of its ``idxs``, so old
log-probs, advantages, the loss and its aggregation are computed the same way for both.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from tcli.registry import Registry
from tcli.train.dist import shard_balanced

LAYOUTS: Registry = Registry("micro-batch layout")


@dataclass
class MicroBatch:
    idxs: list[int]          # samples, in the order of the grid's rows
    model_tokens: int        # positions the model runs over (padding included)
    real_tokens: int         # of those, real tokens
    row: object = None       # PackedRow (packed layout)

    def logprobs(self, model, samples, device, *, pad_id: int, temperature: float,
                 with_entropy: bool):
        """(log-probs [B, R], entropies or None, mask [B, R]) of this micro-batch."""
        if self.row is not None:
            from tcli.train.packed import packed_logprobs

            return packed_logprobs(model, self.row, device, with_entropy=with_entropy,
                                   temperature=temperature)
        from tcli.models.logprobs import batch_logprobs, make_batch

        batch = make_batch([samples[i].prompt for i in self.idxs],
                           [samples[i].tokens for i in self.idxs], device, pad_id)
        logp, ent = batch_logprobs(model, batch, with_entropy=with_entropy,
                                   temperature=temperature)
        return logp, ent, batch.mask

    def attention(self, *models):
        """The context the forward and backward of this micro-batch run in."""
        import contextlib

        if self.row is None:
            return contextlib.nullcontext()
        from tcli.train.packed import tree_attention

        return tree_attention(*models)


def policy_mask(mask, samples, idxs):
    """``mask`` (real response tokens, [B, R]) without the environment tokens of the samples'
    ``loss_mask`` (docs/design.md §3.6), and whether anything was taken out. Every loss term,
    its normalisation and every per-token metric read this mask, so environment tokens get no
    loss, no KL and no gradient; the model still runs over them as context."""
    masks = [getattr(samples[i], "loss_mask", None) for i in idxs]
    if all(m is None for m in masks):
        return mask, False
    import numpy as np
    import torch

    keep = np.ones(tuple(mask.shape), dtype=bool)
    for row, m in enumerate(masks):
        if m is not None:
            keep[row, :len(m)] = m
    return mask & torch.from_numpy(keep).to(mask.device), True


@LAYOUTS.register("padded")
def padded_micro_batches(samples, mb: Sequence[int], budget: int, world_size: int,
                         rank: int) -> list[MicroBatch]:
    """This rank's token-balanced shard of samples, in padded micro-batches."""
    from tcli.models.logprobs import pack_micro_batches

    mine = [mb[j] for j in shard_balanced([len(samples[i]) for i in mb], world_size, rank)]
    out = []
    for m in pack_micro_batches([len(samples[i]) for i in mine], budget):
        idxs = [mine[j] for j in m]
        real = sum(len(samples[i]) for i in idxs)
        out.append(MicroBatch(idxs, len(idxs) * max(len(samples[i]) for i in idxs), real))
    return out


@LAYOUTS.register("packed")
def packed_micro_batches(samples, mb: Sequence[int], budget: int, world_size: int,
                         rank: int) -> list[MicroBatch]:
    """This rank's share of whole prefix tries (balanced by unique tokens), first-fit into rows."""
    from tcli.train.trie import bin_units, group_units, pack_row

    units = group_units([s.prompt for s in samples], [s.tokens for s in samples], mb, budget)
    mine = [units[j] for j in shard_balanced([u.size for u in units], world_size, rank)]
    out = []
    for b in bin_units([u.size for u in mine], budget):
        row = pack_row([mine[u] for u in b])
        out.append(MicroBatch(list(row.members), len(row.input_ids), len(row.input_ids), row))
    return out


def layout_name(share_prefix: bool) -> str:
    return "packed" if share_prefix else "padded"
