"""The expand stage (docs/design.md §4.17): more children where a sampled tree's outcomes diverge.

A verified tree-sampled group (sample-tree in a tree mode, then verify) gets an extra budget of
sampled tokens. Its candidate nodes are the inner nodes where the tree already branches (two or
more children: a node with one child has the same leaves as that child). Each round ranks them:
nodes whose leaves have mixed rewards first, by the variance of those rewards (p(1 - p) for 0/1
rewards), then by the sampling entropy recorded at the node (of its children's first token, when
the records carry ``entropies``), then deeper first; a node given children in an earlier round
goes after those of its class that were not. Walking that order, a node gets up to ``width`` new
children while the budget left covers their longest continuation, so a prompt never spends more
than its budget; what continuations that stopped early leave goes to the next round.

A new child continues the node's prefix (copied, with its log-probs, from a leaf below it) to EOS
or the records' ``max_new_tokens``, as one segment: ``node_path`` = the node's path + a child
index after its existing ones, ``segment_ends`` = the node's ends + the new length, so TEMPO and
TreeRPO read the expanded tree unchanged. New records carry no reward (verify scores them) and
``expand_round``; each child's random stream is a function of (seed, prompt tokens, node path,
child index), so the output does not depend on batching.

No torch here: the engine is given.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from typing import Iterable, Iterator

import numpy as np

from tcli import SCHEMA
from tcli.engines.base import as_engine
from tcli.engines.sampling import Completion, SamplingConfig
from tcli.errors import DataError
from tcli.models.provenance import sampler_name
from tcli.records import (at_record, check_in_vocab, entropies, float_array, int_list, reward,
                          token_array)

# what belongs to one response: a new leaf gets its own, never its source leaf's
RESPONSE_FIELDS = frozenset({
    "sample_id", "token_ids", "text", "logprobs", "node_path", "segment_ends", "finish_reason",
    "entropies", "reward", "verdict", "rewards", "verdicts", "values", "branch", "advantages",
    "estimator", "overlong_penalty", "critic_values", "returns", "loss_mask", "turns",
    "ref_logprobs", "old_logprobs", "expand_round", "policy_version", "model"})


@dataclass
class Node:
    """An inner node of a group's tree: a candidate for new children."""

    path: tuple[int, ...]
    prefix: int            # response tokens before its children (its segment_ends entry)
    depth: int             # segment_ends entries of its prefix
    source: int            # the first leaf below it (in group order): prefix copied from it
    rewards: list[float] = field(default_factory=list)
    kids: set = field(default_factory=set)
    variance: float = 0.0  # population variance of its leaves' rewards (scaled, see read_tree)
    entropy: float | None = None
    chosen: int = 0        # rounds that gave it children

    @property
    def mixed(self) -> bool:
        return len(set(self.rewards)) > 1

    def key(self) -> tuple:
        """Sort key: mixed first, fewer rounds, larger variance, larger entropy, deeper."""
        return (not self.mixed, self.chosen, -self.variance, self.entropy is None,
                -(self.entropy or 0.0), -len(self.path), self.path)


@dataclass
class Tree:
    """One prompt's verified group, read for expansion."""

    records: list[dict]
    prompt: list[int]
    tokens: list[list[int]]
    ends: list[list[int]]
    cfg: SamplingConfig            # temperature, top_p and cap of the group's sampling
    entropy: bool                  # every record carries entropies: new ones do too
    nodes: list[Node]
    next_id: int
    spent: int = 0
    added: list[dict] = field(default_factory=list)


def _number(rec: dict, name: str) -> float:
    v = rec.get(name)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise DataError(f"must be a finite number, got {v!r}", field=name)
    return v


def _leaf(rec: dict) -> tuple[list[int], tuple[int, ...], list[int]]:
    """A record's tokens, node path and segment ends, checked against each other."""
    toks = token_array(rec).tolist()
    path, ends = tuple(int_list(rec, "node_path")), int_list(rec, "segment_ends")
    if not path:
        raise DataError("expand-tree needs tree-sampled records (node_path is empty); sample "
                        "with `tcli sample-tree --mode tree`", field="node_path")
    if len(ends) != len(path):
        raise DataError(f"has {len(ends)} entries but node_path has {len(path)}",
                        field="segment_ends")
    if ends[0] < 0 or ends[-1] != len(toks) or any(b <= a for a, b in zip(ends, ends[1:])):
        raise DataError(f"must be increasing and end at len(token_ids) = {len(toks)}",
                        field="segment_ends")
    float_array(rec, "logprobs", len(toks))
    mask = rec.get("loss_mask")
    if isinstance(mask, list) and 0 in mask:
        raise DataError("holds environment tokens (0); expand-tree continues sampled trees "
                        "only", field="loss_mask")
    return toks, path, ends


