"""Silence transformers/hub progress bars and advisory warnings: a CLI's stderr is for its own logs."""

from __future__ import annotations

import contextlib
import os
import warnings


def quiet_transformers() -> None:
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except Exception:  # pragma: no cover - older transformers
        pass
    try:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    except Exception:  # pragma: no cover
        pass


@contextlib.contextmanager
def quiet_peft():
    """peft 0.21 asks transformers 5.x a deprecated question (``is_gradient_checkpointing``):
    the FutureWarning is theirs, not the user's, and a CLI's stderr stays clean."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing",
                                category=FutureWarning)
        yield
