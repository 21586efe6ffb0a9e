"""The sample stage: prompt records in, rollout records out, in independent groups or
TreeRPO-style trees (docs/design.md §3, §4).

``sample_records`` is the library entry point used by ``tcli sample-tree`` and by ``loop``: it
reads and encodes prompts, asks the engine for each prompt's leaves (``engines.trees``: n
independent samples, or a tree whose splits follow a registered branch rule, on the engine's own
sampler or the generic one of the ``Engine`` base) and writes the records.

Token conventions: ``token_ids`` keep the EOS token when ``finish_reason == "stop"`` (so the policy
learns to stop) and never contain padding; ``logprobs`` are log_softmax(logits / T) of exactly those
tokens at the sampling temperature T, before top-p renormalisation (as verl and TRL compute them;
greedy decoding, T = 0, has T = 1 log-probs). Every record carries the ``temperature`` it was
sampled at (0 when greedy, which train-step reads as 1) and its ``top_p``, so train-step
recomputes the same distribution.

Randomness: each engine call gets the seed of ``cfg``; the ``hf`` engine derives every sample's
random stream from (seed, prompt tokens, sample/node index), so results do not depend on batching.
Callers that sample the same prompts repeatedly (``loop``) should vary the seed per iteration.

No torch import here: this module is imported by the CLI.
"""

from __future__ import annotations

import sys
from typing import Callable, Iterable, Iterator

from tcli import SCHEMA
from tcli.engines.base import as_engine
from tcli.engines.sampling import SamplingConfig, TreeLeaf
from tcli.engines.trees import sample_leaves
from tcli.errors import DataError, UsageError
from tcli.io import SeenKeys
from tcli.models.provenance import sampler_name
from tcli.prompts import (check_prompt_record, encode_prompt, map_fields, prompt_messages,
                          prompt_text, resolve_template, source_field, template_name)


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
        **(_tool_fields(leaf) if leaf.loss_mask is not None else {}),
        "temperature": float(cfg.temperature),  # as sampled: 0 = greedy (log-probs at T = 1)
        "top_p": float(cfg.top_p),
        "max_new_tokens": int(cfg.max_new_tokens),  # the cap a `length` finish reached
        "prompt_template": template_name(rec, template),
        "policy_version": int(getattr(engine, "policy_version", 0) or 0),
        "model": sampler_name(str(getattr(engine, "model_path", ""))),
    })
    return out


def _tool_fields(leaf: TreeLeaf) -> dict:
    """The mask and tool calls of a multi-turn rollout (docs/design.md §3.6, §5.8)."""
    return {"loss_mask": [int(x) for x in leaf.loss_mask], "turns": list(leaf.turns or []),
            "tool_calls": len(leaf.turns or []), "tool_errors": int(leaf.tool_errors)}


def open_toolset(opts, tokenizer):
    """The toolset of ``opts.tools`` (None without tools). tcli.tools is imported here only, so
    the CPU stages never load it at start-up; unknown tool names fail here (exit 2)."""
    if not opts.tools:
        return None
    try:
        from tcli.tools.toolset import Toolset
    except ImportError as e:
        raise UsageError(f"--tools needs the tcli.tools package, which cannot be imported: {e}"
                         ) from None
    try:
        return Toolset(list(opts.tools), opts.tool_format, tokenizer)
    except (KeyError, ValueError) as e:  # a bad name is a usage error, whatever the toolset raises
        raise UsageError(f"--tools (sample.tools): {e}") from None


def with_tool_text(messages: list[dict], text: str, chat: bool) -> list[dict]:
    """The prompt's turns with the toolset's instructions: a system turn first (or in front of
    the record's own system turn) with a chat template, else in front of the one user turn."""
    if not text:
        return messages
    head = messages[0]
    if chat and head["role"] != "system":
        return [{"role": "system", "content": text}, *messages]
    return [{**head, "content": f"{text}\n\n{head['content']}"}, *messages[1:]]


