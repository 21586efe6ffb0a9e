"""The forward passes of a train step that take no gradient: the frozen reference model's
log-probs (KL) and the policy's own log-probs of the sampled tokens before the step's first
update, pi_train_old (truncated importance sampling, docs/design.md §4.16).

A mixin of :class:`tcli.train.trainer.Trainer`: it uses the trainer's model, layout, device and
collectives. Under FSDP every forward is a collective, so every rank runs as many as the busiest
one (a one-token dummy where it has none left).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from tcli.train.dist import gather_or_raise


class NoGradPasses:
    """Log-probs without gradient, for :class:`tcli.train.trainer.Trainer`."""

    def _ref_fill(self, samples, micro, cache: dict) -> None:
        """Reference log-probs of a micro-batch (None: this rank has none left), computed once
        per sample across epochs. A sharded reference forward is a collective: when any rank
        misses a sample every rank runs one (its own micro-batch, or a one-token dummy)."""
        import torch

        if self.ref_model is None:
            return
        need = micro is not None and any(i not in cache for i in micro.idxs)
        if self.sharded:
            need = self._allreduce([float(need)])[0] > 0
        if not need:
            return
        with torch.no_grad(), self._autocast():
            if micro is None:
                ids = torch.full((1, 1), self.pad_id, dtype=torch.long, device=self.device)
                self.ref_model(input_ids=ids, use_cache=False)
            else:
                with micro.attention(self.ref_model):
                    lp, _, _ = micro.logprobs(self.ref_model, samples, self.device,
                                              pad_id=self.pad_id, temperature=self.temperature,
                                              with_entropy=False)
                for row, i in enumerate(micro.idxs):
                    cache[i] = lp[row, :len(samples[i].tokens)].float()
        if self.sharded:
            self.ref_model.reshard()  # the root group stays gathered after a forward otherwise

    def _ref_logp(self, micro, mask, cache: dict):
        """The cached reference log-probs of a micro-batch, padded like ``mask``."""
        import torch

        out = torch.zeros(mask.shape, dtype=torch.float32, device=self.device)
        for row, i in enumerate(micro.idxs):
            out[row, :len(cache[i])] = cache[i]
        return out

    def _train_old_logprobs(self, samples: Sequence, stats) -> list[np.ndarray]:
        """pi_train_old of every sample (the same list on every rank): the policy's log-probs of
        the sampled tokens, under no_grad and before any update, in this rank's share of
        micro-batches, then gathered. Adds the sampler/trainer mismatch to ``stats``."""
        import torch

        from tcli.train.batching import policy_mask
        from tcli.train.loss import mismatch_sums

        micro = self.layout(samples, list(range(len(samples))), self.opts.micro_batch_tokens,
                            self.dist.world_size, self.dist.rank)
        n = self._micro_batch_count(len(micro)) if self.sharded else len(micro)
        mine: dict[int, np.ndarray] = {}
        self.model.train()  # as in the update's forward, so the first ratio is exactly 1
        with torch.no_grad(), self._autocast():
            for k in range(n):
                if k >= len(micro):  # FSDP: the others' forwards are collectives
                    ids = torch.full((1, 1), self.pad_id, dtype=torch.long, device=self.device)
                    self.model(input_ids=ids, use_cache=False)
                    continue
                m = micro[k]
                with m.attention(self.model):
                    lp, _, mask = m.logprobs(self.model, samples, self.device, pad_id=self.pad_id,
                                             temperature=self.temperature, with_entropy=False)
                lp = lp.float()
                mask, _ = policy_mask(mask, samples, m.idxs)  # mismatch over policy tokens
                sampler = self._pad([samples[i].old_logp for i in m.idxs], mask.shape[1])
                stats.add_mismatch(mismatch_sums(lp, sampler, mask, self.opts.tis_cap))
                for row, i in enumerate(m.idxs):
                    mine[i] = lp[row, :len(samples[i].tokens)].cpu().numpy()
        if self.sharded:
            self.model.reshard()
        out: list = [None] * len(samples)
        for part in gather_or_raise(lambda: mine, self.dist):
            for i, a in part.items():
                out[i] = a
        return out
