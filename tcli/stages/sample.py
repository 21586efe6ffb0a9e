"""Sampling rollouts from prompt records: independent groups or TreeRPO-style trees (DESIGN §3, §4).

``sample_records`` is the library entry point used by ``tcli sample-tree`` and by ``loop``. It works
with any engine of the ``Engine`` protocol: tree sampling on a generic engine goes level by level,
submitting each frontier node's prefix (prompt + tokens so far) as a token prompt with ``n=width``;
an engine with a native ``sample_tree`` (the ``hf`` engine forks KV caches) is used directly.
Where a tree splits is a registered branch rule (``BRANCH_RULES``): ``segments`` (every
``segment_tokens``) or ``entropy`` (``EntropyRule``: where the sampling entropy exceeds a
threshold; native ``sample_entropy_tree`` or probes through ``generate_entropy``).

Token conventions: ``token_ids`` keep the EOS token when ``finish_reason == "stop"`` (so the policy
learns to stop) and never contain padding; ``logprobs`` are log_softmax(logits / T) of exactly those
tokens at the sampling temperature T, before top-p renormalisation (as verl and TRL compute them;
greedy decoding, T = 0, has T = 1 log-probs). Every record carries the ``temperature`` it was
sampled at (0 when greedy, which train-step reads as 1) and its ``top_p``, so train-step
recomputes the same distribution.

Randomness: each engine call gets the seed of ``cfg``; the ``hf`` engine derives every sample's
random stream from (seed, prompt tokens, sample/node index), so results do not depend on batching.
Callers that sample the same prompts repeatedly (``loop``) should vary the seed per iteration.

No torch import here: this module is imported by engines and by the CLI.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace
from typing import Callable, Iterable, Iterator, Optional, Sequence

from tcli import SCHEMA
from tcli.engines.base import ENTROPY_TOP_K, SamplingConfig
from tcli.io import SeenKeys
from tcli.errors import DataError, UsageError
from tcli.registry import Registry
from tcli.prompts import (check_prompt_record, encode_prompt, map_fields, prompt_messages,
                          prompt_text, resolve_template, source_field, template_name)

@dataclass
class TreeLeaf:
    """One response of a tree: the path of child indices from the root and its segments."""

    node_path: tuple[int, ...]
    token_ids: list[int]
    logprobs: list[float]
    segment_ends: list[int]
    finish_reason: str
    entropies: Optional[list[float]] = None   # sampling entropy per token (--record-entropy)


@dataclass(frozen=True)
class EntropyRule:
    """Where ``--branch entropy`` splits a path (DESIGN §4): at token t of a node whose segment
    started at ``start``, when the node has split fewer than ``depth`` times on its way from the
    root, t - start >= ``min_segment`` (and t > start for a child: its first token is its own
    forking token) and the sampling entropy of token t exceeds ``threshold``. The node then ends
    before t and ``width`` children each sample token t independently."""

    width: int
    depth: int
    threshold: float
    min_segment: int
    top_k: Optional[int] = None   # generic engines: log-probs behind the estimate (None: exact)

    def splits(self, path_len: int, start: int, t: int, entropy: float) -> bool:
        """``path_len``: the node's node_path length (the root's path is (0,): 1 + splits so far)."""
        first = max(self.min_segment, 1 if path_len > 1 else 0)
        return path_len <= self.depth and t - start >= first and entropy > self.threshold


# ----------------------------------------------------------------------------- tree on any engine

def _level_seed(seed: int, level: int) -> int:
    return (seed * 1_000_003 + level) & 0x7FFFFFFF


def _generator(engine, record: bool, top_k: Optional[int] = ENTROPY_TOP_K):
    """``engine.generate``, or ``generate_entropy`` when entropies are wanted (UsageError if the
    engine has none); ``top_k`` None asks for exact entropies."""
    if not record:
        return engine.generate
    fn = getattr(engine, "generate_entropy", None)
    if fn is None:
        raise UsageError(f"the {getattr(engine, 'name', type(engine).__name__)} engine gives no "
                         "sampling entropies (generate_entropy)")
    return lambda prompts, n, cfg, seeds=None: fn(prompts, n, cfg, top_k=top_k, seeds=seeds)


def sample_tree_generic(engine, prompts: Sequence[Sequence[int]], width: int, depth: int,
                        segment_tokens: int, cfg: SamplingConfig, record: bool = False
                        ) -> list[list[TreeLeaf]]:
    """Tree sampling through ``engine.generate`` only, level by level (prefix caching, if the engine
    has it, shares the work between siblings). Leaves per prompt, sorted by node path.
    ``record``: through ``generate_entropy``, with each leaf's ``entropies``."""
    gen = _generator(engine, record)
    leaves: list[list[TreeLeaf]] = [[] for _ in prompts]
    # frontier node: (prompt index, path, tokens, logprobs, ends, entropies)
    frontier = [(i, (), [], [], [], []) for i in range(len(prompts))]
    for level in range(1, depth + 1):
        if not frontier:
            break
        done = len(frontier[0][2])
        room = cfg.max_new_tokens - done
        seg = room if level == depth else min(segment_tokens, room)
        lvl = replace(cfg, max_new_tokens=seg, min_new_tokens=max(0, min(cfg.min_new_tokens - done, seg)),
                      seed=_level_seed(cfg.seed, level))
        outs = gen([list(prompts[f[0]]) + f[2] for f in frontier], width, lvl)
        nxt = []
        for (p, path, toks, lps, ends, ents), comps in zip(frontier, outs):
            for c, comp in enumerate(comps):
                t2 = toks + list(comp.token_ids)
                l2 = lps + list(comp.logprobs)
                e2 = ends + [len(t2)]
                h2 = ents + list(comp.entropies) if record else None
                stop = comp.finish_reason == "stop"
                if stop or level == depth or len(t2) >= cfg.max_new_tokens or not comp.token_ids:
                    reason = "stop" if stop else "length"
                    leaves[p].append(TreeLeaf(path + (c,), t2, l2, e2, reason, h2))
                else:
                    nxt.append((p, path + (c,), t2, l2, e2, h2))
        frontier = nxt
    for out in leaves:
        out.sort(key=lambda lf: lf.node_path)
    return leaves


