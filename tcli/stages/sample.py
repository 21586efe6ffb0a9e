"""Sampling rollouts from prompt records: independent groups or TreeRPO-style trees (DESIGN §3, §4).

``sample_records`` is the library entry point used by ``tcli sample-tree`` and by ``loop``. It works
with any engine of the ``Engine`` protocol: tree sampling on a generic engine goes level by level,
submitting each frontier node's prefix (prompt + tokens so far) as a token prompt with ``n=width``;
an engine with a native ``sample_tree`` (the ``hf`` engine forks KV caches) is used directly.

Token conventions: ``token_ids`` keep the EOS token when ``finish_reason == "stop"`` (so the policy
learns to stop) and never contain padding; ``logprobs`` are log_softmax(logits / T) of exactly those
tokens at the sampling temperature T, before top-p renormalisation (as verl and TRL compute them;
greedy decoding records T = 1). Every record carries that ``temperature`` and the ``top_p`` it was
sampled with, so train-step recomputes the same distribution.

Randomness: each engine call gets the seed of ``cfg``; the ``hf`` engine derives every sample's
random stream from (seed, prompt tokens, sample/node index), so results do not depend on batching.
Callers that sample the same prompts repeatedly (``loop``) should vary the seed per iteration.

No torch import here: this module is imported by engines and by the CLI.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Iterable, Iterator, Sequence

from tcli import SCHEMA
from tcli.engines.base import SamplingConfig, logprob_temperature
from tcli.io import SeenKeys
from tcli.errors import DataError
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


# ----------------------------------------------------------------------------- tree on any engine

def _level_seed(seed: int, level: int) -> int:
    return (seed * 1_000_003 + level) & 0x7FFFFFFF


def sample_tree_generic(engine, prompts: Sequence[Sequence[int]], width: int, depth: int,
                        segment_tokens: int, cfg: SamplingConfig) -> list[list[TreeLeaf]]:
    """Tree sampling through ``engine.generate`` only, level by level (prefix caching, if the engine
    has it, shares the work between siblings). Leaves per prompt, sorted by node path."""
    leaves: list[list[TreeLeaf]] = [[] for _ in prompts]
    # frontier node: (prompt index, path, tokens, logprobs, ends)
    frontier = [(i, (), [], [], []) for i in range(len(prompts))]
    for level in range(1, depth + 1):
        if not frontier:
            break
        done = len(frontier[0][2])
        room = cfg.max_new_tokens - done
        seg = room if level == depth else min(segment_tokens, room)
        lvl = replace(cfg, max_new_tokens=seg, min_new_tokens=max(0, min(cfg.min_new_tokens - done, seg)),
                      seed=_level_seed(cfg.seed, level))
        outs = engine.generate([list(prompts[p]) + toks for p, _, toks, _, _ in frontier], width, lvl)
        nxt = []
        for (p, path, toks, lps, ends), comps in zip(frontier, outs):
            for c, comp in enumerate(comps):
                t2 = toks + list(comp.token_ids)
                l2 = lps + list(comp.logprobs)
                e2 = ends + [len(t2)]
                stop = comp.finish_reason == "stop"
                if stop or level == depth or len(t2) >= cfg.max_new_tokens or not comp.token_ids:
                    reason = "stop" if stop else "length"
                    leaves[p].append(TreeLeaf(path + (c,), t2, l2, e2, reason))
                else:
                    nxt.append((p, path + (c,), t2, l2, e2))
        frontier = nxt
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
        "temperature": logprob_temperature(cfg.temperature),
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


def _sample_chunk(engine, ids, opts, cfg: SamplingConfig, native: bool) -> list[list[TreeLeaf]]:
    """Leaves per prompt: a tree (native or level by level) or n independent samples."""
    if opts.mode == "tree":
        fn = getattr(engine, "sample_tree", None) if native else None
        if fn is not None:
            return fn(ids, width=opts.width, depth=opts.depth, segment_tokens=opts.segment_tokens,
                      cfg=cfg)
        return sample_tree_generic(engine, ids, opts.width, opts.depth, opts.segment_tokens, cfg)
    return [[TreeLeaf((j,), c.token_ids, c.logprobs, [], c.finish_reason)
             for j, c in enumerate(comps)] for comps in engine.generate(ids, opts.n, cfg)]


def sample_records(engine, prompt_records: Iterable[dict], opts, *, seed: int = 0,
                   native: bool = True, fields=None,
                   on_group: Callable[[list[dict]], None] | None = None) -> Iterator[dict]:
    """Yield rollout records (DESIGN §3), one group of consecutive records per prompt, in input order.

    ``opts`` is a ``SampleOptions``: independent (``n`` samples per prompt) or tree mode
    (``width`` children per node, ``depth`` levels of at most ``segment_tokens`` tokens; the last
    level runs to EOS or ``max_new_tokens``), ``prompts_per_batch`` prompts per engine call.
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
