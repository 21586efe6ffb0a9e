"""Data parallelism under ``torchrun``: process group, rank-0 broadcast, deterministic shards.

Every rank holds the same sample list and takes a token-balanced shard of each mini-batch
(:func:`shard_balanced`); nothing here runs when WORLD_SIZE is 1.
"""

from __future__ import annotations

import contextlib
import gc
import os
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence, TypeVar

from tcli.errors import DataError, TcliError, UsageError

T = TypeVar("T")


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_device(pref: str = "auto", local_rank: int = 0):
    import torch

    from tcli.models.load import check_cuda_device

    if pref == "auto":
        pref = "cuda" if torch.cuda.is_available() else "cpu"
    check_cuda_device(pref)
    if pref == "cuda":
        pref = f"cuda:{local_rank}"
    return torch.device(pref)


def init_distributed(device_pref: str = "auto") -> DistInfo:
    """Join the torchrun process group when WORLD_SIZE > 1 (gloo on CPU, nccl on GPU)."""
    ws = int(os.environ.get("WORLD_SIZE", "1"))
    if ws <= 1:
        return DistInfo()
    import torch
    import torch.distributed as dist

    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_pref, local)
    # torch.distributed.nn binds the default group into its function defaults when first
    # imported (DDP imports it); imported after init, that keeps the group and its gloo threads
    # alive past destroy_process_group, and they can abort the interpreter at exit
    import torch.distributed.nn  # noqa: F401

    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return DistInfo(dist.get_rank(), dist.get_world_size(), local)


@contextlib.contextmanager
def distributed(device_pref: str = "auto") -> Iterator[DistInfo]:
    """:func:`init_distributed` for the duration of a command; the group is torn down after."""
    info = init_distributed(device_pref)
    ok = False
    try:
        yield info
        ok = True
    finally:
        if info.enabled:
            import torch.distributed as dist

            if dist.is_initialized():
                if ok:  # no rank tears gloo down while a peer still talks to it (abort at exit)
                    # and what the command built around the group (DDP holds a reference to
                    # it) is collected before the teardown rather than after it
                    gc.collect()
                    dist.barrier()
                dist.destroy_process_group()


def broadcast_object(obj, info: DistInfo):
    """Rank 0's object on every rank (identity when not distributed)."""
    if not info.enabled:
        return obj
    import torch.distributed as dist

    box = [obj if info.is_main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def run_on_main(fn: Callable[[], T], info: DistInfo) -> T:
    """``fn()`` on rank 0 only; every rank gets its result, or raises its error (rank 0 the
    original exception, the others an equivalent TcliError), so all ranks fail together."""
    if not info.enabled:
        return fn()
    payload, error = None, None
    if info.is_main:
        try:
            payload = ("ok", fn())
        except Exception as e:  # noqa: BLE001 - shipped to the other ranks, re-raised below
            error = e
            payload = ("error", _error_payload(e))
    payload = broadcast_object(payload, info)
    if error is not None:
        raise agreed(error)
    if payload[0] == "error":
        raise agreed(_error_from_payload(payload[1]))
    return payload[1]


def gather_or_raise(fn: Callable[[], T], info: DistInfo) -> list[T]:
    """``fn()`` on every rank, every rank's result on every rank (in rank order); when any rank
    failed, all ranks raise the lowest failing rank's error (that rank its own exception) instead
    of leaving the others waiting in the next collective."""
    if not info.enabled:
        return [fn()]
    import torch.distributed as dist

    error = None
    try:
        mine = ("ok", fn())
    except Exception as e:  # noqa: BLE001 - shipped to the other ranks, re-raised below
        error, mine = e, ("error", _error_payload(e))
    parts: list = [None] * info.world_size
    dist.all_gather_object(parts, mine)
    first = next((r for r, p in enumerate(parts) if p[0] == "error"), None)
    if first is not None:
        raise agreed(error if first == info.rank else _error_from_payload(parts[first][1]))
    return [p[1] for p in parts]


def agreed(e: Exception) -> Exception:
    """Mark an error that every rank raises together: rank 0 reports it, the others exit with its
    code without printing it again (``tcli loop``)."""
    e.tcli_agreed = True
    return e


def block_share(n: int, info: DistInfo) -> range:
    """This rank's contiguous block of ``n`` items (sizes differ by at most one); the blocks of
    ranks 0, 1, ... concatenated are 0..n-1 in order, so gathered results keep the input order."""
    return range(info.rank * n // info.world_size, (info.rank + 1) * n // info.world_size)


def _error_payload(e: Exception) -> tuple:
    if isinstance(e, DataError):
        return ("data", e.message, e.file, e.line, e.field)
    if isinstance(e, TcliError):
        return (type(e).__name__, e.one_line(), None, None, None)
    return ("runtime", f"{type(e).__name__}: {e}", None, None, None)


def _error_from_payload(p: tuple) -> TcliError:
    kind, msg, file, line, fld = p
    if kind == "data":
        return DataError(msg, file=file, line=line, field=fld)
    if kind == "UsageError":
        return UsageError(msg)
    return TcliError(msg)


def shard_balanced(lengths: Sequence[int], world_size: int, rank: int) -> list[int]:
    """Indices for ``rank``: longest first to the rank with the fewest tokens (ties: lower rank).
    Every rank computes the same assignment, so no communication is needed."""
    load = [0] * world_size
    mine = []
    for i in sorted(range(len(lengths)), key=lambda i: (-int(lengths[i]), i)):
        r = min(range(world_size), key=lambda k: (load[k], k))
        load[r] += int(lengths[i])
        if r == rank:
            mine.append(i)
    return sorted(mine)