# ----------------------------------------------------------------------------- entropy tree, generic

@dataclass
class _Path:
    """A running node of the generic entropy tree: its tokens from the response's start."""

    prompt: int
    path: tuple[int, ...]
    tokens: list[int]
    logprobs: list[float]
    entropies: list[float]
    ends: list[int]
    start: int


def _path_seed(seed: int, path: tuple[int, ...]) -> int:
    """A node's random-stream seed for ``generate_entropy``: distinct for every node, so siblings
    that drew the same tokens still continue independently (the engine adds the prefix tokens)."""
    h = hashlib.blake2b(digest_size=8, person=b"tcli-etree")
    h.update(int(seed).to_bytes(16, "little", signed=True))
    h.update(",".join(map(str, path)).encode())
    return int.from_bytes(h.digest(), "little") >> 2


def _absorb(node: _Path, comp, rule: EntropyRule, cfg: SamplingConfig):
    """Append a probe's tokens to ``node`` up to its first split point. Returns "split" (the node
    ends before that token), "leaf" (EOS, the length budget or nothing generated) or "more"."""
    t0 = len(node.tokens)
    for j, h in enumerate(comp.entropies):
        if rule.splits(len(node.path), node.start, t0 + j, h):
            node.tokens += comp.token_ids[:j]
            node.logprobs += comp.logprobs[:j]
            node.entropies += comp.entropies[:j]
            return "split"
    node.tokens += comp.token_ids
    node.logprobs += comp.logprobs
    node.entropies += comp.entropies
    done = comp.finish_reason == "stop" or len(node.tokens) >= cfg.max_new_tokens
    return "leaf" if done or not comp.token_ids else "more"


def _probe(gen, prompts, requests, probe_tokens: int, cfg: SamplingConfig):
    """One generate_entropy call per (n, max_new, min_new) among ``requests`` [(node, n)]: the
    completions of each request, in order."""
    calls: dict[tuple[int, int, int], list[int]] = {}
    for i, (node, n) in enumerate(requests):
        done = len(node.tokens)
        key = (n, min(probe_tokens, cfg.max_new_tokens - done), max(0, cfg.min_new_tokens - done))
        calls.setdefault(key, []).append(i)
    out: list = [None] * len(requests)
    for (n, new, least), idx in calls.items():
        nodes = [requests[i][0] for i in idx]
        comps = gen([list(prompts[x.prompt]) + x.tokens for x in nodes], n,
                    replace(cfg, max_new_tokens=new, min_new_tokens=least),
                    seeds=[_path_seed(cfg.seed, x.path) for x in nodes])
        for i, c in zip(idx, comps):
            out[i] = c
    return out


