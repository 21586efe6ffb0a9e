"""Rollout records to training samples: validate the fields train-step reads (docs/design.md §3).

No torch here: the command validates every record before any weights load, so bad input fails
in a fraction of a second with the file, line and field.

``temperature`` is the sampling temperature T the record's ``logprobs`` were computed at
(log-softmax of logits / T); train-step recomputes its log-probs at the same T. A record without
it is T = 1 (older records); T = 0 (greedy) is read as 1 (a greedy sample has no tempered
distribution; the sampler records raw log-probs for it). One batch has one T: mixed values are a
data error naming the first record that differs.

``loss_mask`` (optional, docs/design.md §3.6) marks a tool's output inside ``token_ids``: those
tokens are context only; their log-probs and advantages are ignored (set to 0 here) and the
trainer leaves them out of every loss term and count.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

import math

import numpy as np

from tcli.errors import DataError
from tcli.records import as_float32, check_in_vocab, float_array, loss_mask, token_array

LOGPROB_TOLERANCE = 1e-3  # a log-prob above this is not a log-prob (float noise stays below)


@dataclass
class TrainSample:
    """The four arrays train-step needs from a rollout record (small, picklable for broadcast)."""

    prompt: np.ndarray       # int64
    tokens: np.ndarray       # int64
    old_logp: np.ndarray     # float32, behaviour policy
    adv: np.ndarray          # float32
    line: int = 0
    temperature: float = 1.0  # sampling temperature of old_logp (0 is read as 1)
    truncated: bool = False   # finish_reason "length": the response hit the sampling cap
    loss_mask: np.ndarray | None = None  # bool, False = environment token (None: all policy)

    def __len__(self) -> int:
        return len(self.prompt) + len(self.tokens)

    @property
    def policy_tokens(self) -> int:
        """Tokens the loss sees: the policy's, not the environment's (docs/design.md §3.6)."""
        return policy_tokens(self)


def policy_tokens(sample) -> int:
    """Policy tokens of a sample with ``tokens`` and an optional ``loss_mask``."""
    m = getattr(sample, "loss_mask", None)
    return len(sample.tokens) if m is None else int(m.sum())


def sample_from_record(rec: dict, vocab_size: int | None = None) -> TrainSample:
    """Validate one record; DataError names the field (the caller adds file and line)."""
    prompt = token_array(rec, "prompt_token_ids")
    tokens = token_array(rec, "token_ids")
    if len(prompt) == 0:
        raise DataError("is empty; the first response token needs a context", field="prompt_token_ids")
    logp = float_array(rec, "logprobs", len(tokens))
    if "advantages" not in rec:
        raise DataError("is missing: run `tcli advantages` first (verify drops advantages "
                        "computed from earlier rewards)", field="advantages")
    adv = float_array(rec, "advantages", len(tokens))
    mask = loss_mask(rec, len(tokens))
    if mask is not None:  # environment tokens: their log-probs and advantages are ignored
        mask = None if mask.all() else mask
        if mask is not None:
            logp, adv = np.where(mask, logp, 0.0), np.where(mask, adv, 0.0)
    if len(logp) and logp.max() > LOGPROB_TOLERANCE:
        raise DataError(f"log-probs must be <= 0, got {logp.max():.6g}", field="logprobs")
    sample = TrainSample(prompt, tokens, as_float32(logp, "logprobs"),
                         as_float32(adv, "advantages"), temperature=record_temperature(rec),
                         truncated=record_truncated(rec), loss_mask=mask)
    if vocab_size is not None:
        check_vocab(sample, vocab_size)
    return sample


FINISH_REASONS = ("stop", "length")


def record_truncated(rec: dict) -> bool:
    """Whether the response hit its length cap. Another ``finish_reason`` ("LENGTH", an object)
    would count as not truncated without a word: --mask-truncated would keep it in the loss and
    ``truncated_share`` would not count it."""
    v = rec.get("finish_reason")
    if v is not None and v not in FINISH_REASONS:
        raise DataError(f"must be {' or '.join(FINISH_REASONS)}, got {v!r}"[:200],
                        field="finish_reason")
    return v == "length"


def record_temperature(rec: dict) -> float:
    """The record's sampling temperature: absent -> 1.0, 0 (greedy) -> 1.0."""
    v = rec.get("temperature")
    if v is None:
        return 1.0
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
        raise DataError(f"must be a finite number >= 0, got {v!r}", field="temperature")
    return float(v) if v > 0 else 1.0


def batch_temperature(samples: Sequence[TrainSample]) -> float:
    """The one sampling temperature of a batch; DataError at the first sample that differs."""
    if not samples:
        return 1.0
    t0 = samples[0].temperature
    for s in samples:
        if s.temperature != t0:
            raise DataError(f"sampling temperature {s.temperature:g} differs from {t0:g} (line "
                            f"{samples[0].line or 1}); one batch must have one temperature",
                            line=s.line or None, field="temperature")
    return t0


def check_vocab(sample: TrainSample, vocab_size: int) -> None:
    """DataError naming the field when a token id is outside the model's vocabulary."""
    try:
        for name, arr in (("prompt_token_ids", sample.prompt), ("token_ids", sample.tokens)):
            check_in_vocab(arr, vocab_size, name)
    except DataError as e:
        raise e.located(line=sample.line or None) from None


def samples_from_records(records: Iterable, source: str = "<records>",
                         vocab_size: int | None = None) -> list[TrainSample]:
    """Records (dicts, or (line, dict) pairs from RecordReader) to validated samples."""
    out = []
    for i, item in enumerate(records, 1):
        line, rec = item if isinstance(item, tuple) else (i, item)
        try:
            s = sample_from_record(rec, vocab_size)
        except DataError as e:
            raise e.located(source, line) from None
        s.line = line
        if out and s.temperature != out[0].temperature:
            raise DataError(f"sampling temperature {s.temperature:g} differs from "
                            f"{out[0].temperature:g} (line {out[0].line}); one batch must have "
                            "one temperature", field="temperature").located(source, line)
        out.append(s)
    return out


def as_samples(items: Sequence, vocab_size: int) -> list[TrainSample]:
    """Records or TrainSamples (e.g. built by the loop) to validated samples with a response."""
    items = list(items)
    if all(isinstance(s, TrainSample) for s in items):
        for s in items:
            check_vocab(s, vocab_size)
        samples = items
    else:
        samples = samples_from_records(items, vocab_size=vocab_size)
    batch_temperature(samples)
    # nothing to learn from empty responses, or from ones without a policy token
    return [s for s in samples if s.policy_tokens > 0]
