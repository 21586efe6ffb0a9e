"""Reward shaping the advantages stage applies before the estimator (docs/design.md §4.15).

The records' ``reward`` stays the verifier's verdict; the estimator sees the shaped reward, and the
stage writes what it added (``overlong_penalty``) beside it.
"""

from __future__ import annotations

import numpy as np

from tcli.errors import DataError
from tcli.records import in_group


def sampling_cap(rec: dict) -> int:
    """The record's ``max_new_tokens`` (written by sample-tree): an integer >= its length."""
    v = rec.get("max_new_tokens")
    if v is None:
        raise DataError("is missing; overlong shaping needs the sampling cap of each response "
                        "(records of sample-tree carry it)", field="max_new_tokens")
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise DataError(f"must be an integer >= 1, got {v!r}", field="max_new_tokens")
    if len(rec.get("token_ids") or ()) > v:
        raise DataError(f"is {v}, but the response has {len(rec['token_ids'])} tokens",
                        field="max_new_tokens")
    return v


def overlong_penalty(records: list[dict], lens: np.ndarray, buffer: int,
                     factor: float) -> np.ndarray:
    """DAPO's soft overlong punishment of each response: 0 up to L_max - B tokens, then linear
    down to -factor at L_max: factor * min(0, (L_max - B - L) / B). All zeros when B = 0."""
    if buffer <= 0:
        return np.zeros(len(records))
    caps = np.array(in_group(sampling_cap, records), dtype=np.float64)
    return factor * np.minimum(0.0, (caps - buffer - lens) / buffer)