def sample_entropy_tree_generic(engine, prompts: Sequence[Sequence[int]], rule: EntropyRule,
                                probe_tokens: int, cfg: SamplingConfig, record: bool = False
                                ) -> list[list[TreeLeaf]]:
    """``--branch entropy`` through ``engine.generate_entropy`` (entropies estimated from the
    top ``rule.top_k`` log-probs): every running node is extended by probes of ``probe_tokens``
    tokens until its first split point (the probe's tokens from there on are dropped) or its end;
    a split asks for ``width`` completions of the node's prefix, one per child. Each node has its
    own seed (see ``_path_seed``), so nothing depends on batching. Leaves sorted by node path."""
    gen = _generator(engine, True, rule.top_k)
    leaves: list[list[TreeLeaf]] = [[] for _ in prompts]
    requests = [(_Path(i, (0,), [], [], [], [], 0), 1) for i in range(len(prompts))]
    while requests:
        nxt = []
        for (node, n), comps in zip(requests, _probe(gen, prompts, requests, probe_tokens, cfg)):
            for c, comp in enumerate(comps):
                kid = node if n == 1 else _Path(node.prompt, node.path + (c,), list(node.tokens),
                                                list(node.logprobs), list(node.entropies),
                                                node.ends + [len(node.tokens)], len(node.tokens))
                state = _absorb(kid, comp, rule, cfg)
                if state == "leaf":
                    reason = "stop" if comp.finish_reason == "stop" else "length"
                    leaves[kid.prompt].append(TreeLeaf(
                        kid.path, kid.tokens, kid.logprobs, kid.ends + [len(kid.tokens)], reason,
                        kid.entropies if record else None))
                else:
                    nxt.append((kid, rule.width if state == "split" else 1))
        requests = nxt
    for out in leaves:
        out.sort(key=lambda lf: lf.node_path)
    return leaves


# ----------------------------------------------------------------------------- records

def _rollout(rec: dict, engine, prompt_ids: list[int], sample_id: int, leaf: TreeLeaf,
             tree: bool, template: str, cfg: SamplingConfig) -> dict:
    out = {k: v for k, v in rec.items() if k != "id"}  # unknown prompt fields travel along
    out.update({
        "schema": SCHEMA,
        "prompt_id": rec["id"],
        "prompt": prompt_text(rec),
        "sample_id": sample_id,
        "prompt_token_ids": prompt_ids,
        "token_ids": list(leaf.token_ids),
        "text": engine.tokenizer.decode(list(leaf.token_ids), skip_special_tokens=True),
        "logprobs": [float(x) for x in leaf.logprobs],
        "node_path": list(leaf.node_path) if tree else [],
        "segment_ends": list(leaf.segment_ends) if tree else [],
        "finish_reason": leaf.finish_reason,
        **({"entropies": [float(x) for x in leaf.entropies]} if leaf.entropies is not None else {}),
        "temperature": float(cfg.temperature),  # as sampled: 0 = greedy (log-probs at T = 1)
        "top_p": float(cfg.top_p),
        "prompt_template": template_name(rec, template),
        "policy_version": int(getattr(engine, "policy_version", 0) or 0),
        "model": str(getattr(engine, "model_path", "")),
    })
    return out


def token_counts(records: Iterable[dict]) -> tuple[int, int]:
    """(unique, leaf) generated tokens of rollout records.

    ``leaf`` sums every response's length; ``unique`` counts each generated token once: a tree
    node's segment (identified by prompt and node path) is generated once however many leaves
    share it. Independent samples share nothing, so there both are equal. Token budgets and
    tokens/s use ``unique``: that is the sampling work done."""
    seen: set = set()
    unique = leaf = 0
    for r in records:
        toks, path, ends = len(r["token_ids"]), r.get("node_path") or [], r.get("segment_ends") or []
        leaf += toks
        if not path:
            unique += toks
            continue
        for k, end in enumerate(ends):
            key = (r["prompt_id"], tuple(path[:k + 1]))
            if key not in seen:
                seen.add(key)
                unique += end - (ends[k - 1] if k else 0)
    return unique, leaf


def _chunks(it: Iterable[dict], size: int) -> Iterator[list[tuple[int, dict]]]:
    buf: list[tuple[int, dict]] = []
    for i, rec in enumerate(it):
        buf.append((i, rec))
        if len(buf) >= size:
            yield buf
            buf = []
    if buf:
        yield buf