def _prompt(recs: list[dict], vocab: int | None) -> list[int]:
    """The group's prompt tokens, the same in every record: new leaves continue it, and each
    keeps its source leaf's prompt fields, so another prompt there would be wrong silently."""
    first = None
    for i, rec in enumerate(recs):
        with at_record(i):
            ids = token_array(rec, "prompt_token_ids").tolist()
            if first is None:
                check_in_vocab(ids, vocab, "prompt_token_ids")
                first = ids
            elif ids != first:
                raise DataError("differs from the group's first record's: one prompt's tree "
                                "has one prompt", field="prompt_token_ids")
    return first or []


def _settings(recs: list[dict]) -> SamplingConfig:
    """The group's sampling settings, the same in every record."""
    first = None
    for i, rec in enumerate(recs):
        with at_record(i):
            got = tuple(_number(rec, k) for k in ("temperature", "top_p", "max_new_tokens"))
            if first is not None and got != first:
                raise DataError(f"sampling settings (temperature, top_p, max_new_tokens) {got} "
                                f"differ from the group's first record's {first}",
                                field="temperature")
            first = got
    t, p, cap = first
    return SamplingConfig(temperature=float(t), top_p=float(p), max_new_tokens=int(cap))


def _nodes(tokens, paths, ends, rewards) -> list[Node]:
    """Every inner node with two or more children; a leaf below a node must share its prefix."""
    nodes: dict[tuple[int, ...], Node] = {}
    leaves: dict[tuple[int, ...], int] = {}
    for i, (toks, path, e) in enumerate(zip(tokens, paths, ends)):
        with at_record(i):
            if path in leaves:
                raise DataError(f"two responses share the leaf node_path {list(path)}",
                                field="node_path")
            leaves[path] = i
            for k in range(len(path)):
                at = path[:k]
                node = nodes.setdefault(at, Node(at, e[k - 1] if k else 0, k, i))
                src = node.source
                if ends[src][:k] != e[:k] or tokens[src][:node.prefix] != toks[:node.prefix]:
                    raise DataError(f"node {list(at)} has another prefix here than in the "
                                    f"group's record #{src}", field="segment_ends")
                node.rewards.append(rewards[i])
                node.kids.add(path[k])
    for path, i in leaves.items():
        if path in nodes:
            with at_record(i):
                raise DataError(f"node_path {list(path)} is a leaf and also has children",
                                field="node_path")
    return [n for n in nodes.values() if len(n.kids) >= 2]


def read_tree(recs: list[dict], vocab: int | None = None) -> Tree:
    """Validate a group and find its candidate nodes (DataError with the record's index).
    ``vocab``: the model's vocabulary size, which every prompt and prefix token must fit."""
    tokens, paths, ends, rewards, ents = [], [], [], [], []
    prompt = _prompt(recs, vocab)
    for i, rec in enumerate(recs):
        with at_record(i):
            toks, path, e = _leaf(rec)
            check_in_vocab(toks, vocab, "token_ids")
            rewards.append(reward(rec))
            ents.append(entropies(rec, len(toks)))
        tokens.append(toks)
        paths.append(path)
        ends.append(e)
    cfg = _settings(recs)
    nodes = _nodes(tokens, paths, ends, rewards)
    top = max(1.0, float(np.abs(rewards).max()))  # variances in comparable, finite units
    with_ent = all(x is not None for x in ents)
    for n in nodes:
        n.variance = float(np.var(np.asarray(n.rewards) / top))
        src = ents[n.source]
        n.entropy = float(src[n.prefix]) if with_ent and n.prefix < len(src) else None
    ids = [r["sample_id"] for r in recs if isinstance(r.get("sample_id"), int)]
    return Tree(recs, prompt, tokens, ends, cfg, with_ent, nodes, max(ids, default=-1) + 1)


