"""The ``hf`` engine: a transformers causal LM driven by our own sampling loop over a KV cache.

Why not ``model.generate``: we need the behaviour log-probs of the tempered logits,
log-softmax(logits / T) before top-p (the project's convention, as in verl and TRL, so train-step
can recompute them), a random stream per sample that does not depend on
how samples were batched, and tree sampling that forks a node's KV cache to its children instead of
re-encoding the shared prefix.

Sampling randomness is counter-based (tcli/engines/rng.py): the uniform number for token ``t`` of
a node is a hash of (seed, prompt token ids, node path, t). The same prompt with the same seed therefore gives the same
samples whatever else is in the batch or how ``--batch-tokens`` splits the work (up to float
round-off in batched matmuls, which can only flip a sample at an exact probability boundary).
"""

from __future__ import annotations

import inspect
import os
from dataclasses import replace
from typing import Optional, Sequence

import numpy as np
import torch

from tcli.engines.base import Engine, by_room
from tcli.engines.blocks import decode_segment, out_of_pool
from tcli.engines.cuda_graphs import (STOP_EVERY, GraphDecoder, PoolCache, auto_batch_tokens,
                                      graphs_enabled, kv_bytes_per_token)
from tcli.engines.entropy_tree import sample_entropy_tree
from tcli.engines.kv import fork_cache, new_cache, trim_left
from tcli.engines.rng import prompt_key, uniforms
from tcli.engines.rows import Node, Rows, append_tokens
from tcli.engines.sampling import (ENTROPY_TOP_K, Completion, EntropyRule, SamplingConfig, ToolPlan,
                                   TreeLeaf, logprob_temperature, topk_entropy)
from tcli.engines.turns import sample_with_tools
from tcli.models.checkpoint import read_state
from tcli.models.load import check_cuda_device, load_model, load_tokenizer, torch_dtype
from tcli.models.quiet import quiet_transformers

DEFAULT_BATCH_TOKENS = 65536


