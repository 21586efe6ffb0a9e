"""The engine contract shared by sample-tree, eval and loop.

An engine turns token-id prompts into completions with behaviour-policy log-probs. Tree sampling is
expressed with the same call: the frontier's prefixes (prompt + tokens so far) are the prompts of
the next level, so any engine with prefix caching shares work between siblings; the ``hf`` engine
additionally implements ``sample_tree`` natively by forking KV caches.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Optional, Protocol, Sequence

import numpy as np

ENTROPY_TOP_K = 20   # log-probs per token behind the generic entropy estimate (vLLM's default cap)


def _default(name: str):
    """SampleOptions holds the one default of every sampling setting."""
    from tcli.config.stages import SampleOptions

    return next(f.default for f in fields(SampleOptions) if f.name == name)


@dataclass
class SamplingConfig:
    """One engine call's settings (``SampleOptions.engine_config`` builds it for a stage)."""

    temperature: float = _default("temperature")   # 0 = greedy
    top_p: float = _default("top_p")
    max_new_tokens: int = _default("max_new_tokens")
    min_new_tokens: int = _default("min_new_tokens")
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


class Engine(Protocol):
    name: str
    model_path: str
    policy_version: int
    # optional: exact_entropy = True when generate_entropy(top_k=None) gives exact entropies;
    # sample-tree then records exact ones (else the top-ENTROPY_TOP_K estimate)

    @property
    def tokenizer(self): ...

    def generate(self, prompts: Sequence[Sequence[int]], n: int, cfg: SamplingConfig
                 ) -> list[list[Completion]]:
        """n completions for each prompt (token ids), in order."""

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
        """

    def load_weights(self, model_dir: str, policy_version: int) -> None:
        """Switch to new weights (after a train step) and drop any cached prefixes."""

    def follow(self, trainer) -> None:
        """Sample from the trainer's current weights from now on (after each train step)."""
