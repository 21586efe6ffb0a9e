"""Multi-turn sampling with tool calls on the hf engine (docs/design.md §5.8).

Every row of the batch is an episode: the policy samples until its text ends with one of the
toolset's stop strings, the toolset runs the call (``step``) and its observation text is tokenized
and appended as environment tokens (``loss_mask`` 0, log-prob 0.0, docs/design.md §3.6), then the
policy goes on. Observation tokens are fed through the same one-token decode step as sampled ones,
one per step, while the other rows keep decoding: the KV cache grows by one column per step for
every row (no holes, nothing recomputed), and a row's logits are those of a teacher-forced forward
over its whole trajectory. The tool calls of all rows that paused at a step run between two
steps, at once in threads when there are several.

A trajectory ends at EOS (``stop``), when a stop string holds no call (``step`` gives None:
``stop``), at ``cfg.max_new_tokens`` tokens, policy and environment tokens together (``length``;
an observation is cut to the room left), or at a call beyond ``max_turns`` (``length``: the call
is not run).

Randomness is the hf engine's counter-based stream (engines/rng.py): token t of an episode uses
uniforms(key, t), t the position in the trajectory, so an episode that never calls a tool is the
plain sample of the same seed, and nothing depends on batching. With ``width`` > 1 and
``depth`` > 1 (``--branch tool``) a row whose observation has just been fed splits into ``width``
children by gathering its cache row (engines/hf.py ``select``), each with its own stream.

With a host check every k tokens (``engine.stop_every`` > 1, the graphed CUDA path) a block of k
tokens is drawn on the device, queued observation tokens in place of sampled ones, and read back
once; what a row drew after a call, its end or the observation it splits after is taken back
(``_decode_blocks``). The episodes are the same.

Imports torch: import this module only where an engine is created.
"""

from __future__ import annotations

import os
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

from tcli.engines.blocks import draw_block, keep_drawn
from tcli.engines.rng import uniforms_at
from tcli.engines.rows import Node, Rows
from tcli.engines.sampling import SamplingConfig, ToolPlan, TreeLeaf


@dataclass
class Episode(Node):
    """A row's trajectory: the node's tokens plus what the turns add."""

    mask: list[int] = field(default_factory=list)      # 1 policy token, 0 environment token
    turns: list[dict] = field(default_factory=list)    # Turn.as_record() per call
    errors: int = 0                                    # calls whose Turn has an error
    turn_start: int = 0                                # where the policy's current turn starts
    queue: deque = field(default_factory=deque)        # observation tokens still to feed
    fresh: bool = False                                # an observation was just fed: may split
    call: str = ""                                     # the turn text of a call to run

    @classmethod
    def of(cls, node: Node, **extra) -> "Episode":
        return cls(**{k: getattr(node, k) for k in Node.__dataclass_fields__}, **extra)

    def child(self, c: int) -> "Episode":
        return Episode.of(Node.child(self, c), mask=list(self.mask), turns=list(self.turns),
                          errors=self.errors, turn_start=self.turn_start)

    def add(self, tok: int, lp: float, policy: int, entropy: float) -> None:
        self.tokens.append(int(tok))
        self.logprobs.append(float(lp))
        self.mask.append(policy)
        if self.entropies is not None:
            self.entropies.append(float(entropy))

    def leaf(self, reason: str) -> TreeLeaf:
        self.ends.append(len(self.tokens))
        return TreeLeaf(self.path, self.tokens, self.logprobs, self.ends, reason, self.entropies,
                        self.mask, self.turns, self.errors)


_CUT = "\ufffd"  # what decoding gives for the bytes of a character cut between tokens


