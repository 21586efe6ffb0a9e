"""The values stage: a PPO critic's ``critic_values`` for rollout records (``tcli values`` and the
loop's critic), T + 1 per response: V before each response token and after the last."""

from __future__ import annotations

from typing import Sequence

from tcli.errors import DataError
from tcli.models.critic import critic_values
from tcli.train.critic import check_critic_tokens


def add_critic_values(model, batch: Sequence[tuple], *, device, micro_batch_tokens: int,
                      source: str) -> list[dict]:
    """``batch``: (line, record, prompt ids, response ids) per record. Every record gets its
    ``critic_values``; returns the records. Tokens the critic cannot score (no prompt, ids beyond
    its vocabulary) are a DataError naming ``source`` and the record's line."""
    vocab = int(model.config.vocab_size)
    for line, _, p, r in batch:
        try:
            check_critic_tokens(p, r, vocab)
        except DataError as e:
            raise e.located(source, line) from None
    vals = critic_values(model, [b[2] for b in batch], [b[3] for b in batch], device=device,
                         micro_batch_tokens=micro_batch_tokens,
                         pad_id=int(getattr(model.config, "pad_token_id", None) or 0))
    out = []
    for (_, rec, _, _), v in zip(batch, vals):
        rec["critic_values"] = v.tolist()
        out.append(rec)
    return out
