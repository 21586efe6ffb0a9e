"""Typed access to record fields: every failure is a DataError naming the field."""

from __future__ import annotations

import math
from contextlib import contextmanager

import numpy as np

from tcli.errors import DataError


def require(rec: dict, field: str):
    try:
        return rec[field]
    except KeyError:
        raise DataError("missing required field", field=field) from None


_KIND_NAMES = {bool: "booleans", float: "floats", str: "strings", list: "nested lists",
               dict: "objects", type(None): "nulls"}


def token_array(rec: dict, field: str = "token_ids") -> np.ndarray:
    """A non-negative int64 array; rejects strings, floats, bools, nulls and nesting without a
    Python loop over tokens (the set of element types is collected in C)."""
    v = require(rec, field)
    if not isinstance(v, list):
        raise DataError(f"must be a list of integers, got {type(v).__name__}", field=field)
    if not v:
        return np.zeros(0, dtype=np.int64)
    kinds = set(map(type, v))
    if kinds != {int}:  # numpy integers (from in-process stages) are fine too; bool is not
        bad = sorted(_KIND_NAMES.get(k, k.__name__) for k in kinds
                     if k is not int and not issubclass(k, np.integer))
        if bad:
            raise DataError(f"must be a flat list of integers, got {', '.join(bad)}", field=field)
    try:
        arr = np.fromiter(v, dtype=np.int64, count=len(v))
    except OverflowError:
        raise DataError("token id out of range (must be below 2**63)", field=field) from None
    if arr.min() < 0:
        raise DataError(f"token ids must be non-negative, got {int(arr.min())}", field=field)
    return arr


def check_in_vocab(ids, vocab: int | None, field: str) -> None:
    """DataError naming ``field`` when a token id is outside a vocabulary of ``vocab`` ids (None:
    unknown): the model's embedding would fail on it (exit 1) or, read by another model, it
    would mean nothing."""
    if vocab is not None and len(ids) and int(np.max(ids)) >= vocab:
        raise DataError(f"token id {int(np.max(ids))} is outside the model's vocabulary (size "
                        f"{vocab})", field=field)


def float_array(rec: dict, field: str, length: int | None = None) -> np.ndarray:
    v = require(rec, field)
    if not isinstance(v, list):
        raise DataError(f"must be a list of numbers, got {type(v).__name__}", field=field)
    kinds = set(map(type, v))  # numpy would parse "0.5" and take true as 1.0
    bad = sorted(_KIND_NAMES.get(k, k.__name__) for k in kinds - {float, int}
                 if not issubclass(k, (np.floating, np.integer)))
    if bad:
        raise DataError(f"must be a flat list of numbers, got {', '.join(bad)}", field=field)
    try:
        arr = np.asarray(v, dtype=np.float64) if v else np.zeros(0)
    except (ValueError, TypeError):
        raise DataError("must be a flat list of numbers", field=field) from None
    except OverflowError:
        raise DataError("holds an integer too large for a float", field=field) from None
    if arr.ndim != 1:
        raise DataError("must be a flat list of numbers", field=field)
    if length is not None and len(arr) != length:
        raise DataError(f"has {len(arr)} entries, expected {length}", field=field)
    if not np.isfinite(arr).all():
        raise DataError("contains NaN or infinity", field=field)
    return arr


def as_float32(arr: np.ndarray, field: str) -> np.ndarray:
    """``arr`` in the float32 that training computes in; a value beyond its range (3.4e38) would
    be inf there, so it is bad data naming the field."""
    with np.errstate(over="ignore"):
        out = arr.astype(np.float32)
    if not np.isfinite(out).all():
        raise DataError("holds a value beyond the float32 range (3.4e38) training computes in; "
                        "rescale it", field=field)
    return out


def entropies(rec: dict, length: int) -> np.ndarray | None:
    """The optional per-token sampling entropies (``sample-tree --record-entropy``): None when the
    record has none; otherwise one finite, non-negative float per response token."""
    if rec.get("entropies") is None:
        return None
    arr = float_array(rec, "entropies", length)
    if len(arr) and arr.min() < 0:
        raise DataError(f"entropies must be >= 0, got {arr.min():.6g}", field="entropies")
    return arr


