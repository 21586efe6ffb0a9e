"""Rollout records to training samples: validate the fields train-step reads (DESIGN §3).

No torch here: the command validates every record before any weights load, so bad input fails
in a fraction of a second with the file, line and field.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np

from tcli.errors import DataError
from tcli.records import float_array, token_array

LOGPROB_TOLERANCE = 1e-3  # a log-prob above this is not a log-prob (float noise stays below)


@dataclass
class TrainSample:
    """The four arrays train-step needs from a rollout record (small, picklable for broadcast)."""

    prompt: np.ndarray       # int64
    tokens: np.ndarray       # int64
    old_logp: np.ndarray     # float32, behaviour policy
    adv: np.ndarray          # float32
    line: int = 0

    def __len__(self) -> int:
        return len(self.prompt) + len(self.tokens)


def sample_from_record(rec: dict, vocab_size: int | None = None) -> TrainSample:
    """Validate one record; DataError names the field (the caller adds file and line)."""
    prompt = token_array(rec, "prompt_token_ids")
    tokens = token_array(rec, "token_ids")
    if len(prompt) == 0:
        raise DataError("is empty; the first response token needs a context", field="prompt_token_ids")
    logp = float_array(rec, "logprobs", len(tokens))
    if len(logp) and logp.max() > LOGPROB_TOLERANCE:
        raise DataError(f"log-probs must be <= 0, got {logp.max():.6g}", field="logprobs")
    adv = float_array(rec, "advantages", len(tokens))
    sample = TrainSample(prompt, tokens, logp.astype(np.float32), adv.astype(np.float32))
    if vocab_size is not None:
        check_vocab(sample, vocab_size)
    return sample


def check_vocab(sample: TrainSample, vocab_size: int) -> None:
    """DataError naming the field when a token id is outside the model's vocabulary."""
    for name, arr in (("prompt_token_ids", sample.prompt), ("token_ids", sample.tokens)):
        if len(arr) and int(arr.max()) >= vocab_size:
            raise DataError(f"token id {int(arr.max())} is outside the model's vocabulary "
                            f"(size {vocab_size})", line=sample.line or None, field=name)


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
    return [s for s in samples if len(s.tokens) > 0]  # nothing to learn from empty responses