def _encode_chunk(chunk, tok, tmpl: str, chat_template, seen: SeenKeys, fields=None):
    """Validate and tokenise the prompt records of one engine call."""
    recs, ids = [], []
    for index, rec in chunk:
        try:
            rec = map_fields(rec, fields)
            check_prompt_record(rec)
            if not seen.add(rec["id"]):  # two groups with one prompt_id corrupt later stages
                raise DataError(f"prompt id {rec['id']!r} appears twice", field="id")
            ptoks = encode_prompt(tok, prompt_messages(rec, tmpl), chat_template)
            if not ptoks:
                raise DataError("encodes to no tokens", field="prompt")
        except DataError as e:
            e.index = index
            raise source_field(e, fields) from None
        recs.append(rec)
        ids.append(ptoks)
    return recs, ids


TreeSampler = Callable[..., "list[list[TreeLeaf]]"]
BRANCH_RULES: Registry[TreeSampler] = Registry("branch rule")


@BRANCH_RULES.register("segments")
def _segments_tree(engine, ids, opts, cfg: SamplingConfig, native: bool) -> list[list[TreeLeaf]]:
    """Every node gets ``width`` children of at most ``segment_tokens`` tokens."""
    fn = getattr(engine, "sample_tree", None) if native else None
    if fn is not None:
        extra = {"entropy": True} if opts.record_entropy else {}
        return fn(ids, width=opts.width, depth=opts.depth, segment_tokens=opts.segment_tokens,
                  cfg=cfg, **extra)
    return sample_tree_generic(engine, ids, opts.width, opts.depth, opts.segment_tokens, cfg,
                               opts.record_entropy)


@BRANCH_RULES.register("entropy")
def _entropy_tree(engine, ids, opts, cfg: SamplingConfig, native: bool) -> list[list[TreeLeaf]]:
    """Nodes split where the sampling entropy exceeds ``branch_entropy`` (``EntropyRule``)."""
    rule = EntropyRule(opts.width, opts.depth, opts.branch_entropy, opts.min_segment_tokens)
    fn = getattr(engine, "sample_entropy_tree", None) if native else None
    if fn is not None:
        return fn(ids, rule, cfg, record=opts.record_entropy)
    return sample_entropy_tree_generic(engine, ids, replace(rule, top_k=ENTROPY_TOP_K),
                                       opts.segment_tokens, cfg, opts.record_entropy)


def _sample_chunk(engine, ids, opts, cfg: SamplingConfig, native: bool) -> list[list[TreeLeaf]]:
    """Leaves per prompt: a tree (its branch rule, native or generic) or n independent samples."""
    if opts.mode == "tree":
        return BRANCH_RULES.get(opts.branch)(engine, ids, opts, cfg, native)
    exact = native and getattr(engine, "exact_entropy", False)
    gen = _generator(engine, opts.record_entropy, None if exact else ENTROPY_TOP_K)
    return [[TreeLeaf((j,), c.token_ids, c.logprobs, [], c.finish_reason, c.entropies)
             for j, c in enumerate(comps)] for comps in gen(ids, opts.n, cfg)]


def sample_records(engine, prompt_records: Iterable[dict], opts, *, seed: int = 0,
                   native: bool = True, fields=None,
                   on_group: Callable[[list[dict]], None] | None = None) -> Iterator[dict]:
    """Yield rollout records (DESIGN §3), one group of consecutive records per prompt, in input order.

    ``opts`` is a ``SampleOptions``: independent (``n`` samples per prompt) or tree mode
    (``width`` children per node; ``branch`` segments: ``depth`` levels of at most
    ``segment_tokens`` tokens, the last level runs to EOS or ``max_new_tokens``; ``branch``
    entropy: see ``EntropyRule``), ``prompts_per_batch`` prompts per engine call;
    ``record_entropy`` adds ``entropies``.
    A bad prompt record raises DataError with ``index`` = its 0-based position in the input.
    ``native=False`` forces the generic level-by-level tree even if the engine has ``sample_tree``.
    ``fields`` (PromptOptions) maps another schema's id/prompt/answer fields.
    """
    cfg = opts.engine_config(seed)
    tmpl = resolve_template(opts.prompt_template)
    seen = SeenKeys()
    for chunk in _chunks(prompt_records, opts.prompts_per_batch):
        recs, ids = _encode_chunk(chunk, engine.tokenizer, tmpl, opts.chat_template, seen, fields)
        trees = _sample_chunk(engine, ids, opts, cfg, native)
        for rec, ptoks, leaves in zip(recs, ids, trees):
            group = [_rollout(rec, engine, ptoks, j, leaf, opts.mode == "tree",
                              opts.prompt_template, cfg) for j, leaf in enumerate(leaves)]
            if on_group is not None:
                on_group(group)
            yield from group
