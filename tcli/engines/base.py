"""The engine contract shared by sample-tree, eval and loop, and the tree samplers every engine
gets from it.

An engine turns token-id prompts into completions with behaviour-policy log-probs. Tree sampling is
expressed with the same call: the frontier's prefixes (prompt + tokens so far) are the prompts of
the next level, so any engine with prefix caching shares work between siblings. ``Engine`` carries
these generic samplers; the ``hf`` engine overrides them with native ones that fork KV caches.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace
from typing import Optional, Sequence

from tcli.engines.sampling import (ENTROPY_TOP_K, Completion, EntropyRule,  # noqa: F401
                                   SamplingConfig, ToolPlan, TreeLeaf, logprob_temperature,
                                   topk_entropy)
from tcli.errors import UsageError


class Engine:
    """Base of the engines: ``generate`` is theirs; entropies, trees and independent samples
    default to what ``generate`` (and ``generate_entropy``) can give."""

    name: str
    model_path: str
    policy_version: int
    exact_entropy = False   # generate_entropy(top_k=None) gives exact entropies
    max_positions: Optional[int] = None  # prompt + response tokens the model can take, if known

    @property
    def tokenizer(self):
        raise NotImplementedError

    def generate(self, prompts: Sequence[Sequence[int]], n: int, cfg: SamplingConfig
                 ) -> list[list[Completion]]:
        """n completions for each prompt (token ids), in order."""
        raise NotImplementedError

    def generate_entropy(self, prompts: Sequence[Sequence[int]], n: int, cfg: SamplingConfig, *,
                         top_k: Optional[int] = ENTROPY_TOP_K,
                         seeds: Optional[Sequence[int]] = None) -> list[list[Completion]]:
        """``generate``, and every Completion also carries ``entropies``: one float per token.

        Contract (sample-tree's ``--branch entropy`` on engines without a native entropy tree,
        and ``--record-entropy``, rely on it):

        - ``entropies[t]`` is the *sampling entropy* of token t: the entropy in nats of
          softmax(logits_t / T), T = ``logprob_temperature(cfg.temperature)`` -- the distribution
          whose log-probs ``logprobs`` records: before top-p and before the min-tokens EOS mask.
        - It is ``topk_entropy`` of the ``top_k`` largest of those log-probs (a lower bound of
          the exact entropy, equal when the top k hold all the mass), or the exact entropy when
          ``top_k`` is None or covers the vocabulary. An engine that cannot return ``top_k``
          log-probs per token raises UsageError (never a different estimate silently).
        - ``seeds``: one per prompt; prompt i's random stream is a function of ``seeds[i]`` and
          its token ids alone (None: ``cfg.seed`` for every prompt). Callers give distinct seeds
          to identical prefixes that must not share samples (e.g. sibling tree nodes).
        - Everything else is ``generate``'s: n completions per prompt in order, same token,
          log-prob and finish semantics; a prompt's output does not depend on the other prompts.

        An engine without entropies keeps this default: a usage error.
        """
        raise UsageError(f"the {self.name} engine gives no sampling entropies (generate_entropy)")

    def continue_prefixes(self, prompts: Sequence[Sequence[int]],
                          prefixes: Sequence[Sequence[int]], cfg: SamplingConfig, *,
                          seeds: Sequence[int], entropy: bool = False) -> list[Completion]:
        """One continuation of each response prefix (expand-tree, docs/design.md §4.17).

        Request i continues ``prompts[i] + prefixes[i]``; ``cfg.max_new_tokens`` and
        ``min_new_tokens`` count from the response's start, so it gets at most
        ``max_new_tokens - len(prefixes[i])`` tokens (>= 1). Its random stream is a function of
        ``seeds[i]`` and its tokens alone (``cfg.seed`` is not used), so nothing depends on
        batching. ``entropy``: every Completion carries ``entropies`` of its new tokens.
        Generic: one ``generate`` call per request (``generate_entropy`` per length when
        entropies are wanted, whose contract takes per-prompt seeds)."""
        out: list = [None] * len(prompts)
        for sub, idx in by_room(prefixes, cfg):
            full = [list(prompts[i]) + list(prefixes[i]) for i in idx]
            if entropy:
                comps = self.generate_entropy(full, 1, sub, seeds=[seeds[i] for i in idx])
                for i, c in zip(idx, comps):
                    out[i] = c[0]
                continue
            for i, ids in zip(idx, full):
                out[i] = self.generate([ids], 1, replace(sub, seed=int(seeds[i])))[0][0]
        return out

    def load_weights(self, model_dir: str, policy_version: int) -> None:
        """Switch to new weights (after a train step) and drop any cached prefixes."""
        raise NotImplementedError

    def follow(self, trainer) -> None:
        """Sample from the trainer's current weights from now on (after each train step)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ samplers

    def sample_with_tools(self, prompts: Sequence[Sequence[int]], plan: ToolPlan,
                          cfg: SamplingConfig, *, entropy: bool = False) -> list[list[TreeLeaf]]:
        """Multi-turn episodes with tool calls (``ToolPlan``; docs/design.md §5.8). Engines
        without their own refuse."""
        raise UsageError(f"the {self.name} engine cannot sample with tools (--tools): use the "
                         "hf engine")

    def sample_independent(self, prompts: Sequence[Sequence[int]], n: int, cfg: SamplingConfig,
                           *, entropy: bool = False, native: bool = True) -> list[list[TreeLeaf]]:
        """n independent samples per prompt as one-node leaves; ``entropy`` records exact
        entropies where the engine has them (``native``), else the top-k estimate."""
        exact = native and self.exact_entropy
        gen = _generator(self, entropy, None if exact else ENTROPY_TOP_K)
        return [[TreeLeaf((j,), c.token_ids, c.logprobs, [], c.finish_reason, c.entropies)
                 for j, c in enumerate(comps)] for comps in gen(prompts, n, cfg)]

    def sample_tree(self, prompts: Sequence[Sequence[int]], width: int, depth: int,
                    segment_tokens: int, cfg: SamplingConfig, *, entropy: bool = False
                    ) -> list[list[TreeLeaf]]:
        """``width`` children per node, segments of at most ``segment_tokens`` (generic)."""
        return sample_tree_generic(self, prompts, width, depth, segment_tokens, cfg, entropy)

    def sample_entropy_tree(self, prompts: Sequence[Sequence[int]], rule: EntropyRule,
                            cfg: SamplingConfig, record: bool = False, *,
                            probe_tokens: int) -> list[list[TreeLeaf]]:
        """Splits where the sampling entropy exceeds the rule's threshold (generic: top-k
        estimates from probes of ``probe_tokens`` tokens)."""
        return sample_entropy_tree_generic(self, prompts, replace(rule, top_k=ENTROPY_TOP_K),
                                           probe_tokens, cfg, record)


