"""Supervised fine-tuning on (prompt, response) pairs: the warm start before RL.

Why it exists: RL with verifiable rewards needs a policy that is already right some of the time
(groups with mixed rewards); a tiny local model gets there after a short SFT. The loss is the
token-mean negative log-likelihood of the response tokens only (prompt tokens are context, not
targets), computed by the same teacher-forced code that train-step uses
(:func:`tcli.models.logprobs.sequence_logprobs`), so both stages score tokens identically.

The response is encoded without special tokens and followed by EOS, so the model learns to stop.
The result is saved as a fresh checkpoint (policy_version 0, no optimizer state: SFT's Adam
moments would only bias the first RL steps).
"""

from __future__ import annotations

import math
import random
import time
from typing import Callable, Iterator, Sequence

from tcli.models.versions import software_versions


def encode_pairs(tokenizer, examples: Sequence[tuple[str, str]], *, add_eos: bool = True):
    """Token ids of every (prompt, response) pair; the response ends with EOS when ``add_eos``."""
    eos = tokenizer.eos_token_id
    prompts, responses = [], []
    for i, (p, r) in enumerate(examples):
        pi = tokenizer(p, add_special_tokens=False)["input_ids"]
        ri = tokenizer(r, add_special_tokens=False)["input_ids"]
        if not pi:
            raise ValueError(f"example {i}: empty prompt")
        if add_eos and eos is not None:
            ri = list(ri) + [eos]
        prompts.append(list(pi))
        responses.append(list(ri))
    return prompts, responses


def response_loss(model, prompts, responses, micro_batch_tokens: int = 16384):
    """Token-mean negative log-likelihood of the response tokens (with gradient). Prompt tokens
    are never targets: they only condition the response."""
    import torch

    from tcli.models.logprobs import sequence_logprobs

    lps = sequence_logprobs(model, prompts, responses, micro_batch_tokens, grad=True)
    ntok = sum(len(lp) for lp in lps)
    return -torch.cat(lps).sum() / max(ntok, 1)


def response_nll(model, prompts, responses, micro_batch_tokens: int = 16384) -> float:
    """:func:`response_loss` as a float, without gradient, in eval mode."""
    import torch

    was_training = model.training
    model.eval()
    with torch.no_grad():
        loss = float(response_loss(model, prompts, responses, micro_batch_tokens))
    model.train(was_training)
    return loss


def lr_schedule(lr: float, steps: int, *, warmup: int = 0, schedule: str = "cosine",
                min_lr_ratio: float = 0.1) -> Callable[[int], float]:
    """The learning rate of each step: linear ``warmup``, then ``constant`` or ``cosine``
    (decaying to ``min_lr_ratio * lr`` at the last step)."""
    if schedule not in ("constant", "cosine"):
        raise ValueError(f"schedule must be 'constant' or 'cosine', not {schedule!r}")

    def lr_at(step: int) -> float:
        if warmup and step < warmup:
            return lr * (step + 1) / warmup
        if schedule == "constant" or steps <= warmup:
            return lr
        frac = (step - warmup) / max(1, steps - warmup)
        return lr * (min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * frac)))

    return lr_at


def shuffled_batches(n: int, batch_size: int, seed: int) -> Iterator[list[int]]:
    """Endless batches of example indices: each epoch is a fresh shuffle (deterministic)."""
    rng = random.Random(seed)
    order: list[int] = []
    while True:
        batch = []
        while len(batch) < batch_size:
            if not order:
                order = list(range(n))
                rng.shuffle(order)
            batch.append(order.pop())
        yield batch


def sft(model_dir: str, examples: Sequence[tuple[str, str]], out_dir: str, steps: int,
        lr: float = 1e-3, batch_size: int = 32, seed: int = 0, *, warmup: int = 0,
        schedule: str = "cosine", min_lr_ratio: float = 0.1, weight_decay: float = 0.0,
        max_grad_norm: float = 1.0, micro_batch_tokens: int = 16384,
        callback: Callable[[int, float, object], None] | None = None, log_every: int = 0,
        extra_state: dict | None = None, max_new_tokens: int | None = None) -> dict:
    """Train ``model_dir`` on ``examples`` for ``steps`` AdamW steps and save to ``out_dir``.

    Batches are drawn by shuffling the examples each epoch (deterministic for ``seed``).
    ``schedule`` is ``constant`` or ``cosine`` (decaying to ``min_lr_ratio * lr``), after a
    linear ``warmup``. ``callback(step, mean_loss, model)`` runs after every ``log_every`` steps
    (0 = never), e.g. to log, to evaluate (put the model back in train mode afterwards) or to stop
    early by raising StopIteration (the model so far is then saved).
    The checkpoint records its plain prompts, no chat template (and ``max_new_tokens``) for eval.
    Returns ``{"steps", "loss_first", "loss_last", "time_s", "out_dir"}``.
    """
    import torch

    from tcli.models.checkpoint import check_checkpoint_target, save_pretrained_atomic
    from tcli.models.load import load_model, load_tokenizer

    if steps < 0 or batch_size < 1:
        raise ValueError("steps must be >= 0 and batch_size >= 1")
    lr_at = lr_schedule(lr, steps, warmup=warmup, schedule=schedule, min_lr_ratio=min_lr_ratio)
    if not examples:
        raise ValueError("no examples")
    check_checkpoint_target(out_dir, kind="policy")  # refuse before training, not after it
    torch.manual_seed(seed)
    tok = load_tokenizer(model_dir, required=True)
    model = load_model(model_dir, train=True, keep_dropout=True)
    model.config.use_cache = False
    prompts, responses = encode_pairs(tok, examples)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    losses: list[float] = []
    t0 = time.perf_counter()
    try:
        for step, batch in zip(range(steps), shuffled_batches(len(prompts), batch_size, seed)):
            losses.append(_sft_step(model, opt, [prompts[i] for i in batch],
                                    [responses[i] for i in batch], lr=lr_at(step),
                                    max_grad_norm=max_grad_norm,
                                    micro_batch_tokens=micro_batch_tokens))
            if callback is not None and log_every and len(losses) % log_every == 0:
                callback(len(losses), sum(losses[-log_every:]) / log_every, model)
    except StopIteration:
        pass
    elapsed = time.perf_counter() - t0
    model.eval()
    model.config.use_cache = True
    last = losses[-1] if losses else None
    state = {"step": 0, "policy_version": 0, "seed": seed,
             "sft": {"steps": len(losses), "lr": lr, "batch_size": batch_size,
                     "schedule": schedule, "warmup": warmup, "examples": len(examples),
                     "loss_last": last},
             "sampling": {"prompt_template": "plain", "chat_template": False,
                          **({"max_new_tokens": max_new_tokens} if max_new_tokens else {})},
             "versions": software_versions(model.device), **dict(extra_state or {})}
    save_pretrained_atomic(out_dir, model, tok, state=state)
    return {"steps": len(losses), "loss_first": losses[0] if losses else None, "loss_last": last,
            "time_s": elapsed, "out_dir": out_dir}


def _sft_step(model, opt, prompts, responses, *, lr: float, max_grad_norm: float,
              micro_batch_tokens: int) -> float:
    """One AdamW step on the response NLL of a batch; returns the loss."""
    import torch

    for g in opt.param_groups:
        g["lr"] = lr
    loss = response_loss(model, prompts, responses, micro_batch_tokens)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if max_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
    opt.step()
    return float(loss.detach())
