"""LoRA through peft, the training side: wrap a policy so that only low-rank adapters train, or
load an adapter directory to go on training it.

The adapter directory format (recognising, loading merged, writing, exporting) is
``tcli.models.adapter``'s; its names are re-exported here for the trainer's callers. The model
the trainer runs is the transformers model with peft's LoRA layers inside it
(``PeftModel.get_base_model()``), so the log-prob code sees a normal causal LM; the PeftModel
wrapper is kept only for saving and merging. torch/peft are imported inside the functions.
"""

from __future__ import annotations

from tcli.errors import UsageError
from tcli.models.adapter import (ADAPTER_CONFIG, adapter_base, export_merged,  # noqa: F401
                                 is_adapter_dir, load_merged, save_adapter)
from tcli.models.load import disable_dropout, load_model, pretrained
from tcli.models.quiet import quiet_peft

DEFAULT_TARGETS = "all-linear"


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
        refuse_tied(model, names, targets)
    try:
        with quiet_peft():
            return get_peft_model(model, lora_config(rank, alpha, targets))
    except ValueError as e:  # peft: a target module that the model does not have
        raise UsageError(f"LoRA targets {targets!r}: {' '.join(str(e).split())[:300]}") from None


def refuse_tied(model, names, targets: str) -> None:
    """An adapter on the LM head or the input embeddings of a model that ties them trains one
    model, and merging it (sampling, eval, merge-lora) adds its update to the shared matrix, so
    the other side changes too: the merged model is not the trained one. Refused (exit 2)."""
    head, emb = model.get_output_embeddings(), model.get_input_embeddings()
    if head is None or emb is None or head.weight is not emb.weight:
        return
    tied = [n for n, m in model.named_modules() if n and (m is head or m is emb)]
    hit = [t for t in names if any(n == t or n.endswith("." + t) for n in tied)]
    if hit:
        raise UsageError(f"LoRA targets {targets!r}: {', '.join(map(repr, hit))} shares its "
                         "weights with the tied LM head and input embeddings; merged for "
                         "sampling, its update would change both: leave it out")


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
    if not is_adapter_dir(path):
        model = load_model(path, device=device, train=True, **load_kw)
        return wrap(model, rank, alpha, targets)
    from peft import PeftModel

    base = load_model(adapter_base(path), device=device, train=True, **load_kw)
    want = _target_names(base, targets)
    refuse_tied(base, sorted(want), targets)
    with quiet_peft():
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
