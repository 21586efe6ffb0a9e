"""The ``hf`` engine: a transformers causal LM driven by our own sampling loop over a KV cache.

Why not ``model.generate``: we need the behaviour log-probs of the tempered logits,
log-softmax(logits / T) before top-p (the project's convention, as in verl and TRL, so train-step
can recompute them), a random stream per sample that does not depend on
how samples were batched, and tree sampling that forks a node's KV cache to its children instead of
re-encoding the shared prefix.

Sampling randomness is counter-based: the uniform number for token ``t`` of a node is a hash of
(seed, prompt token ids, node path, t). The same prompt with the same seed therefore gives the same
samples whatever else is in the batch or how ``--batch-tokens`` splits the work (up to float
round-off in batched matmuls, which can only flip a sample at an exact probability boundary).
"""

from __future__ import annotations

import hashlib
import inspect
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from tcli.engines.base import (ENTROPY_TOP_K, Completion, SamplingConfig, logprob_temperature,
                               topk_entropy)
from tcli.stages.sample import EntropyRule, TreeLeaf

_MASK64 = (1 << 64) - 1
DEFAULT_BATCH_TOKENS = 65536


# ----------------------------------------------------------------------------- counter-based RNG

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


# ----------------------------------------------------------------------------- engine state

@dataclass
class _Node:
    prompt: int                  # index of the prompt in the current call
    path: tuple[int, ...]        # child index taken at each level
    tokens: list[int]
    logprobs: list[float]
    ends: list[int]              # segment ends so far
    key: int                     # random-stream key of this node
    entropies: Optional[list[float]] = None  # per token, when recorded
    start: int = 0               # where this node's segment starts (its parent's length)


@dataclass
class _State:
    """Rows generated in lock-step: one KV cache, left-padded, all rows the same cache length."""

    cache: object
    mask: "torch.Tensor"         # (R, S) 1 = real token, 0 = left pad  # noqa: F821
    pos: "torch.Tensor"          # (R,) position id of the next token  # noqa: F821
    logits: "torch.Tensor"       # (R, V) float32 raw logits of the next token  # noqa: F821
    nodes: list[_Node]


