"""The hf engine's graphed decode step on CUDA (docs/design.md §5.7).

Why: one decode token of a small model is a few hundred kernel launches driven from Python through
transformers' modeling code; on a GPU the launches, not the arithmetic, set the speed. Here the
one-token forward is captured once per padded batch size (``BUCKETS``) as a CUDA graph over static
buffers and replayed for every token:

- ``GraphPool`` holds, for every layer, one key and one value buffer ``[rows, kv_heads, capacity,
  head_dim]``, the input ids, position ids, an additive attention mask ``[rows, 1, 1, capacity]``
  and the write column (a one-element device tensor, so a replay needs no host value).
- Rows decoded in lock-step (``Rows``, engines/rows.py) are loaded into the first rows of the
  pool when they are forked; a step writes the token ids, replays the graph of the smallest bucket
  that holds them and reads the logits. Rows beyond the live ones are padding: they compute
  finite garbage that is never read. Finished rows leave by a gather into the first rows, and the
  bucket shrinks with them.
- Attention runs over the whole capacity with the pad columns masked, so the values equal the
  eager path's up to float summation order.

The same pool also runs without capture (``capture=False``): an eager, padded step, which is how
the tests check the buffers, the padding and the masks on a CPU.

Imports torch and transformers: import this module only where an engine is created.
"""

from __future__ import annotations

from typing import Optional

import torch

from transformers.cache_utils import DynamicLayer

from tcli.engines.kv import SlabLayer, new_cache
from tcli.engines.sampling import GRAPH_MODES
from tcli.errors import UsageError

BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)   # padded batch sizes with a graph each
MIN_CAPACITY = 256       # columns of the pool at least; grown to the next power of two on demand
POOL_MEMORY_SHARE = 0.3  # of the free GPU memory the pool may take (rows are halved until it fits)
STOP_EVERY = 8           # tokens decoded between two host checks on the graphed path


def graphs_enabled(mode: str, device: torch.device) -> bool:
    """``--cuda-graphs``: auto = on for CUDA, off otherwise; on without CUDA is a usage error."""
    if mode not in GRAPH_MODES:
        raise UsageError(f"--cuda-graphs must be one of {', '.join(GRAPH_MODES)}, got {mode!r}")
    if mode == "off":
        return False
    if device.type == "cuda":
        return True
    if mode == "on":
        raise UsageError(f"--cuda-graphs on needs a CUDA device, got {device}")
    return False


def bucket_for(n: int, buckets=BUCKETS) -> Optional[int]:
    """The smallest bucket that holds ``n`` rows, or None when none does."""
    return next((b for b in buckets if b >= n), None)


def kv_bytes_per_token(config, dtype: torch.dtype) -> int:
    """Bytes of keys and values one cached token takes over all layers."""
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return 2 * config.num_hidden_layers * heads * dim * torch.finfo(dtype).bits // 8