class StopScan:
    """Finds a stop string completed by a turn's newest token, decoding only the tail."""

    def __init__(self, tokenizer, stops: Sequence[str]):
        self.tokenizer = tokenizer
        self.stops = tuple(s for s in stops if s)
        # a stop string of L UTF-8 bytes spans at most L tokens (+2 for merges at either end):
        # every token holds a byte at least, and a byte-level one may hold part of a character
        self.window = max((len(s.encode("utf-8")) for s in self.stops), default=0) + 2
        # a stop string ends in a token only if the token's text holds its last character
        # (not checkable that way for a whitespace last character: always decode then). A
        # non-ASCII one may end in a token holding only its last bytes, decoded as U+FFFD
        self.last = {s[-1] for s in self.stops}
        self.any_token = any(c.isspace() for c in self.last)
        self.partial = any(not c.isascii() for c in self.last)
        self.may_end: dict[int, bool] = {}

    def decode(self, ids) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=False)

    def _may_end(self, tok: int) -> bool:
        hit = self.may_end.get(tok)
        if hit is None:
            text = self.decode([tok])
            hit = self.may_end[tok] = (self.any_token or any(c in text for c in self.last)
                                       or (self.partial and _CUT in text))
        return hit

    def call_text(self, tokens: list[int], start: int) -> str | None:
        """The turn text ``tokens[start:]`` up to the end of the first stop string that ends in
        the newest token, or None when there is none."""
        if not self.stops or len(tokens) <= start or not self._may_end(tokens[-1]):
            return None
        lo = max(start, len(tokens) - self.window)
        tail = self.decode(tokens[lo:])
        # (a character cut before the newest token decodes as U+FFFD there, whole in ``tail``)
        before = len(self.decode(tokens[lo:-1]).rstrip(_CUT)) if len(tokens) - 1 > lo else 0
        ends = [i + len(s) for s in self.stops
                if (i := tail.find(s, max(0, before - len(s) + 1))) >= 0]
        if not ends:
            return None
        text = self.decode(tokens[start:])
        return text[:len(text) - (len(tail) - min(ends))]


