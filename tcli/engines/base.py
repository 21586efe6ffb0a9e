"""The engine contract shared by sample-tree, eval and loop.

An engine turns token-id prompts into completions with behaviour-policy log-probs. Tree sampling is
expressed with the same call: the frontier's prefixes (prompt + tokens so far) are the prompts of
the next level, so any engine with prefix caching shares work between siblings; the ``hf`` engine
additionally implements ``sample_tree`` natively by forking KV caches.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Protocol, Sequence


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


@dataclass
class Completion:
    token_ids: list[int]
    logprobs: list[float]        # log_softmax(logits / T) of each token, before top-p (see above)
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

    def follow(self, trainer) -> None:
        """Sample from the trainer's current weights from now on (after each train step)."""
