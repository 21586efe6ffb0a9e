"""Counter-based random streams of the ``hf`` engine.

The uniform number for token ``t`` of a node is a hash of (seed, prompt token ids, node path, t):
the same prompt with the same seed gives the same samples whatever else is in the batch or how
the work is split. A prompt's key is ``prompt_key``, child c of a node with key k has
``child_key(k, c)``, and token t of a node uses ``uniforms(key, t)``.
"""

from __future__ import annotations

import hashlib
from typing import Sequence

import numpy as np

_MASK64 = (1 << 64) - 1


def _splitmix_int(x: int) -> int:
    """splitmix64 finaliser on a Python int (used for per-node keys, not per token)."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def _splitmix_np(x: np.ndarray) -> np.ndarray:
    """The same finaliser vectorised over uint64 arrays (wrap-around multiplication)."""
    with np.errstate(over="ignore"):
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def prompt_key(seed: int, token_ids: Sequence[int]) -> int:
    """The random-stream key of a prompt: a hash of the seed and the prompt's token ids."""
    h = hashlib.blake2b(digest_size=8)
    h.update(int(seed).to_bytes(16, "little", signed=True))
    h.update(np.asarray(token_ids, dtype=np.int64).tobytes())
    return int.from_bytes(h.digest(), "little")


def child_key(parent: int, child: int) -> int:
    return _splitmix_int(parent ^ _splitmix_int(child + 1))


def uniforms(keys: np.ndarray, step: int) -> np.ndarray:
    """One U[0,1) number per key for token position ``step`` (53-bit resolution)."""
    z = _splitmix_np(keys ^ np.uint64(_splitmix_int(step)))
    return (z >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def uniforms_at(keys: np.ndarray, steps: Sequence[int]) -> np.ndarray:
    """``uniforms`` with a position per key: row i gets ``uniforms(keys[i:i+1], steps[i])``
    (rows of a multi-turn batch stand at different positions)."""
    mixed = _splitmix_np(np.asarray(steps, dtype=np.int64).astype(np.uint64))  # == _splitmix_int
    z = _splitmix_np(keys ^ mixed)
    return (z >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))
