"""Rollouts read by another model than the one that sampled them (their ``model`` field).

Token ids only mean something to the tokenizer that made them: records sampled by a model with
another vocabulary, trained or expanded by this one, would run without an error (every id can be
inside both vocabularies) and train on text nobody wrote. Another checkpoint of the same tokenizer
is fine (a stale policy, a reference), so what is compared is the vocabulary, read from each
directory's ``tokenizer.json`` without loading anything; a directory that is gone or has no
``tokenizer.json`` cannot be compared and passes.
"""

from __future__ import annotations

import os
from typing import Iterable, Iterator

from tcli.errors import DataError, UsageError
from tcli.models.files import other_tokenizer

def sampler_name(path: str) -> str:
    """What a rollout records as its ``model``: a directory as its absolute path, so that the
    check below and show-tree's decoding find the same directory from any working directory (a
    relative ``model`` read elsewhere would name another directory, or none, and pass); a Hub
    name or an engine's label that is no directory here stays as it is."""
    return os.path.abspath(path) if path and os.path.isdir(path) else path


class SampledBy:
    """Checks each distinct ``model`` of the records once against ``model_dir`` (the directory
    this command reads them with, named by ``flag`` in the error)."""

    def __init__(self, model_dir: str, flag: str = "--model"):
        self.model_dir, self.flag = model_dir, flag
        self.seen: set[str] = set()

    def check(self, rec: dict) -> None:
        """DataError (field ``model``) when the record's sampler has another vocabulary."""
        src = rec.get("model") if isinstance(rec, dict) else None
        if not isinstance(src, str) or src in self.seen:
            return
        self.seen.add(src)
        if not os.path.isdir(src) or os.path.realpath(src) == os.path.realpath(self.model_dir):
            return
        if other_tokenizer(src, self.model_dir):
            raise DataError(f"sampled by {src}, whose tokenizer differs from {self.flag} "
                            f"{self.model_dir}'s: its token ids are other text to this model",
                            field="model")

    def watch(self, records: Iterable[tuple[int, dict]], source: str) -> Iterator[tuple[int, dict]]:
        """(line, record) pairs passed on, each checked; the error names ``source`` and line."""
        for line, rec in records:
            try:
                self.check(rec)
            except DataError as e:
                raise e.located(source, line) from None
            yield line, rec


def check_same_vocabulary(path: str, model: str, what: str = "") -> None:
    """UsageError unless ``path`` (a reference model, a critic) reads token ids as the policy
    ``model`` does: the same vocabulary size, and the same tokenizer where both directories have
    one. Checked from the files, before any weights load or a run directory is touched."""
    from tcli.models.load import model_vocab_size

    name = f"{what} {path}" if what else path
    a, b = model_vocab_size(path), model_vocab_size(model)
    if a != b:
        raise UsageError(f"{name} has vocabulary size {a}, the policy {model} {b}")
    if other_tokenizer(path, model):
        raise UsageError(f"{name} has another tokenizer than the policy {model}: its token ids "
                         "are other text")
