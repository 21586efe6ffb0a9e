"""``--branch entropy`` on the hf engine: split a path where the policy hesitates, with KV forking.

Every path of a chunk of prompts decodes token by token in one batch, all at the same response
position. Before token t is drawn, each row's sampling entropy (``HFEngine.entropies``: of
softmax(logits / T), before top-p) is compared with the rule (``EntropyRule.splits``); a row that
splits ends its node before t and becomes ``width`` rows -- its KV-cache row gathered, never
recomputed, and its next-token logits copied -- and each child samples token t with its own random
stream. Rows that end (EOS, length) leave in the same gather, so each step costs at most one.

Randomness is the hf engine's counter-based stream: the root path (0,) has key
child_key(prompt_key(seed, prompt), 0) -- so without a split the one path equals ``generate``'s
first sample -- a child c of a node with key k has child_key(k, c), and token t of a node uses
uniforms(key, t). Nothing depends on batching.

Memory: a prompt's rows are never split across batches here (they can grow to width^depth), so
prompts are chunked to keep chunk x width^depth x (prompt + max_new_tokens) within batch_tokens
(at least one prompt per chunk).

Imports torch: import this module only where an engine is created.
"""

from __future__ import annotations

from typing import Sequence

import torch

from tcli.engines.rows import Node, Rows, append_tokens
from tcli.engines.sampling import EntropyRule, SamplingConfig, TreeLeaf


def sample_entropy_tree(engine, prompts: Sequence[Sequence[int]], rule: EntropyRule,
                        cfg: SamplingConfig, record: bool = False) -> list[list[TreeLeaf]]:
    """Leaves per prompt, sorted by node path (see the module docstring); ``engine`` is an
    ``HFEngine``, driven through its sampling-state methods."""
    leaves: list[list[TreeLeaf]] = [[] for _ in prompts]
    if cfg.max_new_tokens <= 0:
        for out in leaves:
            out.append(TreeLeaf((0,), [], [], [0], "length", [] if record else None))
        return leaves
    with torch.inference_mode():
        for chunk in engine.prefill_chunks(prompts, rule.width ** rule.depth, cfg.max_new_tokens):
            root = engine.prefill(prompts, chunk, cfg.seed, None, record)
            st = engine.fork(root, [(r, 0) for r in range(len(chunk))], cfg.max_new_tokens)
            del root
            _decode(engine, st, rule, cfg, record, leaves)
    for out in leaves:
        out.sort(key=lambda lf: lf.node_path)
    return leaves


def _split(st: Rows, rule: EntropyRule, step: int, entropies) -> list[int] | None:
    """Replace every row that splits at ``step`` by its ``width`` children (nodes and logits);
    the source row of each new row, or None when nothing split."""
    src: list[int] = []
    nodes: list[Node] = []
    for i, node in enumerate(st.nodes):
        if entropies is None or not rule.splits(len(node.path), node.start, step, entropies[i]):
            src.append(i)
            nodes.append(node)
            continue
        node.ends.append(step)
        for c in range(rule.width):
            src.append(i)
            nodes.append(node.child(c))
    if len(nodes) == len(st.nodes):
        return None
    st.nodes = nodes
    st.logits = st.logits[torch.tensor(src, dtype=torch.long, device=st.logits.device)]
    return src


def _entropies(engine, st: Rows, rule: EntropyRule, cfg: SamplingConfig, record: bool):
    """This step's entropies, or None when no row needs them (nothing recorded, no split left)."""
    if record or any(len(n.path) <= rule.depth for n in st.nodes):
        return engine.entropies(st.logits, cfg, rule.top_k)
    return None


def _decode(engine, st: Rows, rule: EntropyRule, cfg: SamplingConfig, record: bool,
            leaves: list[list[TreeLeaf]]) -> None:
    """Decode every row to its end, splitting rows where the rule says."""
    for step in range(cfg.max_new_tokens):
        ent = _entropies(engine, st, rule, cfg, record)
        src = _split(st, rule, step, ent)
        if record:
            for node, i in zip(st.nodes, src if src is not None else range(len(st.nodes))):
                node.entropies.append(ent[i])
        tok, toks, lps, eos = engine.draw(st, step, cfg)
        keep = append_tokens(st.nodes, toks, lps, eos, step + 1 >= cfg.max_new_tokens, leaves)
        if not keep:
            return
        if len(keep) < len(st.nodes):
            st.nodes = [st.nodes[i] for i in keep]
            tok = tok[torch.tensor(keep, dtype=torch.long, device=tok.device)]
        rows = [src[i] for i in keep] if src is not None else keep
        if rows != list(range(st.mask.shape[0])):
            engine.select(st, rows)
        engine.advance(st, tok)
