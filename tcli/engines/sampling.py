"""The sampling contract's data: what one engine call is asked (``SamplingConfig``), what it gives
back (``Completion``, ``TreeLeaf``) and where an entropy tree splits (``EntropyRule``).

Stages and configuration build these from their own settings; engines never read configuration.
Token conventions: ``token_ids`` keep the EOS token when ``finish_reason == "stop"`` and never
contain padding; ``logprobs`` are log_softmax(logits / T) of exactly those tokens at the sampling
temperature T, before top-p renormalisation (greedy decoding records T = 1).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

GRAPH_MODES = ("auto", "on", "off")   # the hf engine's --cuda-graphs (engines/cuda_graphs.py)
ENTROPY_TOP_K = 20   # log-probs per token behind the generic entropy estimate (vLLM's default cap)


@dataclass
class SamplingConfig:
    """One engine call's settings; the defaults are the stage's (``SampleOptions`` takes them
    from here)."""

    temperature: float = 1.0   # 0 = greedy
    top_p: float = 1.0
    max_new_tokens: int = 256
    min_new_tokens: int = 0
    seed: int = 0


def logprob_temperature(temperature: float) -> float:
    """The T of the recorded log-probs, log_softmax(logits / T): the sampling temperature, or 1
    for greedy decoding (T = 0), whose 'distribution' has no useful log-probs of its own."""
    return float(temperature) if temperature > 0 else 1.0


def topk_entropy(top_logprobs) -> np.ndarray:
    """Entropy estimate (nats) per row from the k largest log-probs of each row's distribution
    (any order; ``-inf`` entries allowed), as engines that return only top-k log-probs can give.

    The mass r outside the top k is counted as if packed into tokens as likely as the k-th largest
    (or into one token when r is smaller): H_k = -sum_i p_i log p_i - r log min(p_k, r). That is
    the least entropy any distribution with these top-k values can have (up to the last partial
    token), so H_k <= H, with equality when the top k hold all the mass. A split on H_k > tau
    therefore never happens where the exact entropy is <= tau; it may miss a few that do.
    """
    lp = np.asarray(top_logprobs, dtype=np.float64)
    lp = lp.reshape(1, -1) if lp.ndim == 1 else lp
    p = np.exp(lp)
    with np.errstate(invalid="ignore", divide="ignore"):
        head = -np.where(p > 0, p * lp, 0.0).sum(-1)
        rest = np.clip(1.0 - p.sum(-1), 0.0, 1.0)
        pk = p.min(-1, where=p > 0, initial=1.0)
        tail = np.where(rest > 0, -rest * np.log(np.minimum(pk, rest)), 0.0)
    return np.maximum(head + tail, 0.0)


@dataclass
class Completion:
    token_ids: list[int]
    logprobs: list[float]        # log_softmax(logits / T) of each token, before top-p (see above)
    finish_reason: str           # "stop" (EOS) or "length"
    entropies: Optional[list[float]] = None  # per token, from ``generate_entropy`` only


@dataclass
class TreeLeaf:
    """One response of a tree: the path of child indices from the root and its segments."""

    node_path: tuple[int, ...]
    token_ids: list[int]
    logprobs: list[float]
    segment_ends: list[int]
    finish_reason: str
    entropies: Optional[list[float]] = None   # sampling entropy per token (--record-entropy)
    loss_mask: Optional[list[int]] = None     # with tools: 1 policy token, 0 environment token
    turns: Optional[list[dict]] = None        # with tools: each call's ``Turn.as_record()``
    tool_errors: int = 0                      # with tools: calls whose ``error`` is set


@dataclass(frozen=True)
class ToolPlan:
    """Sampling with tool calls (docs/design.md §5.8): ``toolset`` follows the tools interface
    (``stop_strings``, ``step``, ``observation``); at most ``max_turns`` calls run per
    trajectory. ``width`` > 1 makes a tree: a node splits into ``width`` children at the root
    and right after each tool result, while its path has split fewer than ``depth`` times."""

    toolset: object
    max_turns: int
    width: int = 1
    depth: int = 1


@dataclass(frozen=True)
class EntropyRule:
    """Where ``--branch entropy`` splits a path (docs/design.md §4.6): at token t of a node
    whose segment started at ``start``, when the node has split fewer than ``depth`` times on its
    way from the root, t - start >= ``min_segment`` (and t > start for a child: its first token
    is its own forking token) and the sampling entropy of token t exceeds ``threshold``. The node
    then ends before t and ``width`` children each sample token t independently."""

    width: int
    depth: int
    threshold: float
    min_segment: int
    top_k: Optional[int] = None   # generic engines: log-probs behind the estimate (None: exact)

    def splits(self, path_len: int, start: int, t: int, entropy: float) -> bool:
        """``path_len``: the node's node_path length (the root's path is (0,): 1 + splits so far)."""
        first = max(self.min_segment, 1 if path_len > 1 else 0)
        return path_len <= self.depth and t - start >= first and entropy > self.threshold
