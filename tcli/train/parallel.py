"""FSDP2 for train-step and loop: shard a transformers causal LM across the ranks of a torchrun job
(``torch.distributed.fsdp.fully_shard`` per decoder layer, then the root), and turn its sharded
state back into the ordinary files a checkpoint holds.

Parameters, gradients and AdamW state are sharded on dim 0 over one flat mesh of all ranks; each
decoder layer is one all-gather group (gathered for its forward and again for its backward), the
root group holds the embeddings, the final norm and the (tied) LM head, which stay gathered from
forward to backward (FSDP2's default for the root: the chunked LM head of ``logprobs`` uses the
head's weight right after the forward).

Checkpoints stay a normal ``save_pretrained`` directory: the full state dict is gathered to rank 0
on CPU (:func:`full_model_state`). The optimizer state is written in ``torch.optim``'s own
index-keyed layout, the same as an unsharded run's ``optimizer.pt``, so a checkpoint written with
FSDP resumes with DDP or one process and the other way round (:func:`full_optimizer_state`,
:func:`load_full_optimizer_state`).

Every FSDP forward and backward is a collective: all ranks must run the same number of them per
optimizer step (:func:`micro_batches_to_match`).
"""

from __future__ import annotations

def decoder_layers(model) -> list:
    """The modules to shard one by one: instances of the model's ``_no_split_modules`` classes
    (transformers' own list of blocks that must stay whole: the decoder layers)."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise RuntimeError(f"{type(model).__name__}: no decoder layers to shard "
                           f"(_no_split_modules = {sorted(names)})")
    return layers


def shard_model(model, device):
    """``fully_shard`` every decoder layer, then the root, over all ranks of the default process
    group (gloo on CPU, nccl on GPU). The model is changed in place and returned; its parameters
    become DTensors holding this rank's rows."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def shard_from_rank0(model, device, *, root=None):
    """Shard ``model`` and fill every rank's shards from rank 0's weights, so that only rank 0
    ever holds the whole model in host memory (as accelerate's and torchtitan's FSDP2 loading).

    Rank 0 passes the loaded model; the others the same architecture on the meta device
    (``load_model(meta=True)``). After ``fully_shard`` the others allocate their shards only
    (``to_empty``), then rank 0's full state dict is broadcast tensor by tensor, each rank
    keeping its rows (``set_model_state_dict(full_state_dict, broadcast_from_rank0)``); buffers
    outside the state dict (rotary ``inv_freq``) are broadcast too. ``to_empty`` keeps a tied
    LM head tied (loading with ``assign`` would not). ``root``: the module whose state dict
    names the weights (the PeftModel around a LoRA policy); ``model`` is what gets sharded.
    Every rank must call it; returns ``model``."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    root = model if root is None else root
    main = dist.get_rank() == 0
    full = root.state_dict() if main else {}  # holds rank 0's full tensors while it shards
    shard_model(model, device)
    if not main:
        root.to_empty(device=device)
    set_model_state_dict(root, full, options=_options(full_state_dict=True,
                                                      broadcast_from_rank0=True))
    del full
    for buf in root.buffers():
        dist.broadcast(buf, src=0)
    return model


def local_numel(model) -> int:
    """Parameter elements held by this rank (its shards; everything for an unsharded model)."""
    from torch.distributed.tensor import DTensor

    return sum((p.to_local() if isinstance(p, DTensor) else p).numel()
               for p in model.parameters())


def set_gradient_sync(model, sync: bool) -> None:
    """FSDP2's ``no_sync``: skip (False) or do (True) the reduce-scatter of gradients in the
    coming backward, so that micro-batches accumulate locally and only the last one reduces."""
    model.set_requires_gradient_sync(sync)


def micro_batches_to_match(n_local: int) -> int:
    """How many micro-batches this rank must run (the largest count of any rank): a rank with
    fewer runs empty forward/backward passes, or the others would wait in an all-gather."""
    import torch
    import torch.distributed as dist

    t = torch.tensor([n_local], dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def clip_grad_norm(params, max_norm: float) -> float:
    """``clip_grad_norm_`` over sharded or plain gradients; the global norm as a float (a
    DTensor norm is reduced over the ranks first)."""
    import torch
    from torch.distributed.tensor import DTensor

    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    if isinstance(norm, DTensor):
        norm = norm.full_tensor()
    return float(norm)


# ----------------------------------------------------------------------------- state to files

def _options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(**kw)


def full_model_state(model, *, trainable_only: bool = False) -> dict:
    """The whole model's state dict on rank 0, on CPU ({} on the other ranks); every rank must
    call it (the parameters are all-gathered one by one). ``trainable_only``: only parameters
    that require gradients (a LoRA adapter), the frozen base is not gathered at all."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model, options=_options(
        full_state_dict=True, cpu_offload=True, ignore_frozen_params=trainable_only))