class Adapted(Engine):
    """An engine registered as a plain class with ``generate`` (and perhaps
    ``generate_entropy``), given the base's samplers; its other attributes pass through."""

    def __init__(self, inner):
        self.inner = inner
        self.name = getattr(inner, "name", type(inner).__name__)

    def __getattr__(self, attr: str):
        if attr == "inner":  # not set yet (e.g. while copying): no recursion through itself
            raise AttributeError(attr)
        return getattr(self.inner, attr)

    @property
    def tokenizer(self):
        return self.inner.tokenizer

    def generate(self, prompts, n, cfg):
        return self.inner.generate(prompts, n, cfg)

    def generate_entropy(self, prompts, n, cfg, *, top_k=ENTROPY_TOP_K, seeds=None):
        own = getattr(type(self.inner), "generate_entropy", None)
        if own is None:
            return super().generate_entropy(prompts, n, cfg, top_k=top_k, seeds=seeds)
        return own(self.inner, prompts, n, cfg, top_k=top_k, seeds=seeds)


def as_engine(engine) -> Engine:
    """``engine`` itself, or a plain class's instance adapted to the base (``Adapted``)."""
    return engine if isinstance(engine, Engine) else Adapted(engine)


# ----------------------------------------------------------------------------- tree on any engine

def by_room(prefixes: Sequence[Sequence[int]], cfg: SamplingConfig
            ) -> list[tuple[SamplingConfig, list[int]]]:
    """Continuation requests grouped by the settings of their engine call: the tokens left to
    each (``max_new_tokens`` minus its prefix) and its share of ``min_new_tokens``."""
    calls: dict[tuple[int, int], list[int]] = {}
    for i, p in enumerate(prefixes):
        room = cfg.max_new_tokens - len(p)
        if room < 1:
            raise ValueError(f"prefix #{i} leaves no room: {len(p)} of {cfg.max_new_tokens} "
                             "tokens")
        calls.setdefault((room, max(0, cfg.min_new_tokens - len(p))), []).append(i)
    return [(replace(cfg, max_new_tokens=room, min_new_tokens=least), idx)
            for (room, least), idx in calls.items()]


