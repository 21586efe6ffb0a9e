"""train-critic as a library: fit the PPO critic's values to GAE returns (docs/design.md §4, PPO).

The clipped value loss, per response token t (V = the critic now, V_old = ``critic_values`` at
sampling time, R = ``returns``, c = ``value_clip``)::

    V_clip = V_old + clamp(V - V_old, -c, c)
    loss_t = 0.5 * max((V - R)^2, (V_clip - R)^2)         (c = 0: 0.5 * (V - R)^2)

averaged over all policy response tokens of a mini-batch (environment tokens, ``loss_mask`` 0,
have no value target: docs/design.md §3.6). The critic reuses the policy Trainer's
machinery (token-budget micro-batches, the global denominator, DDP under torchrun, grad-norm clip,
AdamW state in an atomic checkpoint): only loading, the per-micro-batch loss and the metrics differ.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np

from tcli.errors import DataError
from tcli.train.dist import DistInfo
from tcli.train.metrics import StepStats
from tcli.train.samples import policy_tokens
from tcli.train.trainer import Trainer


@dataclass
class CriticSample:
    """What train-critic reads from an advantaged rollout record."""

    prompt: np.ndarray       # int64
    tokens: np.ndarray       # int64
    old_values: np.ndarray   # float32, V_t at sampling time for t < T
    returns: np.ndarray      # float32
    line: int = 0
    loss_mask: np.ndarray | None = None  # bool: no value target on environment tokens (§3.6)

    def __len__(self) -> int:
        return len(self.prompt) + len(self.tokens)


def critic_samples(records: Iterable, source: str = "<records>",
                   vocab_size: int | None = None) -> list[CriticSample]:
    """Records (dicts or (line, dict) pairs) to validated samples; DataError names the field."""
    from tcli.records import as_float32, float_array, loss_mask, token_array

    out = []
    for i, item in enumerate(records, 1):
        line, rec = item if isinstance(item, tuple) else (i, item)
        try:
            prompt, toks = token_array(rec, "prompt_token_ids"), token_array(rec)
            check_critic_tokens(prompt, toks, vocab_size)
            if "critic_values" not in rec:
                raise DataError("is missing: run `tcli values --critic DIR` first",
                                field="critic_values")
            old = as_float32(float_array(rec, "critic_values", len(toks) + 1)[:-1],
                             "critic_values")
            if "returns" not in rec:
                raise DataError("is missing: run `tcli advantages -e gae` first (verify drops "
                                "returns computed from earlier rewards)", field="returns")
            ret = as_float32(float_array(rec, "returns", len(toks)), "returns")
            mask = loss_mask(rec, len(toks))
        except DataError as e:
            raise e.located(source, line) from None
        out.append(CriticSample(prompt, toks, old, ret, line,
                                None if mask is None or mask.all() else mask))
    return out


def check_critic_tokens(prompt: np.ndarray, tokens: np.ndarray, vocab_size: int | None) -> None:
    """A value needs a context (non-empty prompt) and ids inside the critic's vocabulary."""
    if len(prompt) == 0:
        raise DataError("is empty; the first value needs a context", field="prompt_token_ids")
    for name, arr in (("prompt_token_ids", prompt), ("token_ids", tokens)):
        if vocab_size is not None and len(arr) and int(arr.max()) >= vocab_size:
            raise DataError(f"token id {int(arr.max())} is outside the critic's vocabulary "
                            f"(size {vocab_size})", field=name)


@dataclass
class ValueSums:
    """Per-step sums for the critic's metrics (all-reduced once)."""

    clipped: float = 0.0
    ret: float = 0.0
    ret_sq: float = 0.0
    err: float = 0.0
    err_sq: float = 0.0

    def as_list(self) -> list[float]:
        return [self.clipped, self.ret, self.ret_sq, self.err, self.err_sq]


