"""LoRA through peft: wrap a policy so that only low-rank adapters train, save them as an adapter
checkpoint, load a base + adapter directory (to train on, or merged for sampling), export merged.

An adapter checkpoint is an ordinary peft adapter directory (``adapter_config.json`` +
``adapter_model.safetensors``; ``base_model_name_or_path`` is the absolute path of the full base
model, the same for every step of a run) plus what tcli adds to any checkpoint: the tokenizer,
``tcli_state.json`` and ``optimizer.pt`` (AdamW over the adapter parameters only). The base
weights are never written again: they stay bit-identical to the base model's files.

The model the trainer runs is the transformers model with peft's LoRA layers inside it
(``PeftModel.get_base_model()``), so the log-prob code sees a normal causal LM; the PeftModel
wrapper is kept only for saving and merging. torch/peft are imported inside the functions.
"""

from __future__ import annotations

import contextlib
import os
import warnings

from tcli.errors import DataError, UsageError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
DEFAULT_TARGETS = "all-linear"


@contextlib.contextmanager
def _quiet():
    """peft 0.21 asks transformers 5.x a deprecated question (``is_gradient_checkpointing``):
    the FutureWarning is theirs, not the user's, and a CLI's stderr stays clean."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing",
                                category=FutureWarning)
        yield


def is_adapter_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, ADAPTER_CONFIG))


def adapter_base(path: str) -> str:
    """The base model directory an adapter directory names (checked: it must exist)."""
    from tcli.models.load import read_json_object

    cfg_path = os.path.join(path, ADAPTER_CONFIG)
    base = read_json_object(cfg_path).get("base_model_name_or_path")
    if not isinstance(base, str) or not base:
        raise DataError("names no base model", file=cfg_path, field="base_model_name_or_path")
    if not os.path.isabs(base) and not os.path.exists(base):
        base = os.path.join(path, base)  # relative to the adapter directory
    if not os.path.isdir(base):
        raise DataError(f"names base model {base!r}, which is not a directory", file=cfg_path,
                        field="base_model_name_or_path")
    if not os.path.isfile(os.path.join(path, ADAPTER_WEIGHTS)):
        raise DataError(f"adapter directory has no {ADAPTER_WEIGHTS}", file=path)
    return base


def parse_targets(targets: str):
    """``all-linear`` (every linear layer but the LM head, peft's shorthand) or a comma list of
    module names (q_proj,v_proj)."""
    if targets.strip() == DEFAULT_TARGETS:
        return DEFAULT_TARGETS
    names = [t.strip() for t in targets.split(",") if t.strip()]
    if not names:
        raise UsageError(f"LoRA targets must be {DEFAULT_TARGETS} or module names, got {targets!r}")
    return names


def lora_config(rank: int, alpha: float, targets: str):
    from peft import LoraConfig

    return LoraConfig(r=int(rank), lora_alpha=alpha, target_modules=parse_targets(targets),
                      lora_dropout=0.0, bias="none", task_type="CAUSAL_LM")


def wrap(model, rank: int, alpha: float, targets: str = DEFAULT_TARGETS):
    """A new adapter on ``model`` (its own weights frozen); returns the PeftModel. The adapter
    starts as the identity (B = 0): the wrapped model computes exactly what the base does."""
    from peft import get_peft_model

    names = parse_targets(targets)
    if names != DEFAULT_TARGETS:  # peft refuses only when no name matches: a typo in one is lost
        modules = [n for n, _ in model.named_modules()]
        unknown = [t for t in names if not any(n == t or n.endswith("." + t) for n in modules)]
        if unknown:
            raise UsageError(f"LoRA targets {targets!r}: the model has no module named "
                             f"{', '.join(map(repr, unknown))}")
    try:
        with _quiet():
            return get_peft_model(model, lora_config(rank, alpha, targets))
    except ValueError as e:  # peft: a target module that the model does not have
        raise UsageError(f"LoRA targets {targets!r}: {' '.join(str(e).split())[:300]}") from None


def trainable_parameters(model) -> list:
    """What the optimizer holds: the parameters that require gradients (the adapters)."""
    return [p for p in model.parameters() if p.requires_grad]


def base_state(peft_model) -> dict:
    """The base weights inside a PeftModel, named as in the base checkpoint (for comparisons)."""
    return {k.replace("base_layer.", ""): v
            for k, v in peft_model.get_base_model().state_dict().items() if "lora_" not in k}


def load_trainable(path: str, rank: int, alpha: float, targets: str, *, device="cpu",
                   **load_kw):
    """The PeftModel to train from ``path``: a full model gets a new adapter; an adapter
    directory continues its own adapter (its base loaded from the base it names), which must
    have the rank, alpha and targets asked for (a usage error names the difference).
    ``load_kw`` go to ``load_model`` (``meta`` for a sharded load's ranks > 0)."""
    from tcli.models.load import disable_dropout, load_model, pretrained

    if not is_adapter_dir(path):
        model = load_model(path, device=device, train=True, **load_kw)
        return wrap(model, rank, alpha, targets)
    from peft import PeftModel

    base = load_model(adapter_base(path), device=device, train=True, **load_kw)
    want = _target_names(base, targets)
    with _quiet():
        pm = pretrained(PeftModel, base, path, path=path, what="LoRA adapter", is_trainable=True)
    cfg = pm.peft_config["default"]
    have = {n.split(".")[-1] for n, m in pm.get_base_model().named_modules()
            if hasattr(m, "lora_A")}
    if (cfg.r, float(cfg.lora_alpha), have) != (rank, float(alpha), want):
        raise UsageError(f"{path} holds a LoRA adapter of rank {cfg.r}, alpha {cfg.lora_alpha} on "
                         f"{','.join(sorted(have))}; the options ask for rank {rank}, alpha "
                         f"{alpha} on {','.join(sorted(want))}")
    if not load_kw.get("meta"):  # a meta base stays there until its shards are filled
        pm.to(device)
    pm.train()
    disable_dropout(pm)
    return pm


def _target_names(model, targets: str) -> set[str]:
    """The module names (last component) a new adapter with ``targets`` would wrap."""
    import torch

    t = parse_targets(targets)
    if t != DEFAULT_TARGETS:
        return set(t)
    head = model.get_output_embeddings()
    return {n.split(".")[-1] for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and m is not head}


def save_adapter(out_dir: str, peft_model, tokenizer, *, base: str, state: dict | None = None,
                 optimizer=None, gathered=None) -> str:
    """Write an adapter checkpoint atomically (never over user data, as full checkpoints):
    adapter files whose config names ``base`` (absolute), tokenizer, state, optimizer.
    ``gathered``: the stand-in of a sharded model (``parallel.gathered``) that writes in its
    place."""
    from tcli.models.checkpoint import save_pretrained_atomic

    for cfg in peft_model.peft_config.values():
        cfg.base_model_name_or_path = os.path.abspath(base)
    return save_pretrained_atomic(out_dir, gathered or peft_model, tokenizer, state=state,
                                  optimizer=optimizer)


def load_merged(path: str, *, device="cpu", dtype=None, train: bool = False, **load_kw):
    """Base + adapter of an adapter directory, merged into the base weights in memory: a plain
    transformers model (what sampling and eval run; no LoRA overhead per forward). Merged in
    float32, then cast to ``dtype``; ``load_kw`` go to the base's ``load_model``."""
    from peft import PeftModel

    from tcli.models.load import load_model, pretrained, torch_dtype

    base = load_model(adapter_base(path), device="cpu", train=train, **load_kw)
    with _quiet():
        pm = pretrained(PeftModel, base, path, path=path, what="LoRA adapter")
    model = pm.merge_and_unload()
    model.to(device=device, dtype=torch_dtype(dtype))
    if not train:
        model.requires_grad_(False)
    return model


def export_merged(adapter_dir: str, out_dir: str) -> str:
    """A full ordinary checkpoint (model.safetensors, config, tokenizer) with the adapter merged
    in: what vllm or any transformers user loads without peft."""
    from tcli.models.checkpoint import read_state, save_pretrained_atomic
    from tcli.models.load import load_tokenizer

    model = load_merged(adapter_dir)
    state = {**read_state(adapter_dir), "merged_from": os.path.abspath(adapter_dir)}
    return save_pretrained_atomic(out_dir, model, load_tokenizer(adapter_dir), state=state)