def tool_metrics(records: Iterable[dict]) -> dict:
    """The loop's tool-use metrics of a step's rollouts ({} when none was sampled with tools):
    calls per response and the share of calls that failed."""
    recs = [r for r in records if "tool_calls" in r]
    if not recs:
        return {}
    calls = sum(r["tool_calls"] for r in recs)
    return {"tool_calls_mean": calls / len(recs),
            "tool_error_share": sum(r["tool_errors"] for r in recs) / calls if calls else 0.0}


def sampled_tokens(rec: dict, start: int = 0, end: int | None = None) -> int:
    """Tokens the policy generated among ``token_ids[start:end]``: environment tokens
    (``loss_mask`` 0, tool output) were not sampled and do not count (docs/design.md §3.6)."""
    mask = rec.get("loss_mask")
    stop = len(rec["token_ids"]) if end is None else end
    return stop - start if mask is None else int(sum(mask[start:stop]))


def token_counts(records: Iterable[dict]) -> tuple[int, int]:
    """(unique, leaf) generated tokens of rollout records: policy tokens only.

    ``leaf`` sums every response's length; ``unique`` counts each generated token once: a tree
    node's segment (identified by prompt and node path) is generated once however many leaves
    share it. Independent samples share nothing, so there both are equal. Token budgets and
    tokens/s use ``unique``: that is the sampling work done. Environment tokens (a tool's output,
    ``loss_mask`` 0) are not sampled and count in neither."""
    seen: set = set()
    unique = leaf = 0
    for r in records:
        toks, path, ends = sampled_tokens(r), r.get("node_path") or [], r.get("segment_ends") or []
        leaf += toks
        if not path:
            unique += toks
            continue
        for k, end in enumerate(ends):
            key = (r["prompt_id"], tuple(path[:k + 1]))
            if key not in seen:
                seen.add(key)
                unique += sampled_tokens(r, ends[k - 1] if k else 0, end)
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


def _encode_chunk(chunk, tok, tmpl: str, chat_template, seen: SeenKeys, fields=None,
                  tool_text: str = ""):
    """Validate and tokenise the prompt records of one engine call (``tool_text``: how to call
    the tools, added to every prompt)."""
    recs, ids = [], []
    chat = (getattr(tok, "chat_template", None) is not None if chat_template is None
            else chat_template)
    for index, rec in chunk:
        try:
            rec = map_fields(rec, fields)
            check_prompt_record(rec)
            if not seen.add(rec["id"]):  # two groups with one prompt_id corrupt later stages
                raise DataError(f"prompt id {rec['id']!r} appears twice", field="id")
            messages = with_tool_text(prompt_messages(rec, tmpl), tool_text, chat)
            ptoks = encode_prompt(tok, messages, chat_template)
            if not ptoks:
                raise DataError("encodes to no tokens", field="prompt")
        except DataError as e:
            e.index = index
            raise source_field(e, fields) from None
        recs.append(rec)
        ids.append(ptoks)
    return recs, ids


def check_context(chunk, ids: list[list[int]], max_new_tokens: int, limit: int | None) -> None:
    """A prompt whose response may run past the model's positions is refused: past them an
    absolute-position model fails and a rotary one degrades without a word."""
    for (index, _), p in zip(chunk, ids):
        if limit and len(p) + max_new_tokens > limit:
            e = DataError(f"{len(p)} prompt tokens + max_new_tokens {max_new_tokens} = "
                          f"{len(p) + max_new_tokens} exceed the model's {limit} positions: "
                          "shorten the prompt or lower --max-new-tokens", field="prompt")
            e.index = index
            raise e


def check_prompts(tokenizer, prompt_records: list[dict], opts, limit: int | None = None) -> None:
    """Every prompt renders and encodes as sampling will encode it (a conversation without a chat
    template, options a template does not show, a repeated id) and fits the model's ``limit``
    positions: what a loop checks before it takes its run directory, so bad data leaves nothing
    behind. Raises as sampling would."""
    chunk = list(enumerate(prompt_records))
    _, ids = _encode_chunk(chunk, tokenizer, resolve_template(opts.prompt_template),
                           opts.chat_template, SeenKeys())
    check_context(chunk, ids, opts.max_new_tokens, limit)