class HFEngine(Engine):
    """transformers causal LM with batched KV-cache sampling and native tree sampling.

    Besides the engine contract it offers its sampling state (``Rows``, engines/rows.py) to the
    native samplers: ``prefill_chunks``, ``prefill``, ``fork``, ``draw``, ``select``,
    ``advance`` and ``entropies``."""

    name = "hf"
    exact_entropy = True   # the full next-token distribution is at hand

    def __init__(self, model: str, *, device: str | None = None, dtype: str | None = None,
                 batch_tokens: int | None = None, policy_version: int | None = None,
                 attn_implementation: str | None = None, trainer=None, kv_cache: str = "static",
                 cuda_graphs: str = "auto", stop_every: int = 0):
        """``kv_cache``: ``static`` (preallocated buffers, tcli/engines/kv.py) or ``dynamic``
        (transformers' DynamicCache, one concatenation per token; kept to compare).
        ``batch_tokens`` None: 65536 on a CPU, a share of the free memory on CUDA.
        ``cuda_graphs`` auto/on/off and ``stop_every`` (tokens between host checks, 0: 8 with
        graphs, else 1): the graphed decode step of tcli/engines/cuda_graphs.py."""
        quiet_transformers()
        if trainer is not None:
            device = str(next(trainer.model.parameters()).device)
        elif device in (None, "auto"):
            device = "cuda" if torch.cuda.is_available() else "cpu"
        else:
            check_cuda_device(device)
        self.device = torch.device(device)
        self.dtype = torch_dtype(dtype)
        self.cuda_graphs = graphs_enabled(cuda_graphs, self.device)
        self.stop_every = int(stop_every) or (STOP_EVERY if self.cuda_graphs else 1)
        self.batch_tokens = batch_tokens
        self.attn_implementation = attn_implementation
        if kv_cache not in ("static", "dynamic"):
            raise ValueError(f"kv_cache must be 'static' or 'dynamic', got {kv_cache!r}")
        self.kv_cache = kv_cache
        self.generated_tokens = 0    # tokens sampled (shared tree prefixes count once)
        self._tokenizer = None
        self.model = None
        if trainer is not None:
            self._tokenizer = trainer.tokenizer
            self._attach(trainer.model, model)
            self.policy_version = int(trainer.policy_version)
            return
        self._load(model)
        if policy_version is None:
            policy_version = (int(read_state(model).get("policy_version", 0))
                              if os.path.isdir(model) else 0)
        self.policy_version = int(policy_version)

    # ------------------------------------------------------------------ loading

    def _load(self, model_dir: str) -> None:
        model = load_model(model_dir, device=self.device, dtype=self.dtype,
                           attn_implementation=self.attn_implementation)
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(model_dir, required=True)
        self._attach(model, model_dir)

    def _attach(self, model, model_dir: str) -> None:
        """Sample from ``model`` (loaded here or shared with a trainer)."""
        self.model = model
        self.model_path = model_dir
        self._graphs = GraphDecoder(self, capture=True) if self.cuda_graphs else None
        if self.batch_tokens is None:
            self.batch_tokens = DEFAULT_BATCH_TOKENS
            if self.device.type == "cuda":
                free, _ = torch.cuda.mem_get_info(self.device)
                self.batch_tokens = auto_batch_tokens(free, kv_bytes_per_token(
                    model.config, next(model.parameters()).dtype))
        self.batch_tokens = int(self.batch_tokens)
        params = inspect.signature(model.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        self._keep_kw = ("logits_to_keep" if "logits_to_keep" in params else
                         "num_logits_to_keep" if "num_logits_to_keep" in params else None)
        eos: set[int] = set()
        for src in (getattr(model.generation_config, "eos_token_id", None),
                    getattr(model.config, "eos_token_id", None), self._tokenizer.eos_token_id):
            if isinstance(src, int):
                eos.add(src)
            elif isinstance(src, (list, tuple)):
                eos.update(int(x) for x in src)
        self.eos_token_ids = sorted(eos)
        self._eos_t = torch.tensor(self.eos_token_ids, dtype=torch.long, device=self.device)
        pad = self._tokenizer.pad_token_id
        self.pad_token_id = int(pad if pad is not None else (self.eos_token_ids or [0])[0])

    def load_weights(self, model_dir: str, policy_version: int) -> None:
        """Switch to the weights in ``model_dir`` (the tokenizer is kept); nothing is cached across calls."""
        self.model = None  # free the old weights first
        self._load(model_dir)
        self.policy_version = int(policy_version)

    def follow(self, trainer) -> None:
        """The trainer updates the shared module in place: only the version changes."""
        if self.model is not trainer.model:
            self._attach(trainer.model, self.model_path)
        self.policy_version = int(trainer.policy_version)

    @property
    def tokenizer(self):
        return self._tokenizer

    @property
    def max_positions(self):
        """The model's positions (GPT-2's n_positions too, through the config's attribute map)."""
        return getattr(self.model.config, "max_position_embeddings", None)

    # ------------------------------------------------------------------ the engine contract

    def generate(self, prompts: Sequence[Sequence[int]], n: int, cfg: SamplingConfig
                 ) -> list[list[Completion]]:
        """n independent completions per prompt (each prompt is encoded once and its cache forked)."""
        trees = self.sample_tree(prompts, width=n, depth=1, segment_tokens=cfg.max_new_tokens, cfg=cfg)
        return [[Completion(lf.token_ids, lf.logprobs, lf.finish_reason) for lf in leaves]
                for leaves in trees]

    def generate_entropy(self, prompts: Sequence[Sequence[int]], n: int, cfg: SamplingConfig, *,
                         top_k: Optional[int] = ENTROPY_TOP_K,
                         seeds: Optional[Sequence[int]] = None) -> list[list[Completion]]:
        """``generate`` with per-token entropies (the contract in engines/base.py): the same
        samples as ``generate`` when ``seeds`` is None."""
        trees = self.sample_tree(prompts, width=n, depth=1, segment_tokens=cfg.max_new_tokens,
                                 cfg=cfg, seeds=seeds, entropy=True, top_k=top_k)
        return [[Completion(lf.token_ids, lf.logprobs, lf.finish_reason, lf.entropies)
                 for lf in leaves] for leaves in trees]

    def continue_prefixes(self, prompts: Sequence[Sequence[int]],
                          prefixes: Sequence[Sequence[int]], cfg: SamplingConfig, *,
                          seeds: Sequence[int], entropy: bool = False) -> list[Completion]:
        """The contract in engines/base.py, batched: requests decode together whatever their
        prefix lengths (each row stops at its own room; one call per share of
        ``min_new_tokens``, a single one when it is 0), each row's stream from its own seed and
        tokens; exact entropies."""
        out: list = [None] * len(prompts)
        calls: dict[int, list[tuple[int, int]]] = {}
        for sub, idx in by_room(prefixes, cfg):
            calls.setdefault(sub.min_new_tokens, []).extend((i, sub.max_new_tokens) for i in idx)
        for least, reqs in calls.items():
            reqs.sort()
            idx = [i for i, _ in reqs]
            sub = replace(cfg, max_new_tokens=max(room for _, room in reqs),
                          min_new_tokens=least)
            full = [list(prompts[i]) + list(prefixes[i]) for i in idx]
            own = [int(seeds[i]) for i in idx]
            leaves: list[list[TreeLeaf]] = [[] for _ in idx]
            with torch.inference_mode():
                for chunk in self.prefill_chunks(full, 1, sub.max_new_tokens):
                    root = self.prefill(full, chunk, 0, own, entropy)
                    for node in root.nodes:
                        node.cap = reqs[node.prompt][1]
                    self._tree_from(root, 1, 1, sub.max_new_tokens, sub, leaves,
                                    None if entropy else False)
            for i, (lf,) in zip(idx, leaves):
                out[i] = Completion(lf.token_ids, lf.logprobs, lf.finish_reason, lf.entropies)
        return out

    def sample_entropy_tree(self, prompts: Sequence[Sequence[int]], rule: EntropyRule,
                            cfg: SamplingConfig, record: bool = False, *,
                            probe_tokens: int | None = None) -> list[list[TreeLeaf]]:
        """``--branch entropy`` natively: all paths decode in one batch and a row that splits
        becomes ``rule.width`` rows of the same KV cache (tcli/engines/entropy_tree.py; exact
        entropies, so no probes: ``probe_tokens`` is not used)."""
        return sample_entropy_tree(self, prompts, rule, cfg, record)

    def sample_with_tools(self, prompts: Sequence[Sequence[int]], plan: ToolPlan,
                          cfg: SamplingConfig, *, entropy: bool = False) -> list[list[TreeLeaf]]:
        """Multi-turn episodes with tool calls, observations fed into the running KV cache
        (tcli/engines/turns.py)."""
        return sample_with_tools(self, prompts, plan, cfg, entropy)

    def sample_tree(self, prompts: Sequence[Sequence[int]], width: int, depth: int,
                    segment_tokens: int, cfg: SamplingConfig, *,
                    seeds: Optional[Sequence[int]] = None, entropy: bool = False,
                    top_k: Optional[int] = None) -> list[list[TreeLeaf]]:
        """Tree sampling with KV-cache forking; per prompt, its leaves sorted by node path.

        Work is depth-first over chunks of rows so memory stays near ``batch_tokens`` cached tokens
        per chunk; rows of different prompts share a chunk (and every forward pass). ``seeds``:
        one per prompt instead of ``cfg.seed``; ``entropy``: record each token's sampling entropy
        (exact, or from the ``top_k`` largest log-probs).
        """
        if width < 1 or depth < 1 or segment_tokens < 1:
            raise ValueError("width, depth and segment_tokens must be >= 1")
        leaves: list[list[TreeLeaf]] = [[] for _ in prompts]
        if cfg.max_new_tokens <= 0:
            for out in leaves:
                out.extend(TreeLeaf((c,), [], [], [0], "length", [] if entropy else None)
                           for c in range(width))
            return leaves
        first_seg = cfg.max_new_tokens if depth == 1 else min(segment_tokens, cfg.max_new_tokens)
        with torch.inference_mode():
            for chunk in self.prefill_chunks(prompts, width, first_seg):
                root = self.prefill(prompts, chunk, cfg.seed, seeds, entropy)
                self._tree_from(root, width, depth, segment_tokens, cfg, leaves,
                                top_k if entropy else False)
        for out in leaves:
            out.sort(key=lambda lf: lf.node_path)
        return leaves

    def _tree_from(self, root: Rows, width: int, depth: int, segment_tokens: int,
                   cfg: SamplingConfig, leaves: list[list[TreeLeaf]], top_k) -> None:
        """Depth-first over the subtrees of ``root``'s rows, ``width`` children per node, in
        pieces of rows that fit ``batch_tokens``."""
        stack = [(root, [(r, c) for r in range(len(root.nodes)) for c in range(width)])]
        while stack:
            parent, pairs = stack.pop()
            level = len(parent.nodes[0].path) + 1
            room = cfg.max_new_tokens - len(parent.nodes[0].tokens)
            seg = room if level == depth else min(segment_tokens, room)
            per = max(1, self.batch_tokens // (parent.mask.shape[1] + seg))
            if self._graphs is not None:  # pieces the graph pool holds
                per = min(per, self._graphs.max_rows)
            if len(pairs) > per:
                pieces = [pairs[i:i + per] for i in range(0, len(pairs), per)]
                stack.extend((parent, p) for p in reversed(pieces[1:]))
                pairs = pieces[0]
            child = self.fork(parent, pairs, seg)
            del parent
            alive = self._segment(child, level == depth, seg, cfg, leaves, top_k)
            if alive is not None:
                stack.append((alive, [(r, c) for r in range(len(alive.nodes))
                                      for c in range(width)]))

    # ------------------------------------------------------------------ sampling state

    def entropies(self, logits, cfg: SamplingConfig, top_k: Optional[int] = None) -> list[float]:
        """Sampling entropy (nats) per row: of softmax(logits / T) before top-p and the EOS mask
        (T = 1 when greedy), exact, or ``topk_entropy`` of its ``top_k`` largest log-probs."""
        t = logprob_temperature(cfg.temperature)
        logp = torch.log_softmax(logits if t == 1 else logits / t, dim=-1)
        if top_k is not None and top_k < logp.shape[-1]:
            return topk_entropy(logp.topk(top_k, dim=-1).values.double().cpu().numpy()).tolist()
        h = -torch.where(logp > float("-inf"), logp.exp() * logp, 0.0).sum(-1)
        return h.clamp_(min=0.0).tolist()

    def prefill_chunks(self, prompts, width: int, first_seg: int):
        """Consecutive prompts packed so that their first fork fits in ``batch_tokens``."""
        chunk: list[int] = []
        longest = 0
        for i, p in enumerate(prompts):
            if len(p) == 0:
                raise ValueError(f"prompt #{i} has no tokens")
            ln = max(longest, len(p))
            if chunk and (len(chunk) + 1) * width * (ln + first_seg) > self.batch_tokens:
                yield chunk
                chunk, ln = [], len(p)
            chunk.append(i)
            longest = ln
        if chunk:
            yield chunk

    def _forward(self, input_ids, mask, pos, cache):
        kw = {self._cache_kw: cache, "use_cache": True}
        if self._keep_kw:
            kw[self._keep_kw] = 1
        out = self.model(input_ids=input_ids, attention_mask=mask, position_ids=pos, **kw)
        return out.logits[:, -1, :].float()

    def prefill(self, prompts, idx: list[int], seed: int, seeds=None, record: bool = False
                ) -> Rows:
        """The root rows of prompts ``idx``: their cache and the logits of the first token."""
        seqs = [list(prompts[i]) for i in idx]
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for r, s in enumerate(seqs):
            ids[r, width - len(s):] = torch.tensor(s, dtype=torch.long)
            mask[r, width - len(s):] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        pos = (mask.cumsum(1) - 1).clamp_(min=0)
        cache = new_cache(self.model.config, self.kv_cache)  # the root only feeds its children
        logits = self._forward(ids, mask, pos, cache)
        nodes = [Node(i, (), [], [], [], prompt_key(seed if seeds is None else seeds[i], prompts[i]),
                      [] if record else None) for i in idx]
        return Rows(cache, mask, pos[:, -1] + 1, logits, nodes)

    def fork(self, parent: Rows, pairs: list[tuple[int, int]], room: int) -> Rows:
        """Children (row, child index) of parent rows: the cache rows are gathered, never
        recomputed, into a cache with ``room`` free columns for the segment to come."""
        rows = torch.tensor([r for r, _ in pairs], dtype=torch.long, device=self.device)
        nodes = [parent.nodes[r].child(c) for r, c in pairs]
        if self._graphs is not None:
            st = self._graphs.fork(parent, rows, nodes, room)
            if st is not None:
                return st
        cache = fork_cache(parent.cache, rows, room)  # the parent's tensors stay untouched
        st = Rows(cache, parent.mask[rows], parent.pos[rows], parent.logits[rows], nodes)
        self._trim_left(st)
        return st

    def select(self, st: Rows, rows: list[int]) -> None:
        """The cache, mask and positions become rows ``rows`` of the old ones, in place (a row
        repeated is forked, a row left out has ended); the caller keeps ``nodes`` and
        ``logits`` in step."""
        idx = torch.tensor(rows, dtype=torch.long, device=self.device)
        if isinstance(st.cache, PoolCache):
            st.cache = st.cache.select(idx, st.mask.shape[1])
        else:
            st.cache.batch_select_indices(idx)
        st.mask, st.pos = st.mask[idx], st.pos[idx]
        self._trim_left(st)

    @staticmethod
    def _trim_left(st: Rows) -> None:
        """Remove left-pad columns no remaining row needs (not for sliding-window layers)."""
        col = st.mask.any(0)
        k = int(col.int().argmax()) if bool(col.any()) else 0
        if k and trim_left(st.cache, k):
            st.mask = st.mask[:, k:]

    def draw(self, st: Rows, step: int, cfg: SamplingConfig):
        """Every row's next token (response position ``step``): the token tensor, and as lists
        the tokens, their behaviour log-probs and whether each is EOS."""
        tok, lp = self._sample(st.logits, st.keys(), step, cfg)
        self.generated_tokens += len(st.nodes)
        return tok, tok.tolist(), lp.tolist(), torch.isin(tok, self._eos_t).tolist()

    def advance(self, st: Rows, tok) -> None:
        """Feed each row its new token ``tok``: the cache grows by one column, ``logits`` are
        the next token's."""
        st.mask = torch.cat([st.mask, st.mask.new_ones((len(st.nodes), 1))], dim=1)
        if isinstance(st.cache, PoolCache):
            st.logits = st.cache.step(tok)
        else:
            st.logits = self._forward(tok.unsqueeze(1), st.mask, st.pos.unsqueeze(1), st.cache)
        st.pos = st.pos + 1

    def _sample(self, logits, keys, step: int, cfg: SamplingConfig, u=None):
        """Next token per row and its behaviour log-prob: log-softmax of logits / T (T = 1 when
        greedy), before top-p and the min-tokens EOS mask, as train-step recomputes it. ``u``:
        the rows' uniforms already on the device (else computed from ``keys``)."""
        t = logprob_temperature(cfg.temperature)
        logp = torch.log_softmax(logits if t == 1 else logits / t, dim=-1)
        scores = logits
        early = np.asarray(step) < cfg.min_new_tokens  # ``step``: one, or one per row (turns)
        if early.any() and len(self.eos_token_ids):
            scores = logits.clone()
            if early.ndim:
                rows = torch.from_numpy(np.flatnonzero(early)).to(logits.device)
                scores[rows.unsqueeze(1), self._eos_t.unsqueeze(0)] = float("-inf")
            else:
                scores[:, self._eos_t] = float("-inf")
        if cfg.temperature <= 0:
            tok = scores.argmax(dim=-1)
        else:
            probs = torch.softmax(scores / cfg.temperature, dim=-1).double()
            if u is None:
                u = torch.from_numpy(uniforms(keys, step)).to(probs.device)
            if cfg.top_p < 1.0:
                sp, si = probs.sort(dim=-1, descending=True, stable=True)
                keep = (sp.cumsum(-1) - sp) < cfg.top_p  # the smallest prefix reaching top_p
                cdf = (sp * keep).cumsum(-1)
            else:
                si, cdf = None, probs.cumsum(-1)
            target = (u * cdf[:, -1]).unsqueeze(1)
            idx = torch.searchsorted(cdf, target, right=True).clamp_(max=cdf.shape[1] - 1)
            tok = (si.gather(1, idx) if si is not None else idx).squeeze(1)
        return tok, logp.gather(1, tok.unsqueeze(1)).squeeze(1)

    def _segment(self, st: Rows, last_level: bool, seg: int, cfg: SamplingConfig,
                 leaves: list[list[TreeLeaf]], top_k=False) -> Rows | None:
        """Generate up to ``seg`` tokens for every row; finished rows become leaves; ``top_k``
        (False: none) is how each token's entropy is recorded (``entropies``).

        Returns the rows still running (their cache includes the last token and ``logits`` is the
        distribution of the next one), or None when all finished.
        """
        if self.stop_every > 1:
            return decode_segment(self, st, last_level, seg, cfg, leaves, top_k)
        start = len(st.nodes[0].tokens)
        for t in range(seg):
            step = start + t
            if top_k is not False:
                for node, h in zip(st.nodes, self.entropies(st.logits, cfg, top_k)):
                    node.entropies.append(h)
            tok, toks, lps, eos = self.draw(st, step, cfg)
            final_len = step + 1 >= cfg.max_new_tokens or (last_level and t == seg - 1)
            keep = append_tokens(st.nodes, toks, lps, eos, final_len, leaves)
            if not keep:
                return None
            if len(keep) < len(st.nodes):
                tok = tok[torch.tensor(keep, dtype=torch.long, device=tok.device)]
                st.nodes = [st.nodes[i] for i in keep]
                st.logits = st.logits[torch.tensor(keep, dtype=torch.long, device=self.device)]
                self.select(st, keep)
            self.advance(st, tok)
        for node in st.nodes:
            node.ends.append(len(node.tokens))
        return out_of_pool(st)