def plan_round(tree: Tree, budget: int, width: int) -> list[tuple[Node, int]]:
    """This round's (node, child index) pairs: the ranked nodes, each given up to ``width``
    children whose longest continuations the budget left still covers."""
    left = budget - tree.spent
    out = []
    for node in sorted(tree.nodes, key=Node.key):
        room = tree.cfg.max_new_tokens - node.prefix
        k = min(width, left // room) if room > 0 else 0
        if k <= 0:
            continue
        left -= k * room
        node.chosen += 1
        start = max(node.kids) + 1
        node.kids.update(range(start, start + k))
        out += [(node, c) for c in range(start, start + k)]
    return out


def child_seed(seed: int, prompt: list[int], path: tuple[int, ...], child: int) -> int:
    """The random-stream seed of a new child: (seed, prompt tokens, node path, child index)."""
    h = hashlib.blake2b(digest_size=8, person=b"tcli-expand")
    h.update(int(seed).to_bytes(16, "little", signed=True))
    h.update(len(prompt).to_bytes(8, "little"))
    h.update(np.asarray(prompt, dtype=np.int64).tobytes())
    h.update(",".join(map(str, (*path, child))).encode())
    return int.from_bytes(h.digest(), "little") >> 2


def new_record(tree: Tree, node: Node, child: int, comp: Completion, engine, rnd: int) -> dict:
    """The rollout of a new leaf: the source leaf's prompt fields, its own response fields."""
    src = tree.records[node.source]
    toks = tree.tokens[node.source][:node.prefix] + list(comp.token_ids)
    out = {k: v for k, v in src.items() if k not in RESPONSE_FIELDS}
    out.update({
        "schema": SCHEMA,
        "sample_id": tree.next_id,
        "token_ids": toks,
        "text": engine.tokenizer.decode(toks, skip_special_tokens=True),
        "logprobs": [float(x) for x in src["logprobs"][:node.prefix]]
        + [float(x) for x in comp.logprobs],
        "node_path": [*node.path, child],
        "segment_ends": tree.ends[node.source][:node.depth] + [len(toks)],
        "finish_reason": "stop" if comp.finish_reason == "stop" else "length",
        "policy_version": int(getattr(engine, "policy_version", 0) or 0),
        "model": sampler_name(str(getattr(engine, "model_path", ""))),
        "expand_round": rnd,
    })
    if tree.entropy:
        out["entropies"] = ([float(x) for x in src["entropies"][:node.prefix]]
                            + [float(x) for x in comp.entropies or []])
    tree.next_id += 1
    return out


@dataclass
class ExpandStats:
    """What the stage spent: per prompt a budget, in sampled tokens."""

    prompts: int = 0
    requested: int = 0
    spent: int = 0
    leaves: int = 0
    nodes: int = 0          # (node, round) pairs that got children
    mixed_tokens: int = 0   # tokens sampled below nodes whose leaves had mixed rewards

    def summary(self) -> dict:
        return {"expand_tokens": self.spent, "expand_leaves": self.leaves,
                "expand_requested": self.requested,
                "expand_mixed_share": self.mixed_tokens / self.spent if self.spent else 0.0}

    def line(self) -> str:
        share = self.summary()["expand_mixed_share"]
        return (f"expand-tree: {self.prompts} prompts, {self.leaves} new leaves at "
                f"{self.nodes} nodes, sampled {self.spent} of {self.requested} tokens requested "
                f"({share:.0%} below nodes with mixed rewards)")


def _sample_round(engine, requests: list[tuple[Tree, Node, int]], seed: int, min_new: int
                  ) -> list[Completion]:
    """One continuation per (tree, node, child): one engine call per sampling setting."""
    calls: dict[tuple, list[int]] = {}
    for i, (tree, _, _) in enumerate(requests):
        c = tree.cfg
        calls.setdefault((c.temperature, c.top_p, c.max_new_tokens, tree.entropy), []).append(i)
    out: list = [None] * len(requests)
    for (t, p, cap, ent), idx in calls.items():
        cfg = SamplingConfig(temperature=t, top_p=p, max_new_tokens=cap, min_new_tokens=min_new,
                             seed=seed)
        picked = [requests[i] for i in idx]
        comps = engine.continue_prefixes(
            [tree.prompt for tree, _, _ in picked],
            [tree.tokens[node.source][:node.prefix] for tree, node, _ in picked], cfg,
            seeds=[child_seed(seed, tree.prompt, node.path, c) for tree, node, c in picked],
            entropy=ent)
        for i, comp in zip(idx, comps):
            out[i] = comp
    return out


def _expand_chunk(engine, chunk: list[Tree], opts, seed: int, min_new: int,
                  stats: ExpandStats) -> None:
    """Up to ``opts.rounds`` rounds over the trees of one engine batch; new records go to each
    tree's ``added``."""
    sampler = as_engine(engine)
    for rnd in range(1, opts.rounds + 1):
        requests = [(t, n, c) for t in chunk for n, c in plan_round(t, opts.tokens, opts.width)]
        if not requests:
            break
        comps = _sample_round(sampler, requests, seed, min_new)
        stats.nodes += len({(id(t), n.path) for t, n, _ in requests})
        for (tree, node, c), comp in zip(requests, comps):
            tree.added.append(new_record(tree, node, c, comp, engine, rnd))
            n = len(comp.token_ids)
            tree.spent += n
            stats.spent += n
            stats.mixed_tokens += n if node.mixed else 0
            stats.leaves += 1
    stats.prompts += len(chunk)
    stats.requested += opts.tokens * len(chunk)


def expand_groups(engine, groups: Iterable[list[dict]], opts, *, seed: int = 0,
                  min_new_tokens: int = 0, groups_per_call: int = 16,
                  stats: ExpandStats | None = None,
                  vocab: int | None = None) -> Iterator[list[dict]]:
    """Yield each group's records (unchanged) followed by its new leaves, in input order.

    ``opts`` is an ``ExpandOptions`` (tokens per prompt, width, rounds); ``groups_per_call``
    groups share each engine call (the output does not depend on it). A bad group raises
    DataError with ``index`` = the record's index in it, when that group is read (before any
    of its chunk is sampled); ``vocab`` (the model's vocabulary size) bounds the token ids."""
    stats = stats if stats is not None else ExpandStats()
    it = iter(groups)
    while True:
        chunk = []
        for recs in it:
            chunk.append(read_tree(recs, vocab))
            if len(chunk) >= groups_per_call:
                break
        if not chunk:
            return
        _expand_chunk(engine, chunk, opts, seed, min_new_tokens, stats)
        for tree in chunk:
            yield tree.records + tree.added
