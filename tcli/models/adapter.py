"""LoRA adapter checkpoints: how they are recognised and loaded (``files``, ``load``), written and
exported merged.

An adapter checkpoint is an ordinary peft adapter directory (``adapter_config.json`` +
``adapter_model.safetensors``; ``base_model_name_or_path`` is the absolute path of the full base
model, the same for every step of a run) plus what tcli adds to any checkpoint: the tokenizer,
``tcli_state.json`` and ``optimizer.pt`` (AdamW over the adapter parameters only). The base
weights are never written again: they stay bit-identical to the base model's files.
Training adapters (wrapping a model with peft) is ``tcli.train.lora``'s job.
"""

from __future__ import annotations

import os

from tcli.models.checkpoint import read_state, save_pretrained_atomic
from tcli.models.files import (ADAPTER_CONFIG, ADAPTER_WEIGHTS, adapter_base,  # noqa: F401
                               is_adapter_dir)
from tcli.models.load import load_merged, load_tokenizer


def save_adapter(out_dir: str, peft_model, tokenizer, *, base: str, state: dict | None = None,
                 optimizer=None, gathered=None) -> str:
    """Write an adapter checkpoint atomically (never over user data, as full checkpoints):
    adapter files whose config names ``base`` (absolute), tokenizer, state, optimizer.
    ``gathered``: the stand-in of a sharded model (``parallel.gathered``) that writes in its
    place."""
    for cfg in peft_model.peft_config.values():
        cfg.base_model_name_or_path = os.path.abspath(base)
    return save_pretrained_atomic(out_dir, gathered or peft_model, tokenizer, state=state,
                                  optimizer=optimizer)


def export_merged(adapter_dir: str, out_dir: str) -> str:
    """A full ordinary checkpoint (model.safetensors, config, tokenizer) with the adapter merged
    in: what vllm or any transformers user loads without peft."""
    model = load_merged(adapter_dir)
    state = {**read_state(adapter_dir), "merged_from": os.path.abspath(adapter_dir)}
    return save_pretrained_atomic(out_dir, model, load_tokenizer(adapter_dir), state=state)