def _level_seed(seed: int, level: int) -> int:
    return (seed * 1_000_003 + level) & 0x7FFFFFFF


def _generator(engine: Engine, record: bool, top_k: Optional[int] = ENTROPY_TOP_K):
    """``engine.generate``, or ``generate_entropy`` when entropies are wanted (UsageError if the
    engine has none); ``top_k`` None asks for exact entropies."""
    if not record:
        return engine.generate
    fn = engine.generate_entropy
    return lambda prompts, n, cfg, seeds=None: fn(prompts, n, cfg, top_k=top_k, seeds=seeds)


def _same_prefix(frontier: list) -> dict[int, list[list]]:
    """Frontier nodes grouped by (prompt, tokens so far), the groups keyed by their size.

    Nodes with the same prefix are one engine request asking for ``width`` children per node:
    an engine's stream is a function of the seed and the prompt tokens only, so separate requests
    for them would give every such node the same children (siblings that drew the same segment
    must still diverge, docs/design.md §4.6)."""
    same: dict[tuple, list] = {}
    for f in frontier:
        same.setdefault((f[0], tuple(f[2])), []).append(f)
    by_size: dict[int, list[list]] = {}
    for group in same.values():
        by_size.setdefault(len(group), []).append(group)
    return by_size


def sample_tree_generic(engine: Engine, prompts: Sequence[Sequence[int]], width: int, depth: int,
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
        nxt = []
        for size, groups in _same_prefix(frontier).items():
            outs = gen([list(prompts[g[0][0]]) + g[0][2] for g in groups], width * size, lvl)
            for group, comps in zip(groups, outs):
                for k, node in enumerate(group):
                    nxt += _grow(node, comps[k * width:(k + 1) * width], level == depth, cfg,
                                 record, leaves)
        frontier = nxt
    for out in leaves:
        out.sort(key=lambda lf: lf.node_path)
    return leaves


def _grow(node, comps, last: bool, cfg: SamplingConfig, record: bool, leaves) -> list:
    """The children of a frontier node from its completions: leaves go to ``leaves``; returns
    the children still running."""
    p, path, toks, lps, ends, ents = node
    nxt = []
    for c, comp in enumerate(comps):
        t2 = toks + list(comp.token_ids)
        l2 = lps + list(comp.logprobs)
        e2 = ends + [len(t2)]
        h2 = ents + list(comp.entropies) if record else None
        stop = comp.finish_reason == "stop"
        if stop or last or len(t2) >= cfg.max_new_tokens or not comp.token_ids:
            reason = "stop" if stop else "length"
            leaves[p].append(TreeLeaf(path + (c,), t2, l2, e2, reason, h2))
        else:
            nxt.append((p, path + (c,), t2, l2, e2, h2))
    return nxt


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


def sample_entropy_tree_generic(engine: Engine, prompts: Sequence[Sequence[int]],
                                rule: EntropyRule, probe_tokens: int, cfg: SamplingConfig,
                                record: bool = False) -> list[list[TreeLeaf]]:
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
