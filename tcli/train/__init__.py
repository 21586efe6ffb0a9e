"""Policy-gradient training (train-step): loss functions, the Trainer, checkpoints.

Importing this package is cheap; torch and transformers load inside the functions that need them.
"""

from __future__ import annotations

_EXPORTS = {
    "TrainConfig": "tcli.train.trainer",
    "Trainer": "tcli.train.trainer",
    "TrainSample": "tcli.train.trainer",
    "load_trainer": "tcli.train.trainer",
    "samples_from_records": "tcli.train.trainer",
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