def loss_mask(rec: dict, length: int) -> np.ndarray | None:
    """The optional ``loss_mask`` (docs/design.md §3.6) as a bool array, True = a policy token;
    None when the record has none (every token is the policy's). One 0 or 1 per response token:
    booleans, other numbers or a wrong length are bad data naming the field."""
    v = rec.get("loss_mask")
    if v is None:
        return None
    if not isinstance(v, list):
        raise DataError(f"must be a list of 0/1, got {type(v).__name__}", field="loss_mask")
    if len(v) != length:
        raise DataError(f"has {len(v)} entries, expected {length} (one per token_ids entry)",
                        field="loss_mask")
    kinds = set(map(type, v))
    if kinds - {int} and any(k is not int and not issubclass(k, np.integer) for k in kinds):
        bad = sorted(_KIND_NAMES.get(k, k.__name__) for k in kinds
                     if k is not int and not issubclass(k, np.integer))
        raise DataError(f"must be a flat list of 0/1, got {', '.join(bad)}", field="loss_mask")
    bad = next((x for x in v if x != 0 and x != 1), None)
    if bad is not None:
        raise DataError(f"entries must be 0 (environment) or 1 (policy), got {bad}",
                        field="loss_mask")
    arr = np.fromiter(v, dtype=np.int64, count=len(v)) if v else np.zeros(0, dtype=np.int64)
    return arr.astype(bool)


def check_aligned(rec: dict, length: int, field: str = "logprobs") -> None:
    """An optional per-token field has one entry per response token. Checked wherever a group is
    read (build-tree, advantages), so a record cut or padded upstream fails at the stage that
    first sees it, not at train-step two files later. Only the length: train-step parses values."""
    v = rec.get(field)
    if v is None:
        return
    if not isinstance(v, list):
        raise DataError(f"must be a list of numbers, got {type(v).__name__}", field=field)
    if len(v) != length:
        raise DataError(f"has {len(v)} entries, expected {length} (one per token_ids entry)",
                        field=field)


# what build-tree and advantages compute from a group's rewards (docs/design.md §3.5): once the
# rewards change they describe other rewards, so verify drops them rather than let a later stage
# pair them with the new ones. ``branch`` (from the tokens alone) and ``critic_values`` (the
# critic's predictions from the tokens) stay true and are kept.
REWARD_DERIVED = ("values", "advantages", "estimator", "overlong_penalty", "returns")


def drop_reward_derived(rec: dict) -> list[str]:
    """Remove the REWARD_DERIVED fields from ``rec``; the names of those it held."""
    gone = [f for f in REWARD_DERIVED if f in rec]
    for f in gone:
        del rec[f]
    return gone


def reward(rec: dict) -> float:
    if "reward" not in rec:  # every stage that reads it runs after verify: say so
        raise DataError("is missing: run `tcli verify` first", field="reward")
    v = rec["reward"]
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise DataError(f"must be a number, got {type(v).__name__}", field="reward")
    try:
        f = float(v)
    except OverflowError:  # an integer literal beyond 1.8e308
        raise DataError(f"an integer of {v.bit_length()} bits is beyond the float range",
                        field="reward") from None
    if not math.isfinite(f):
        raise DataError(f"must be finite, got {v}", field="reward")
    return f


def int_list(rec: dict, field: str) -> list[int]:
    v = require(rec, field)
    if not isinstance(v, list) or not all(isinstance(x, int) and not isinstance(x, bool) for x in v):
        raise DataError("must be a list of integers", field=field)
    return v


@contextmanager
def at_record(index: int):
    """Tag a DataError raised inside with the record's index in its group (mapped to a line later)."""
    try:
        yield
    except DataError as e:
        if getattr(e, "index", None) is None:
            e.index = index
        raise


def in_group(fn, recs, *args, **kwargs):
    """Run ``fn(rec)`` on every record of a group, tagging errors with the record's index."""
    out = []
    for i, r in enumerate(recs):
        with at_record(i):
            out.append(fn(r, *args, **kwargs))
    return out
