"""A preallocated ("slab") KV cache for the hf engine's sampling loop.

Why: transformers' ``DynamicCache`` appends each token with ``torch.cat``, which copies the whole
cache of every layer per generated token (quadratic in the response length; 58 % of the time of a
tree-sampling run on a tiny model). ``StaticCache`` avoids the copy but attends over its whole
fixed length every step and has no cheap way to fork rows. Here each layer keeps its keys/values
in a buffer ``[rows, heads, capacity, dim]`` sized for the segment about to be generated; a new
token is written in place and attention sees a view of the filled columns ``[start, end)`` only,
so shapes, masks and values are exactly those of the dynamic cache. Forking a node to its children
gathers the parent's filled columns once (``index_select`` straight into the children's buffer);
dropping finished rows does the same; trimming left padding only moves ``start``.

Imports torch and transformers: import this module only where an engine is created.
"""

from __future__ import annotations

import copy

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer


class SlabLayer(DynamicLayer):
    """One layer's cache in a preallocated buffer; ``keys``/``values`` are views of it."""

    def __init__(self, room: int = 0):
        super().__init__()
        self.room = int(room)        # columns to keep free for the tokens still to come
        self.buf_k = self.buf_v = None
        self.start = self.end = 0

    def lazy_initialization(self, key_states, value_states) -> None:
        self.device = key_states.device
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        """Write the new columns in place (growing the buffer only if it is too small)."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n = key_states.shape[-2]
        if self.buf_k is None:
            self.buf_k = key_states.new_empty(key_states.shape[:2] + (n + self.room,)
                                              + key_states.shape[3:])
            self.buf_v = value_states.new_empty(self.buf_k.shape[:3] + value_states.shape[3:])
        elif self.end + n > self.buf_k.shape[-2]:  # more tokens than reserved: grow geometrically
            self._move(None, self.end - self.start + n + max(self.room, self.end - self.start))
        self.buf_k[:, :, self.end:self.end + n].copy_(key_states)
        self.buf_v[:, :, self.end:self.end + n].copy_(value_states)
        self.end += n
        self._views()
        return self.keys, self.values

    def _views(self) -> None:
        self.keys = self.buf_k[:, :, self.start:self.end]
        self.values = self.buf_v[:, :, self.start:self.end]

    def _move(self, rows, capacity: int) -> None:
        """New buffers of ``capacity`` columns holding the filled columns (of ``rows`` only)."""
        filled = self.end - self.start
        n = self.buf_k.shape[0] if rows is None else len(rows)
        k = self.buf_k.new_empty((n, self.buf_k.shape[1], capacity, self.buf_k.shape[3]))
        v = self.buf_v.new_empty((n, self.buf_v.shape[1], capacity, self.buf_v.shape[3]))
        for src, dst in ((self.keys, k), (self.values, v)):
            if rows is None:
                dst[:, :, :filled].copy_(src)
            else:
                torch.index_select(src, 0, rows, out=dst[:, :, :filled])
        self.buf_k, self.buf_v, self.start, self.end = k, v, 0, filled
        self._views()

    def fork(self, rows, room: int) -> "SlabLayer":
        """A new layer with ``rows`` of this one and ``room`` free columns; this one is unchanged."""
        child = copy.copy(self)
        child.room = int(room)
        if self.buf_k is not None:
            child._move(rows, self.end - self.start + child.room)
        return child

    def batch_select_indices(self, indices) -> None:
        """Keep only ``indices`` rows (finished rows leave), with the same free columns."""
        if self.buf_k is not None:
            self._move(indices, self.buf_k.shape[-2] - self.start)

    def trim_left(self, k: int) -> None:
        """Forget the first ``k`` filled columns (left padding no row needs any more)."""
        self.start += k
        self._views()


def new_cache(config, kind: str, room: int = 0):
    """An empty cache for ``config``: ``static`` = slab layers (when every layer is a plain
    attention layer), ``dynamic`` = transformers' DynamicCache (the old path, kept to compare)."""
    try:
        cache = DynamicCache(config=config)
    except TypeError:  # older transformers
        cache = DynamicCache()
    if kind == "static" and cache.layers and all(type(x) is DynamicLayer for x in cache.layers):
        cache.layers = [SlabLayer(room) for _ in cache.layers]
    return cache


def fork_cache(cache, rows, room: int):
    """The cache of the children ``rows`` (a new object; the parent's tensors stay untouched)."""
    child = copy.copy(cache)
    if all(isinstance(x, SlabLayer) for x in cache.layers):
        child.layers = [x.fork(rows, room) for x in cache.layers]
    else:
        child.layers = [copy.copy(x) for x in cache.layers]
        child.batch_select_indices(rows)  # new tensors per layer
    return child


def trim_left(cache, k: int) -> bool:
    """Drop the first ``k`` columns of every layer; False when a layer cannot (sliding windows)."""
    if k == 0:
        return True
    if all(isinstance(x, SlabLayer) for x in cache.layers):
        for layer in cache.layers:
            layer.trim_left(k)
        return True
    if not all(type(x) is DynamicLayer for x in cache.layers):
        return False
    for layer in cache.layers:
        if getattr(layer, "keys", None) is not None and layer.keys.numel():
            layer.keys = layer.keys[:, :, k:, :]
            layer.values = layer.values[:, :, k:, :]
    return True
