"""What ``tcli loop`` needs under ``torchrun`` besides the trainer's own DDP/FSDP: the weights each
rank samples from, and folding the ranks' per-group results back into the 1-process order.

Every rank samples its block of the step's prompts, so every rank needs the whole policy for its
own forwards. Under DDP the trainer's module is whole on every rank and is shared with the engine
(as in one process). Under FSDP2 the trainer's parameters are shards and each forward is an
all-gather that every rank must join in step; ranks generating different prompts would deadlock.
:class:`SamplingWeights` then keeps an unsharded copy on every rank, refreshed after each update
by gathering one parameter at a time (the weight sync of verl's FSDP -> rollout engine, here into
a plain transformers module): costs one full copy of the weights per rank, 4 bytes per parameter
in float32 or 2 with ``[sample] dtype = "bfloat16"`` (LoRA: only the adapter is gathered each
step, the frozen base is loaded once).
"""

from __future__ import annotations

from dataclasses import fields


class SamplingWeights:
    """The engine's view of the policy on one rank: ``model``, ``tokenizer``, ``policy_version``
    (what :class:`tcli.engines.hf.HFEngine` reads from a trainer)."""

    def __init__(self, trainer, model_dir: str, dtype: str | None = None):
        """``dtype``: of the unsharded copy (None: float32, the trainer's own weights' dtype)."""
        from tcli.models.load import load_tokenizer

        self.trainer = trainer
        self.tokenizer = trainer.tokenizer or load_tokenizer(model_dir, required=True)
        self.model = (_unsharded_like(trainer, model_dir, dtype) if trainer.sharded
                      else trainer.model)
        self.policy_version = int(trainer.policy_version)
        if self.model is not trainer.model:
            self.refresh(everything=True)

    def refresh(self, everything: bool = False) -> None:
        """After an update: copy the trainer's new weights (gathered shards under FSDP; every rank
        calls this, the parameters are all-gathered in the same order everywhere). Only trained
        parameters change (LoRA: the adapter); ``everything``: the frozen ones and the buffers
        too (the first fill of the copy)."""
        self.policy_version = int(self.trainer.policy_version)
        if self.model is self.trainer.model:
            return
        import torch
        from torch.distributed.tensor import DTensor

        own = dict(self.model.named_parameters())
        theirs = dict(self.trainer.model.named_parameters())
        if everything and own.keys() != theirs.keys():  # never sample from unfilled memory
            raise RuntimeError(f"sampling copy and trainer differ in parameters: "
                               f"{sorted(own.keys() ^ theirs.keys())[:4]}")
        with torch.no_grad():
            for name, p in theirs.items():
                if everything or p.requires_grad:
                    full = p.full_tensor() if isinstance(p, DTensor) else p
                    own[name].copy_(full.detach())  # casts to the copy's dtype
            if everything:
                bufs = dict(self.model.named_buffers())
                for name, b in self.trainer.model.named_buffers():
                    bufs[name].copy_(b)


def _unsharded_like(trainer, model_dir: str, dtype: str | None):
    """A plain module with the trainer's structure (LoRA layers included) and parameter names,
    for sampling only (eval mode, no gradients). It is read from the checkpoint like the
    1-process trainer's module, not allocated afresh: CPU matmuls round differently for
    differently aligned weights (safetensors' mmap slices sit 24 bytes past a 64-byte boundary,
    a new tensor on one), and the copy must sample what one process samples, bit for bit."""
    from tcli.models.load import load_model, torch_dtype
    from tcli.train import lora

    o = trainer.opts
    if trainer.peft is not None:
        model = lora.load_trainable(model_dir, o.lora_rank, o.lora_alpha, o.lora_targets,
                                    device=trainer.device).get_base_model()
    else:
        model = load_model(model_dir, device=trainer.device, train=False)
    if dtype is not None:
        model.to(torch_dtype(dtype))
    model.config.use_cache = trainer.model.config.use_cache  # as on the trainer's module
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def fold_stats(parts: list):
    """AdvantageStats of single groups summed in order: the same floats as one accumulator that
    saw the groups one after another (as the 1-process loop does)."""
    from tcli.stages.advantages import AdvantageStats

    total = AdvantageStats()
    for s in parts:
        for f in fields(total):
            if f.name != "branch":
                setattr(total, f.name, getattr(total, f.name) + getattr(s, f.name))
    return total