def full_optimizer_state(model, optimizer) -> dict:
    """The optimizer's whole state on rank 0, on CPU, in ``optimizer.state_dict()``'s layout
    (parameters numbered 0..N-1 in group order) so that it loads into an unsharded optimizer as
    is; {} on the other ranks. Every rank must call it."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    osd = get_optimizer_state_dict(model, optimizer,
                                   options=_options(full_state_dict=True, cpu_offload=True))
    return _fqn_to_index(osd) if osd else {}


def load_full_optimizer_state(model, optimizer, state: dict | None) -> None:
    """Load an index-keyed optimizer state (``optimizer.pt``, read on rank 0 only: the others pass
    None) into a sharded optimizer; rank 0 broadcasts each tensor and every rank keeps its rows.
    Every rank must call it."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    names = _param_names(model, optimizer)
    osd, error = {}, None
    if dist.get_rank() == 0:
        try:
            osd = _index_to_fqn(state, names)
        except (KeyError, ValueError, TypeError) as e:
            error = e
    box = [None if error is None else f"{type(error).__name__}: {error}"]
    dist.broadcast_object_list(box, src=0)  # a state that does not fit fails on every rank
    if box[0] is not None:
        raise error if error is not None else ValueError(box[0])
    set_optimizer_state_dict(model, optimizer, osd,
                             options=_options(full_state_dict=True, broadcast_from_rank0=True))


def _param_names(model, optimizer) -> list[list[str]]:
    """The optimizer's parameters by name, group by group (what the FQN-keyed layout uses)."""
    by_id = {id(p): n for n, p in model.named_parameters()}
    return [[by_id[id(p)] for p in g["params"]] for g in optimizer.param_groups]


def _fqn_to_index(osd: dict) -> dict:
    """FQN-keyed (torch.distributed.checkpoint) optimizer state -> ``Optimizer.state_dict()``."""
    index, groups = {}, []
    for g in osd["param_groups"]:
        ids = []
        for name in g["params"]:
            index[name] = len(index)
            ids.append(index[name])
        groups.append({**g, "params": ids})
    state = {index[name]: s for name, s in osd["state"].items()}
    return {"state": state, "param_groups": groups}


def _index_to_fqn(sd: dict, names: list[list[str]]) -> dict:
    """``Optimizer.state_dict()`` -> FQN-keyed; KeyError/ValueError when it does not fit."""
    groups = sd["param_groups"]
    if len(groups) != len(names) or any(len(g["params"]) != len(n) for g, n in zip(groups, names)):
        raise ValueError(f"the saved state has groups of {[len(g['params']) for g in groups]} "
                         f"parameters, the model {[len(n) for n in names]}")
    to_name = {i: n for g, ns in zip(groups, names) for i, n in zip(g["params"], ns)}
    return {"state": {to_name[int(i)]: s for i, s in sd["state"].items()},
            "param_groups": [{**g, "params": ns} for g, ns in zip(groups, names)]}


class _GatheredModel:
    """What ``save_pretrained_atomic`` writes for a sharded model: its own ``save_pretrained``
    (config, generation config, safetensors layout) fed the state dict gathered on rank 0."""

    def __init__(self, model, state_dict: dict):
        # gathered tensors are copies, so transformers cannot see that the LM head is tied to
        # the embeddings: keep the names the model itself lists once (as save_pretrained does)
        keep = {n for n, _ in model.named_parameters()} | {n for n, _ in model.named_buffers()}
        self.model = model
        self.state_dict = {k: v for k, v in state_dict.items() if k in keep}

    def save_pretrained(self, path: str, **kw) -> None:
        self.model.save_pretrained(path, state_dict=self.state_dict, **kw)


class _GatheredOptimizer:
    def __init__(self, state: dict):
        self._state = state

    def state_dict(self) -> dict:
        return self._state


def gathered(model, optimizer, *, trainable_only: bool = False):
    """Stand-ins for the model and optimizer that write their gathered state: what rank 0 hands
    to ``save_pretrained_atomic`` (or ``lora.save_adapter``); (None, None) on the other ranks.
    Every rank must call it. ``model`` is the module the optimizer's parameters are named from
    (the PeftModel for LoRA)."""
    import torch.distributed as dist

    weights = full_model_state(model, trainable_only=trainable_only)
    opt = full_optimizer_state(model, optimizer) if optimizer is not None else None
    if dist.get_rank() != 0:
        return None, None
    return _GatheredModel(model, weights), (_GatheredOptimizer(opt) if opt is not None else None)


def save_sharded_checkpoint(out_dir: str, model, tokenizer, optimizer, *,
                            state: dict | None) -> None:
    """Gather weights and optimizer state to rank 0 and write one ordinary checkpoint directory
    there (atomically, as unsharded runs do). Every rank must call it; only rank 0 writes."""
    from tcli.models.checkpoint import save_pretrained_atomic

    m, opt = gathered(model, optimizer)
    if m is not None:
        save_pretrained_atomic(out_dir, m, tokenizer, state=state, optimizer=opt)
