"""The ``hf`` engine's sampling state: rows decoded in lock-step over one KV cache.

Every row is a tree node (``Node``) on its way to becoming a leaf; ``Rows`` holds their cache,
attention mask, positions and next-token logits. ``HFEngine`` creates, forks, samples and
advances ``Rows``; its segment sampler and the entropy tree (engines/entropy_tree.py) decide
where nodes split.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from tcli.engines.rng import child_key
from tcli.engines.sampling import TreeLeaf


@dataclass
class Node:
    prompt: int                  # index of the prompt in the current call
    path: tuple[int, ...]        # child index taken at each level
    tokens: list[int]
    logprobs: list[float]
    ends: list[int]              # segment ends so far
    key: int                     # random-stream key of this node
    entropies: Optional[list[float]] = None  # per token, when recorded
    start: int = 0               # where this node's segment starts (its parent's length)
    cap: Optional[int] = None    # its own length limit, below the call's (continuations)

    def child(self, c: int) -> "Node":
        """Child ``c``: this node's tokens so far, its own random stream, a new segment."""
        return Node(self.prompt, self.path + (c,), list(self.tokens), list(self.logprobs),
                    list(self.ends), child_key(self.key, c),
                    None if self.entropies is None else list(self.entropies), len(self.tokens),
                    self.cap)

    def capped(self) -> bool:
        """Whether the node has reached its own length limit."""
        return self.cap is not None and len(self.tokens) >= self.cap

    def leaf(self, reason: str) -> TreeLeaf:
        return TreeLeaf(self.path, self.tokens, self.logprobs, self.ends, reason, self.entropies)


@dataclass
class Rows:
    """Rows generated in lock-step: one KV cache, left-padded, all rows the same cache length."""

    cache: object
    mask: torch.Tensor           # (R, S) 1 = real token, 0 = left pad
    pos: torch.Tensor            # (R,) position id of the next token
    logits: torch.Tensor         # (R, V) float32 raw logits of the next token
    nodes: list[Node]

    def keys(self) -> np.ndarray:
        return np.fromiter((n.key for n in self.nodes), dtype=np.uint64, count=len(self.nodes))


def append_tokens(nodes: list[Node], toks: list[int], lps: list[float], eos: list[bool],
                  last: bool, leaves: list[list[TreeLeaf]]) -> list[int]:
    """Each node's new token; nodes that end (EOS, or ``last``) become leaves. Returns the
    indices of the nodes still running."""
    keep = []
    for i, node in enumerate(nodes):
        node.tokens.append(toks[i])
        node.logprobs.append(lps[i])
        if eos[i] or last or node.capped():
            node.ends.append(len(node.tokens))
            leaves[node.prompt].append(node.leaf("stop" if eos[i] else "length"))
        else:
            keep.append(i)
    return keep