class HFEngine:
    """transformers causal LM with batched KV-cache sampling and native tree sampling."""

    name = "hf"
    exact_entropy = True   # the full next-token distribution is at hand

    def __init__(self, model: str, *, device: str | None = None, dtype: str | None = None,
                 batch_tokens: int = DEFAULT_BATCH_TOKENS, policy_version: int | None = None,
                 attn_implementation: str | None = None, trainer=None, kv_cache: str = "static"):
        """``kv_cache``: ``static`` (preallocated buffers, tcli/engines/kv.py) or ``dynamic``
        (transformers' DynamicCache, one concatenation per token; kept to compare)."""
        import torch

        from tcli.models.quiet import quiet_transformers

        quiet_transformers()
        if trainer is not None:
            device = str(next(trainer.model.parameters()).device)
        elif device in (None, "auto"):
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        from tcli.models.load import torch_dtype

        self.dtype = torch_dtype(dtype)
        self.batch_tokens = int(batch_tokens)
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
            from tcli.models.checkpoint import read_state

            policy_version = int(read_state(model).get("policy_version", 0)) if _is_dir(model) else 0
        self.policy_version = int(policy_version)

    # ------------------------------------------------------------------ loading

    def _load(self, model_dir: str) -> None:
        from tcli.models.load import load_model, load_tokenizer

        model = load_model(model_dir, device=self.device, dtype=self.dtype,
                           attn_implementation=self.attn_implementation)
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(model_dir, required=True)
        self._attach(model, model_dir)

    def _attach(self, model, model_dir: str) -> None:
        """Sample from ``model`` (loaded here or shared with a trainer)."""
        import torch

        self.model = model
        self.model_path = model_dir
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

    # ------------------------------------------------------------------ public sampling API

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

    def sample_entropy_tree(self, prompts: Sequence[Sequence[int]], rule: EntropyRule,
                            cfg: SamplingConfig, record: bool = False) -> list[list[TreeLeaf]]:
        """``--branch entropy`` natively: all paths decode in one batch and a row that splits
        becomes ``rule.width`` rows of the same KV cache (tcli/engines/entropy_tree.py)."""
        from tcli.engines.entropy_tree import sample_entropy_tree

        return sample_entropy_tree(self, prompts, rule, cfg, record)

    def entropies(self, logits, cfg: SamplingConfig, top_k: Optional[int] = None) -> list[float]:
        """Sampling entropy (nats) per row: of softmax(logits / T) before top-p and the EOS mask
        (T = 1 when greedy), exact, or ``topk_entropy`` of its ``top_k`` largest log-probs."""
        import torch

        t = logprob_temperature(cfg.temperature)
        logp = torch.log_softmax(logits if t == 1 else logits / t, dim=-1)
        if top_k is not None and top_k < logp.shape[-1]:
            return topk_entropy(logp.topk(top_k, dim=-1).values.double().cpu().numpy()).tolist()
        h = -torch.where(logp > float("-inf"), logp.exp() * logp, 0.0).sum(-1)
        return h.clamp_(min=0.0).tolist()

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
        import torch

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
            for chunk in self._prefill_chunks(prompts, width, first_seg):
                root = self._prefill(prompts, chunk, cfg.seed, seeds, entropy)
                stack = [(root, [(r, c) for r in range(len(root.nodes)) for c in range(width)])]
                while stack:
                    parent, pairs = stack.pop()
                    level = len(parent.nodes[0].path) + 1
                    done = len(parent.nodes[0].tokens)
                    room = cfg.max_new_tokens - done
                    seg = room if level == depth else min(segment_tokens, room)
                    per = max(1, self.batch_tokens // (parent.mask.shape[1] + seg))
                    if len(pairs) > per:
                        pieces = [pairs[i:i + per] for i in range(0, len(pairs), per)]
                        stack.extend((parent, p) for p in reversed(pieces[1:]))
                        pairs = pieces[0]
                    child = self._fork(parent, pairs, seg)
                    del parent
                    alive = self._segment(child, level == depth, seg, cfg, leaves,
                                          top_k if entropy else False)
                    if alive is not None:
                        stack.append((alive, [(r, c) for r in range(len(alive.nodes))
                                              for c in range(width)]))
        for out in leaves:
            out.sort(key=lambda lf: lf.node_path)
        return leaves

    # ------------------------------------------------------------------ internals

    def _prefill_chunks(self, prompts, width: int, first_seg: int):
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

    def _prefill(self, prompts, idx: list[int], seed: int, seeds=None, record: bool = False
                 ) -> _State:
        import torch

        seqs = [list(prompts[i]) for i in idx]
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for r, s in enumerate(seqs):
            ids[r, width - len(s):] = torch.tensor(s, dtype=torch.long)
            mask[r, width - len(s):] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        pos = (mask.cumsum(1) - 1).clamp_(min=0)
        from tcli.engines.kv import new_cache

        cache = new_cache(self.model.config, self.kv_cache)  # the root only feeds its children
        logits = self._forward(ids, mask, pos, cache)
        nodes = [_Node(i, (), [], [], [], prompt_key(seed if seeds is None else seeds[i], prompts[i]),
                       [] if record else None) for i in idx]
        return _State(cache, mask, pos[:, -1] + 1, logits, nodes)

    def _fork(self, parent: _State, pairs: list[tuple[int, int]], room: int) -> _State:
        """Children (row, child index) of parent rows: the cache rows are gathered, never
        recomputed, into a cache with ``room`` free columns for the segment to come."""
        import torch

        from tcli.engines.kv import fork_cache

        rows = torch.tensor([r for r, _ in pairs], dtype=torch.long, device=self.device)
        cache = fork_cache(parent.cache, rows, room)  # the parent's tensors stay untouched
        nodes = []
        for r, c in pairs:
            p = parent.nodes[r]
            nodes.append(_Node(p.prompt, p.path + (c,), list(p.tokens), list(p.logprobs),
                               list(p.ends), child_key(p.key, c),
                               None if p.entropies is None else list(p.entropies), len(p.tokens)))
        st = _State(cache, parent.mask[rows], parent.pos[rows], parent.logits[rows], nodes)
        self._trim_left(st)
        return st

    def _keep(self, st: _State, keep: list[int]) -> None:
        """Drop finished rows in place."""
        import torch

        idx = torch.tensor(keep, dtype=torch.long, device=self.device)
        st.cache.batch_select_indices(idx)
        st.mask, st.pos, st.logits = st.mask[idx], st.pos[idx], st.logits[idx]
        st.nodes = [st.nodes[i] for i in keep]
        self._trim_left(st)

    @staticmethod
    def _trim_left(st: _State) -> None:
        """Remove left-pad columns no remaining row needs (not for sliding-window layers)."""
        from tcli.engines.kv import trim_left

        col = st.mask.any(0)
        k = int(col.int().argmax()) if bool(col.any()) else 0
        if k and trim_left(st.cache, k):
            st.mask = st.mask[:, k:]

    def _sample(self, logits, keys: np.ndarray, step: int, cfg: SamplingConfig):
        """Next token per row and its behaviour log-prob: log-softmax of logits / T (T = 1 when
        greedy), before top-p and the min-tokens EOS mask, as train-step recomputes it."""
        import torch

        t = logprob_temperature(cfg.temperature)
        logp = torch.log_softmax(logits if t == 1 else logits / t, dim=-1)
        scores = logits
        if step < cfg.min_new_tokens and len(self.eos_token_ids):
            scores = logits.clone()
            scores[:, self._eos_t] = float("-inf")
        if cfg.temperature <= 0:
            tok = scores.argmax(dim=-1)
        else:
            probs = torch.softmax(scores / cfg.temperature, dim=-1).double()
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

    def _segment(self, st: _State, last_level: bool, seg: int, cfg: SamplingConfig,
                 leaves: list[list[TreeLeaf]], top_k=False) -> _State | None:
        """Generate up to ``seg`` tokens for every row; finished rows become leaves; ``top_k``
        (False: none) is how each token's entropy is recorded (``entropies``).

        Returns the rows still running (their cache includes the last token and ``logits`` is the
        distribution of the next one), or None when all finished.
        """
        import torch

        start = len(st.nodes[0].tokens)
        for t in range(seg):
            step = start + t
            keys = np.fromiter((n.key for n in st.nodes), dtype=np.uint64, count=len(st.nodes))
            if top_k is not False:
                for node, h in zip(st.nodes, self.entropies(st.logits, cfg, top_k)):
                    node.entropies.append(h)
            tok, lp = self._sample(st.logits, keys, step, cfg)
            self.generated_tokens += len(st.nodes)
            toks, lps = tok.tolist(), lp.tolist()
            eos = torch.isin(tok, self._eos_t).tolist()
            final_len = step + 1 >= cfg.max_new_tokens or (last_level and t == seg - 1)
            keep = []
            for i, node in enumerate(st.nodes):
                node.tokens.append(toks[i])
                node.logprobs.append(lps[i])
                if eos[i] or final_len:
                    node.ends.append(len(node.tokens))
                    leaves[node.prompt].append(TreeLeaf(node.path, node.tokens, node.logprobs,
                                                        node.ends, "stop" if eos[i] else "length",
                                                        node.entropies))
                else:
                    keep.append(i)
            if not keep:
                return None
            if len(keep) < len(st.nodes):
                tok = tok[torch.tensor(keep, dtype=torch.long, device=tok.device)]
                self._keep(st, keep)
            st.mask = torch.cat([st.mask, st.mask.new_ones((len(keep), 1))], dim=1)
            st.logits = self._forward(tok.unsqueeze(1), st.mask, st.pos.unsqueeze(1), st.cache)
            st.pos = st.pos + 1
        for node in st.nodes:
            node.ends.append(len(node.tokens))
        return st


def _is_dir(path: str) -> bool:
    import os

    return os.path.isdir(path)