UNKNOWN_SHARE = 0.1  # a prompt this much unknown to the tokenizer is not text the model can read
_UNKNOWN_SAID: set = set()


def say_unknown_tokens(tok, recs: list[dict], ids: list[list[int]]) -> None:
    """Warn once per tokenizer when a prompt is mostly the tokenizer's unknown token (a model of
    another alphabet or language): its answers would score 0 and look like a weak model."""
    unk = getattr(tok, "unk_token_id", None)
    key = getattr(tok, "name_or_path", id(tok))
    if unk is None or key in _UNKNOWN_SAID:
        return
    for rec, p in zip(recs, ids):
        share = p.count(unk) / max(len(p), 1)
        if share > UNKNOWN_SHARE:
            _UNKNOWN_SAID.add(key)
            sys.stderr.write(f"tcli: warning: prompt {rec['id']!r} is {share:.0%} unknown tokens "
                             f"({tok.unk_token}) to the tokenizer of {key}: is it the model meant "
                             "for this data?\n")
            return


def sample_records(engine, prompt_records: Iterable[dict], opts, *, seed: int = 0,
                   native: bool = True, fields=None,
                   on_group: Callable[[list[dict]], None] | None = None,
                   toolset=None) -> Iterator[dict]:
    """Yield rollout records (docs/design.md §3.2), one group of consecutive records per prompt,
    in input order.

    ``opts`` is a ``SampleOptions``: independent (``n`` samples per prompt) or tree mode
    (``width`` children per node; ``branch`` segments: ``depth`` levels of at most
    ``segment_tokens`` tokens, the last level runs to EOS or ``max_new_tokens``; ``branch``
    entropy: see ``EntropyRule``), ``prompts_per_batch`` prompts per engine call;
    ``record_entropy`` adds ``entropies``.
    A bad prompt record raises DataError with ``index`` = its 0-based position in the input.
    ``native=False`` forces the ``Engine`` base's generic samplers even on an engine with its own
    (hf).
    ``fields`` (PromptOptions) maps another schema's id/prompt/answer fields.
    ``toolset``: the tools' implementation (default: ``open_toolset``, from ``opts.tools``);
    with one every prompt gets its instructions and rollouts are multi-turn (§5.8).
    """
    own = toolset is None and bool(opts.tools)
    if toolset is None:
        toolset = open_toolset(opts, engine.tokenizer)
    try:
        yield from _groups(engine, prompt_records, opts, seed, native, fields, on_group, toolset)
    finally:
        if own and callable(getattr(toolset, "close", None)):
            toolset.close()   # its worker processes, if it has any


def _groups(engine, prompt_records, opts, seed, native, fields, on_group, toolset):
    """``sample_records``' work: chunks of prompts through the engine, records per group."""
    cfg = opts.engine_config(seed)
    tmpl = resolve_template(opts.prompt_template)
    seen = SeenKeys()
    sampler = as_engine(engine)
    tool_text = toolset.system_text() if toolset is not None else ""
    for chunk in _chunks(prompt_records, opts.prompts_per_batch):
        recs, ids = _encode_chunk(chunk, engine.tokenizer, tmpl, opts.chat_template, seen, fields,
                                  tool_text)
        check_context(chunk, ids, opts.max_new_tokens, getattr(engine, "max_positions", None))
        say_unknown_tokens(engine.tokenizer, recs, ids)
        trees = sample_leaves(sampler, ids, opts, cfg, native, toolset)
        for rec, ptoks, leaves in zip(recs, ids, trees):
            group = [_rollout(rec, engine, ptoks, j, leaf, opts.mode == "tree",
                              opts.prompt_template, cfg) for j, leaf in enumerate(leaves)]
            if on_group is not None:
                on_group(group)
            yield from group
