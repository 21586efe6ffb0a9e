"""Policy-gradient training (train-step).

- ``samples``: rollout records -> validated TrainSamples (no torch)
- ``loss``: the clipped policy loss (aggregations, KL estimators: ``tcli.algos.losses``)
- ``dist``: torchrun process group, rank-0 broadcast, token-balanced shards
- ``metrics``: the per-step metrics record
- ``trainer``: the Trainer (model + AdamW + optional reference model; step and save)
- ``trie``: a group's responses as one packed prefix tree and its attention tile plan (no torch)
- ``packed``: the packed row's forward (tiled tree attention through transformers)
- ``batching``: packed (prefix-shared) or padded micro-batches, the layout registry

Importing this package is cheap; torch and transformers load inside the functions that need them.
"""

from __future__ import annotations

_EXPORTS = {
    "Trainer": "tcli.train.trainer",
    "TrainSample": "tcli.train.samples",
    "samples_from_records": "tcli.train.samples",
    "DistInfo": "tcli.train.dist",
    "policy_loss": "tcli.train.loss",
    "aggregate": "tcli.train.loss",
    "kl_penalty": "tcli.train.loss",
    "KL_ESTIMATORS": "tcli.train.loss",
    "LOSS_AGGREGATIONS": "tcli.train.loss",
}


def __getattr__(name: str):
    import importlib

    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'tcli.train' has no attribute {name!r}")


__all__ = sorted(_EXPORTS)