def sample_with_tools(engine, prompts: Sequence[Sequence[int]], plan: ToolPlan,
                      cfg: SamplingConfig, record: bool = False) -> list[list[TreeLeaf]]:
    """Leaves per prompt, sorted by node path: ``plan.width`` episodes per prompt (a tree when
    ``plan.depth`` > 1); ``record``: entropies per token (0.0 on environment tokens)."""
    leaves: list[list[TreeLeaf]] = [[] for _ in prompts]
    if cfg.max_new_tokens <= 0:   # nothing to sample: empty episodes, as sample_tree gives
        for out in leaves:
            out.extend(TreeLeaf((c,), [], [], [0], "length", [] if record else None, [], [])
                       for c in range(plan.width))
        return leaves
    scan = StopScan(engine.tokenizer, plan.toolset.stop_strings)
    grow = plan.width ** (plan.depth - 1)   # rows a first-level row may become
    decode, room = _decode, 0
    if engine.stop_every > 1:  # drawing ahead wastes < k columns per call or split on a path
        decode, room = _decode_blocks, (plan.max_turns + plan.depth) * engine.stop_every
    with torch.inference_mode():
        for chunk in engine.prefill_chunks(prompts, plan.width * grow, cfg.max_new_tokens):
            root = engine.prefill(prompts, chunk, cfg.seed, None, record)
            root.nodes = [Episode.of(n) for n in root.nodes]
            pairs = [(r, c) for r in range(len(chunk)) for c in range(plan.width)]
            per = max(1, engine.batch_tokens // ((root.mask.shape[1] + cfg.max_new_tokens) * grow))
            if engine._graphs is not None:   # pieces the graph pool holds
                per = min(per, engine._graphs.max_rows)
            for k in range(0, len(pairs), per):   # rows are independent: any pieces will do
                st = engine.fork(root, pairs[k:k + per], cfg.max_new_tokens + room)
                decode(engine, st, plan, scan, cfg, leaves, record)
    for out in leaves:
        out.sort(key=lambda lf: lf.node_path)
    return leaves


def _draw(engine, st: Rows, cfg: SamplingConfig, record: bool):
    """Every row's sampled token at its own trajectory position: tokens, log-probs, entropies."""
    steps = np.fromiter((len(n.tokens) for n in st.nodes), dtype=np.int64, count=len(st.nodes))
    u = None
    if cfg.temperature > 0:
        u = torch.from_numpy(uniforms_at(st.keys(), steps)).to(st.logits.device)
    ents = engine.entropies(st.logits, cfg) if record else [0.0] * len(st.nodes)
    tok, lp = engine._sample(st.logits, None, steps, cfg, u=u)
    return tok.tolist(), lp.tolist(), ents


def _take(ep: Episode, tok: int, lp: float, ent: float, eos: set, scan: StopScan,
          cap: int) -> str | None:
    """Append this step's token to ``ep``: its next observation token when one is queued, else
    the sampled one. Returns "stop" or "length" when the episode ends, "call" when the sampled
    token completed a tool call, else None."""
    if ep.queue:
        ep.add(ep.queue.popleft(), 0.0, 0, 0.0)
        if len(ep.tokens) >= cap:
            return "length"
        if not ep.queue:
            ep.turn_start, ep.fresh = len(ep.tokens), True
        return None
    ep.add(tok, lp, 1, ent)
    if tok in eos:
        return "stop"
    if len(ep.tokens) >= cap:
        return "length"
    text = scan.call_text(ep.tokens, ep.turn_start)
    if text is None:
        return None
    ep.call = text
    return "call"


def _run_calls(steps: list[tuple[Episode, object]], plan: ToolPlan) -> list:
    """``toolset.step`` of every paused row's call text, in row order: at once in threads when
    there are several (a call is independent work, e.g. its own python subprocess, so the order
    in which they finish changes nothing)."""
    texts = [ep.call for ep, _ in steps]
    if len(texts) == 1:
        return [plan.toolset.step(texts[0])]
    with ThreadPoolExecutor(max_workers=min(len(texts), os.cpu_count() or 1)) as pool:
        return list(pool.map(plan.toolset.step, texts))


def _calls(eps: list[Episode], plan: ToolPlan, tokenizer, cap: int) -> list[str | None]:
    """Run the tool calls of the rows ``eps`` and queue their observations. Per row: "stop" or
    "length" when its episode ends instead (no call in the text; the turn limit reached), else
    None."""
    ends: list[str | None] = ["length" if len(ep.turns) >= plan.max_turns else None for ep in eps]
    todo = [(ep, k) for k, ep in enumerate(eps) if ends[k] is None]
    for (ep, k), turn in zip(todo, _run_calls(todo, plan) if todo else []):
        ep.call = ""
        if turn is None:
            ends[k] = "stop"
            continue
        ep.turns.append(turn.as_record())
        ep.errors += turn.error is not None
        ids = tokenizer(plan.toolset.observation(turn), add_special_tokens=False)["input_ids"]
        ep.queue.extend(ids[:cap - len(ep.tokens)])
        if not ep.queue:
            ep.turn_start, ep.fresh = len(ep.tokens), True
    return ends


def _split(engine, st: Rows, plan: ToolPlan) -> None:
    """Rows whose observation was just fed become ``plan.width`` children (while their path has
    split fewer than ``plan.depth`` times): their cache rows are gathered, never recomputed."""
    src: list[int] = []
    nodes: list[Episode] = []
    for i, ep in enumerate(st.nodes):
        if ep.fresh and plan.width > 1 and len(ep.path) < plan.depth:
            ep.ends.append(len(ep.tokens))
            src += [i] * plan.width
            nodes += [ep.child(c) for c in range(plan.width)]
        else:
            src.append(i)
            nodes.append(ep)
        ep.fresh = False
    if len(nodes) > len(st.nodes):
        st.nodes = nodes
        st.logits = st.logits[torch.tensor(src, dtype=torch.long, device=st.logits.device)]
        engine.select(st, src)


def _settle(st: Rows, ends: dict, plan: ToolPlan, tokenizer, cap: int,
            leaves: list[list[TreeLeaf]]) -> list[int]:
    """After a step (or block): run the paused rows' calls, make leaves of the episodes that
    ended; the rows that go on."""
    paused = [i for i, end in ends.items() if end == "call"]
    for i, end in zip(paused, _calls([st.nodes[i] for i in paused], plan, tokenizer, cap)):
        ends[i] = end
    for i, end in ends.items():
        if end is not None:
            leaves[st.nodes[i].prompt].append(st.nodes[i].leaf(end))
    return [i for i, end in ends.items() if end is None]


def _feed_last(engine, st: Rows, keep: list[int]) -> None:
    """Keep rows ``keep`` and feed each its newest token (the next logits come from it)."""
    if len(keep) < len(st.nodes):
        st.nodes = [st.nodes[i] for i in keep]
        engine.select(st, keep)
    engine.advance(st, torch.tensor([ep.tokens[-1] for ep in st.nodes], dtype=torch.long,
                                    device=st.logits.device))


def _decode(engine, st: Rows, plan: ToolPlan, scan: StopScan, cfg: SamplingConfig,
            leaves: list[list[TreeLeaf]], record: bool) -> None:
    """Run every row's episode to its end."""
    eos, cap, tokenizer = set(engine.eos_token_ids), cfg.max_new_tokens, engine.tokenizer
    while st.nodes:
        _split(engine, st, plan)
        toks, lps, ents = _draw(engine, st, cfg, record)
        ends = {}
        for i, ep in enumerate(st.nodes):
            engine.generated_tokens += not ep.queue
            ends[i] = _take(ep, toks[i], lps[i], ents[i], eos, scan, cap)
        keep = _settle(st, ends, plan, tokenizer, cap, leaves)
        if not keep:
            return
        _feed_last(engine, st, keep)


def _forced(st: Rows, k: int):
    """The observation tokens the next ``k`` steps feed, as ``draw_block``'s ``forced``."""
    if not any(ep.queue for ep in st.nodes):
        return None
    toks = np.zeros((k, len(st.nodes)), dtype=np.int64)
    where = np.zeros((k, len(st.nodes)), dtype=bool)
    for i, ep in enumerate(st.nodes):
        q = list(ep.queue)[:k]
        toks[:len(q), i], where[:len(q), i] = q, True
    dev = st.logits.device
    return torch.from_numpy(toks).to(dev), torch.from_numpy(where).to(dev)


def _walk(engine, ep: Episode, toks, lps, ents, eos: set, scan: StopScan, cap: int,
          plan: ToolPlan) -> tuple[str | None, int]:
    """``_take`` over a row's drawn tokens until its episode ends or pauses for a call (the end,
    as ``_take`` says it), or its observation has been fed and it is to split (None); the second
    value counts the tokens taken."""
    for j, tok in enumerate(toks):
        engine.generated_tokens += not ep.queue
        end = _take(ep, tok, lps[j], 0.0 if ents is None else ents[j], eos, scan, cap)
        if end is not None:
            return end, j + 1
        if ep.fresh and plan.width > 1 and len(ep.path) < plan.depth:
            return None, j + 1
        ep.fresh = False
    return None, len(toks)


def _decode_blocks(engine, st: Rows, plan: ToolPlan, scan: StopScan, cfg: SamplingConfig,
                   leaves: list[list[TreeLeaf]], record: bool) -> None:
    """``_decode`` with a host check every ``engine.stop_every`` tokens (docs/design.md §5.7):
    queued observation tokens replace the sampled ones on the device, a block is read back once
    and each row taken token by token (``_walk``). What a row drew after a call, its end or the
    observation it splits after is taken back (``rewind``: columns masked, position moved back)
    and the block's closing forward feeds every row its last token taken, so the episodes are
    the per-token loop's."""
    eos, cap, tokenizer = set(engine.eos_token_ids), cfg.max_new_tokens, engine.tokenizer
    while st.nodes:
        _split(engine, st, plan)
        steps = np.fromiter((len(n.tokens) for n in st.nodes), dtype=np.int64,
                            count=len(st.nodes))
        k, pos0 = int(min(engine.stop_every, cap - steps.min())), st.pos
        toks, lps, ents = draw_block(engine, st, steps, k, cfg, None if record else False,
                                     feed_last=False, forced=_forced(st, k))
        ends, taken = {}, []
        for i, ep in enumerate(st.nodes):
            ends[i], r = _walk(engine, ep, toks[i], lps[i], None if ents is None else ents[i],
                               eos, scan, cap, plan)
            taken.append(r)
        keep = _settle(st, ends, plan, tokenizer, cap, leaves)
        if not keep:
            return
        keep_drawn(st, taken, k, pos0)
        _feed_last(engine, st, keep)