class CriticTrainer(Trainer):
    """A Trainer whose model is the critic and whose loss is the clipped value loss."""

    def __init__(self, critic_dir: str, opts, *, seed: int = 0, dist_info: DistInfo | None = None):
        """``opts``: the critic's settings (``CriticOptions``); its ``train_options()`` are the
        Trainer settings the critic shares."""
        self.copts = opts
        super().__init__(critic_dir, opts.train_options(), seed=seed, dist_info=dist_info)
        self.sums = ValueSums()

    def _load_policy(self, model_dir: str):
        from tcli.models.critic import load_critic

        self.peft = None  # the critic is trained in full (no LoRA, no FSDP yet)
        return load_critic(model_dir, device=self.device, train=True)

    def step(self, records: Sequence) -> dict:
        """epochs x mini_batches optimizer steps on ``records`` (CriticSamples or dicts)."""
        samples = [s for s in (records if all(isinstance(s, CriticSample) for s in records)
                               else critic_samples(records, vocab_size=self.vocab_size))
                   if policy_tokens(s)]
        stats, self.sums = StepStats(), ValueSums()
        t0 = time.perf_counter()
        self._run_epochs(samples, stats, {})
        self.step_count += 1
        return self._metrics(stats, time.perf_counter() - t0)

    def _micro_step(self, samples, micro, denom: float, stats: StepStats, ref_cache: dict) -> None:
        """Forward the padded rows, clipped value loss on the response tokens, backward."""
        import torch

        from tcli.models.critic import value_rows
        from tcli.train.batching import policy_mask

        idxs = micro.idxs
        rows, spans = value_rows(self.ddp, [samples[i].prompt for i in idxs],
                                 [samples[i].tokens for i in idxs], self.device, self.pad_id)
        R = max(len(samples[i].tokens) for i in idxs)
        steps = torch.arange(R, device=self.device)
        starts = torch.tensor([s for s, _ in spans], device=self.device)
        v = rows.gather(1, (starts[:, None] + steps[None, :]).clamp(max=rows.shape[1] - 1))
        mask = steps[None, :] < torch.tensor([len(samples[i].tokens) for i in idxs],
                                             device=self.device)[:, None]
        mask, _ = policy_mask(mask, samples, idxs)  # value targets on policy tokens only
        old = self._pad([samples[i].old_values for i in idxs], R)
        ret = self._pad([samples[i].returns for i in idxs], R)
        loss, clipped = value_loss(v, old, ret, self.copts.value_clip)
        num = (loss * mask).sum()
        (num * (self.dist.world_size / denom)).backward()
        with torch.no_grad():
            self._add_sums(stats, num / denom, clipped, v, ret, mask, len(idxs))
        stats.model_tokens += micro.model_tokens
        stats.real_tokens += micro.real_tokens

    def _add_sums(self, stats, loss, clipped, v, ret, mask, n_seqs: int) -> None:
        err = (ret - v).masked_fill(~mask, 0.0)
        r = ret.masked_fill(~mask, 0.0)
        s = self.sums
        s.clipped += float((clipped & mask).sum())
        s.ret += float(r.sum())
        s.ret_sq += float((r * r).sum())
        s.err += float(err.sum())
        s.err_sq += float((err * err).sum())
        stats.loss += float(loss)
        stats.tokens += float(mask.sum())
        stats.seqs += n_seqs

    def _metrics(self, stats: StepStats, elapsed: float) -> dict:
        """value_loss, clip share, explained variance 1 - Var(R - V) / Var(R) over tokens (None
        when the returns do not vary: undefined, not 0)."""
        g = stats.reduced(self._allreduce)
        clipped, ret, ret_sq, err, err_sq = self._allreduce(self.sums.as_list())
        n = max(g.tokens, 1.0)
        var_r = ret_sq / n - (ret / n) ** 2
        var_e = err_sq / n - (err / n) ** 2
        norms = g.grad_norms
        return {"step": self.step_count, "value_loss": g.loss / max(g.optimizer_steps, 1),
                "value_clip_frac": clipped / n,
                "explained_variance": 1.0 - var_e / var_r if var_r > 1e-12 else None,
                "grad_norm": float(np.mean(norms)) if norms else 0.0, "lr": self.copts.lr,
                "num_tokens": int(round(g.tokens / self.opts.epochs)),
                "optimizer_steps": g.optimizer_steps - g.skipped, "time_s": elapsed}


def value_loss(v, old, ret, clip: float):
    """Per-token clipped value loss and where the clipped branch was the larger one."""
    import torch

    plain = (v - ret) ** 2
    if clip <= 0:
        return 0.5 * plain, torch.zeros_like(plain, dtype=torch.bool)
    v_clip = old + torch.clamp(v - old, -clip, clip)
    clipped_sq = (v_clip - ret) ** 2
    return 0.5 * torch.maximum(plain, clipped_sq), clipped_sq > plain