def auto_batch_tokens(free_bytes: int, per_token: int, *, share: float = 0.25,
                      lo: int = 65536, hi: int = 1 << 22) -> int:
    """``--batch-tokens`` on CUDA by default: a ``share`` of the free memory in cached tokens."""
    return int(min(hi, max(lo, free_bytes * share // max(1, per_token))))


def pool_rows(free_bytes: int, per_token: int, capacity: int, most: int = BUCKETS[-1]) -> int:
    """Rows of a pool of ``capacity`` columns that fit ``POOL_MEMORY_SHARE`` of the free memory."""
    rows = most
    while rows > 1 and rows * capacity * per_token > free_bytes * POOL_MEMORY_SHARE:
        rows //= 2
    return rows


def capacity_for(columns: int) -> int:
    return max(MIN_CAPACITY, 1 << (int(columns) - 1).bit_length())


class PoolLayer(SlabLayer):
    """One layer of the pool: ``update`` writes the new column at the pool's write column (a
    device tensor) and returns the whole buffer of the rows in the forward."""

    def __init__(self, pool: "GraphPool", k: torch.Tensor, v: torch.Tensor):
        super().__init__(0)
        self.pool, self.buf_k, self.buf_v = pool, k, v
        self.is_initialized, self.device = True, k.device

    def lazy_initialization(self, key_states, value_states) -> None:  # buffers exist already
        pass

    def update(self, key_states, value_states, *args, **kwargs):
        b = key_states.shape[0]
        self.buf_k[:b].index_copy_(2, self.pool.col, key_states)
        self.buf_v[:b].index_copy_(2, self.pool.col, value_states)
        return self.buf_k[:b], self.buf_v[:b]

    def get_seq_length(self, *args, **kwargs) -> int:
        return self.pool.end

    def trim_left(self, k: int) -> None:
        """Nothing moves: columns no row needs are masked already."""


class PoolCache:
    """The cache of the one ``Rows`` that lives in the pool (the engine's hooks test for it)."""

    def __init__(self, pool: "GraphPool"):
        self.pool = pool
        self.layers = pool.cache.layers   # kv.trim_left sees slab-like layers

    def select(self, idx: torch.Tensor, width: int):
        return self.pool.select(self, idx, width)

    def step(self, tok: torch.Tensor) -> torch.Tensor:
        return self.pool.step(self, tok)

    def detach(self, width: int):
        return self.pool.detach(self, width)

    def rewind(self, drop: torch.Tensor, pos: torch.Tensor) -> None:
        self.pool.rewind(self, drop, pos)


class GraphPool:
    """Static buffers for up to ``rows`` rows of ``capacity`` columns and one graph per bucket."""

    def __init__(self, engine, rows: int, capacity: int, *, capture: bool):
        model, dev = engine.model, engine.device
        cfg = model.config
        dtype = next(model.parameters()).dtype
        heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.engine, self.rows, self.capacity = engine, int(rows), int(capacity)
        self.buckets = tuple(b for b in BUCKETS if b <= self.rows)
        self.neg = torch.finfo(dtype).min
        self.cache = new_cache(cfg, "static")
        shape = (self.rows, heads, self.capacity, dim)
        self.cache.layers = [PoolLayer(self, torch.zeros(shape, dtype=dtype, device=dev),
                                       torch.zeros(shape, dtype=dtype, device=dev))
                             for _ in self.cache.layers]
        self.ids = torch.zeros((self.rows, 1), dtype=torch.long, device=dev)
        self.pos = torch.zeros((self.rows, 1), dtype=torch.long, device=dev)
        self.amask = torch.full((self.rows, 1, 1, self.capacity), self.neg, dtype=dtype, device=dev)
        self.col = torch.zeros(1, dtype=torch.long, device=dev)
        self.end = 0          # the write column, as the host counts it
        self.n = 0            # live rows
        self.owner: Optional[PoolCache] = None
        self.graphs: dict[int, tuple] = {}
        if capture:
            self._capture_all()

    # ------------------------------------------------------------------ the step

    def _run(self, b: int) -> torch.Tensor:
        """One padded decode forward of the first ``b`` rows; the write column and positions
        advance on the device."""
        self.amask[:b].index_fill_(3, self.col, 0.0)   # each new token attends to itself
        e = self.engine
        kw = {e._cache_kw: self.cache, "use_cache": True}
        if e._keep_kw:
            kw[e._keep_kw] = 1
        out = e.model(input_ids=self.ids[:b], attention_mask=self.amask[:b],
                      position_ids=self.pos[:b], **kw)
        self.col.add_(1)
        self.pos[:b].add_(1)
        return out.logits[:, -1, :].float()

    def _capture_all(self) -> None:
        """One graph per bucket, largest first, sharing one memory pool; the state the warm-up
        and capture runs wrote is put back afterwards."""
        saved = (self.col.clone(), self.pos.clone(), self.amask.clone())
        mempool = torch.cuda.graph_pool_handle()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for b in reversed(self.buckets):
                for _ in range(2):  # warm-up: lazy initialisation and kernel choice happen here
                    self._run(b)
        torch.cuda.current_stream().wait_stream(side)
        for b in reversed(self.buckets):
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool=mempool):
                out = self._run(b)
            self.graphs[b] = (g, out)
        torch.cuda.synchronize()
        for dst, src in zip((self.col, self.pos, self.amask), saved):
            dst.copy_(src)

    def step(self, owner: PoolCache, tok: torch.Tensor) -> torch.Tensor:
        """Feed every live row its token; the next token's logits (float32) of the live rows."""
        self._check(owner)
        if self.end >= self.capacity:
            raise RuntimeError("the graph pool is full (its capacity was sized for the segment)")
        b = bucket_for(self.n, self.buckets)
        self.ids[:self.n, 0].copy_(tok)
        self.end += 1
        if b in self.graphs:
            g, out = self.graphs[b]
            g.replay()
            return out[:self.n]
        return self._run(b)[:self.n]

    # ------------------------------------------------------------------ rows in and out

    def load(self, parent_cache, rows: torch.Tensor, first: int, mask: torch.Tensor,
             pos: torch.Tensor) -> PoolCache:
        """Rows ``rows`` of ``parent_cache``, from filled column ``first`` on, become the pool's
        live rows (the parent is untouched); ``mask``/``pos`` are theirs after the trim."""
        n, width = len(rows), mask.shape[1]
        for layer, src in zip(self.cache.layers, parent_cache.layers):
            for dst, full in ((layer.buf_k, src.keys), (layer.buf_v, src.values)):
                torch.index_select(full[:, :, first:], 0, rows, out=dst[:n, :, :width])
        self.amask[:n].fill_(self.neg)
        self.amask[:n, 0, 0, :width].masked_fill_(mask.bool(), 0.0)
        self.pos[:n, 0].copy_(pos)
        self.col.fill_(width)
        self.end, self.n = width, n
        self.owner = PoolCache(self)
        return self.owner

    def select(self, owner: PoolCache, idx: torch.Tensor, width: int):
        """Keep rows ``idx`` (repeats fork a row): a gather into the first rows. More rows than the
        pool holds continue on a slab cache of their ``width`` columns (the eager step)."""
        self._check(owner)
        if len(idx) > self.rows:
            spilled = self.detach(owner, width)
            spilled.batch_select_indices(idx)
            return spilled
        n, e = len(idx), self.end
        for layer in self.cache.layers:
            for buf in (layer.buf_k, layer.buf_v):
                buf[:n, :, :e] = buf[idx, :, :e]
        self.amask[:n] = self.amask[idx]
        self.pos[:n] = self.pos[idx]
        self.n = n
        return owner

    def rewind(self, owner: PoolCache, drop: torch.Tensor, pos: torch.Tensor) -> None:
        """Speculated tokens taken back: the last ``drop.shape[1]`` written columns are masked
        where ``drop`` (live rows, m) is set; ``pos`` is each row's next position."""
        self._check(owner)
        m = drop.shape[1]
        if m:
            self.amask[:self.n, 0, 0, self.end - m:self.end].masked_fill_(drop, self.neg)
        self.pos[:self.n, 0].copy_(pos)

    def detach(self, owner: PoolCache, width: int):
        """The live rows' last ``width`` filled columns as an ordinary slab cache (a copy), e.g.
        for rows that outlive their segment and will be forked again."""
        self._check(owner)
        cache = new_cache(self.engine.model.config, "static")
        first = self.end - width
        for layer, src in zip(cache.layers, self.cache.layers):
            layer.buf_k = src.buf_k[:self.n, :, first:self.end].clone()
            layer.buf_v = src.buf_v[:self.n, :, first:self.end].clone()
            layer.start, layer.end = 0, width
            layer.is_initialized, layer.device = True, layer.buf_k.device
            layer._views()
        self.owner = None
        return cache

    def _check(self, owner: PoolCache) -> None:
        if owner is not self.owner:
            raise RuntimeError("these rows no longer live in the graph pool")


class GraphDecoder:
    """An engine's pool, made when rows are first forked and made again (graphs captured anew)
    only when a segment needs more columns than it has."""

    def __init__(self, engine, *, capture: bool):
        self.engine, self.capture = engine, capture
        self.pool: Optional[GraphPool] = None
        self.max_rows = BUCKETS[-1]   # the engine splits its forks into pieces of at most this

    def fork(self, parent, rows: torch.Tensor, nodes, room: int):
        """``HFEngine.fork`` into the pool: a ``Rows`` whose cache is the pool's, or None when
        the rows do not fit (the engine then forks an ordinary slab cache)."""
        from tcli.engines.rows import Rows

        if not all(type(x) in (DynamicLayer, SlabLayer) for x in parent.cache.layers):
            return None   # sliding windows, or rows already in the pool
        mask = parent.mask[rows]
        used = mask.any(0)
        first = int(used.int().argmax()) if bool(used.any()) else 0
        mask = mask[:, first:]
        pool = self._pool(len(rows), mask.shape[1] + room)
        if pool is None:
            return None
        pos = parent.pos[rows]
        cache = pool.load(parent.cache, rows, first, mask, pos)
        return Rows(cache, mask, pos, parent.logits[rows], nodes)

    def _pool(self, rows: int, columns: int) -> Optional[GraphPool]:
        pool = self.pool
        if pool is not None and columns <= pool.capacity:
            return pool if rows <= pool.rows else None
        capacity = max(capacity_for(columns), pool.capacity if pool is not None else 0)
        self.pool = pool = None   # free the old buffers and graphs before the new ones
        most, e = BUCKETS[-1], self.engine
        if e.device.type == "cuda":
            torch.cuda.empty_cache()
            free, _ = torch.cuda.mem_get_info(e.device)
            dtype = next(e.model.parameters()).dtype
            most = pool_rows(free, kv_bytes_per_token(e.model.config, dtype), capacity)
        self.pool = GraphPool(e, most, capacity, capture=self.capture)
        self.max_rows = most
        return self.pool if rows <= most else None
