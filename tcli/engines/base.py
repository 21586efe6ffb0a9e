"""The engine contract shared by sample-tree, eval and loop.

An engine turns token-id prompts into completions with behaviour-policy log-probs. Tree sampling is
expressed with the same call: the frontier's prefixes (prompt + tokens so far) are the prompts of
the next level, so any engine with prefix caching shares work between siblings; the ``hf`` engine
additionally implements ``sample_tree`` natively by forking KV caches.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence


@dataclass
class SamplingConfig:
    temperature: float = 1.0     # 0 = greedy
    top_p: float = 1.0
    max_new_tokens: int = 256
    min_new_tokens: int = 0
    seed: int = 0


@dataclass
class Completion:
    token_ids: list[int]
    logprobs: list[float]        # log-prob of each generated token under the sampling policy
    finish_reason: str           # "stop" (EOS) or "length"


class Engine(Protocol):
    name: str
    model_path: str
    policy_version: int

    @property
    def tokenizer(self): ...

    def generate(self, prompts: Sequence[Sequence[int]], n: int, cfg: SamplingConfig
                 ) -> list[list[Completion]]:
        """n completions for each prompt (token ids), in order."""

    def load_weights(self, model_dir: str, policy_version: int) -> None:
        """Switch to new weights (after a train step) and drop any cached prefixes."""
