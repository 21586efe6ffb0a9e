"""The PPO critic: a causal-LM backbone with a scalar value head.

It is transformers' ``*ForTokenClassification`` with one label, so a critic directory is a normal
checkpoint that ``AutoModelForTokenClassification`` loads as is. ``init-critic`` copies the backbone
of a policy (or any causal LM of the same family) and starts the head at zero, so every initial
value is 0 and the first updates move the head before the backbone.

Values of a response of T tokens (docs/design.md §4.7): ``V_t`` before response token t is the
head's output at the last context position before it (prompt + tokens < t), for t = 0..T; ``V_T``
is the value after the last token.
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np

from tcli.errors import DataError, UsageError

MADE_BY = "init-critic"


def init_critic(source: str, out_dir: str, *, dtype: str | None = None) -> str:
    """A new critic directory from the causal LM ``source`` (or a LoRA adapter directory, merged):
    its backbone, a zero value head."""
    import torch
    from transformers import AutoModelForTokenClassification

    from tcli.models.checkpoint import check_checkpoint_target, save_pretrained_atomic
    from tcli.models.ownership import checkpoint_kind
    from tcli.models.files import base_of
    from tcli.models.load import (check_model_dir, load_merged, load_tokenizer, pretrained,
                                  torch_dtype)
    from tcli.models.quiet import quiet_transformers

    quiet_transformers()
    check_model_dir(source)
    if os.path.realpath(source) == os.path.realpath(out_dir):
        raise UsageError(f"DIR {out_dir} is the policy --from {source}: the critic would replace "
                         "it; give a new directory")
    check_checkpoint_target(out_dir, "DIR", kind="critic")
    if checkpoint_kind(source) == "critic":  # its value head would be zeroed: a worse copy
        raise UsageError(f"--from {source} is a critic; a critic starts from a policy checkpoint "
                         "(to go on training this one: train-critic --critic it)")
    base = base_of(source)  # a LoRA adapter directory: its base's architecture, merged weights
    model = pretrained(AutoModelForTokenClassification, base or source, path=base or source,
                       what="critic backbone", num_labels=1, dtype=torch_dtype(dtype))
    if base:
        merged = load_merged(source, dtype=torch_dtype(dtype))
        model.base_model.load_state_dict(merged.base_model.state_dict())
    with torch.no_grad():
        model.score.weight.zero_()
        if model.score.bias is not None:
            model.score.bias.zero_()
    model.config.classifier_dropout = 0.0
    state = {"step": 0, "made_by": MADE_BY, "kind": "critic", "source": os.path.abspath(source)}
    return save_pretrained_atomic(out_dir, model, load_tokenizer(source), state=state)


def load_critic(path: str, *, device="cpu", dtype=None, train: bool = False):
    """A critic directory (one-label token classifier) on ``device``; anything else is a usage
    error that says how to make one."""
    from transformers import AutoModelForTokenClassification

    from tcli.models.load import (check_model_dir, disable_dropout, load_config, pretrained,
                                  torch_dtype)
    from tcli.models.quiet import quiet_transformers

    quiet_transformers()
    check_model_dir(path)
    cfg = load_config(path)
    archs = getattr(cfg, "architectures", None) or []
    if not any(a.endswith("ForTokenClassification") for a in archs) or cfg.num_labels != 1:
        raise UsageError(f"--critic {path} is not a critic (a one-label *ForTokenClassification "
                         f"model, found {', '.join(archs) or 'no architecture'}); make one with "
                         f"`tcli init-critic --from {path} NEW_CRITIC_DIR` and pass "
                         "--critic NEW_CRITIC_DIR")
    model = pretrained(AutoModelForTokenClassification, path, path=path, what="critic",
                       dtype=torch_dtype(dtype))
    model.to(device)
    if train:
        model.train()
        disable_dropout(model)
    else:
        model.eval()
        model.requires_grad_(False)
    return model


def padded_batch(prompts: Sequence[np.ndarray], responses: Sequence[np.ndarray], device,
                 pad_id: int = 0):
    """Right-padded ``input_ids`` and ``attention_mask`` of prompt + response rows."""
    import torch

    seqs = [np.concatenate([p, r]).astype(np.int64) for p, r in zip(prompts, responses)]
    L = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), L), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), L), dtype=torch.long)
    for b, s in enumerate(seqs):
        ids[b, :len(s)] = torch.from_numpy(s)
        mask[b, :len(s)] = 1
    return ids.to(device), mask.to(device)


def value_rows(model, prompts, responses, device, pad_id: int = 0):
    """[B, L] head outputs (float32) and, per row, the slice of its T + 1 response values."""
    ids, mask = padded_batch(prompts, responses, device, pad_id)
    out = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[..., 0].float()
    spans = [(len(p) - 1, len(p) + len(r)) for p, r in zip(prompts, responses)]
    return out, spans


def critic_values(model, prompts: Sequence[np.ndarray], responses: Sequence[np.ndarray], *,
                  device="cpu", micro_batch_tokens: int = 2048, pad_id: int = 0) -> list[np.ndarray]:
    """T + 1 values per response, in token-budgeted batches (no gradients)."""
    import torch

    from tcli.models.logprobs import pack_micro_batches

    if any(len(p) == 0 for p in prompts):
        raise DataError("is empty; the first value needs a context", field="prompt_token_ids")
    lengths = [len(p) + len(r) for p, r in zip(prompts, responses)]
    out: list[np.ndarray | None] = [None] * len(lengths)
    with torch.no_grad():
        for idxs in pack_micro_batches(lengths, micro_batch_tokens):
            rows, spans = value_rows(model, [prompts[i] for i in idxs],
                                     [responses[i] for i in idxs], device, pad_id)
            for b, (i, (s, e)) in enumerate(zip(idxs, spans)):
                out[i] = rows[b, s:e].cpu().numpy().astype(np.float64)
    return out  # type: ignore[return-value]
