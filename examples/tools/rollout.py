"""Multi-turn generation with the real toolset for the warm start's report: generate until a
call's stop string (or EOS), append the toolset's observation, generate on, as ``tcli loop`` does
with ``--tools``. A check of the warm start on its own (greedy and sampled accuracy, how often
the model calls the tool and how often a call fails); RL itself uses tcli's sampler."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Episode:
    prompt: str
    text: str = ""                       # the whole response: policy text and observations
    turns: list = field(default_factory=list)
    tokens: int = 0                      # response tokens so far (policy and environment)
    mark: int = 0                        # where the text after the last observation starts
    done: bool = False


def _generate(model, tok, contexts: list[str], stops, *, greedy: bool,
              rooms: list[int]) -> list[str]:
    """One generation per context, each cut to its own room (tokens left)."""
    import torch

    enc = tok(contexts, return_tensors="pt", padding=True, add_special_tokens=False)
    kw = dict(do_sample=False) if greedy else dict(do_sample=True, temperature=1.0, top_k=0,
                                                   top_p=1.0)
    with torch.no_grad():
        gen = model.generate(**enc, max_new_tokens=max(rooms), use_cache=True,
                             eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                             stop_strings=list(stops), tokenizer=tok, **kw)
    new = gen[:, enc["input_ids"].shape[1]:]
    return [tok.decode(row[:room], skip_special_tokens=True) for row, room in zip(new, rooms)]


def _advance(ep: Episode, new: str, toolset, tok, max_new_tokens: int, max_turns: int) -> None:
    """Add one generation to ``ep``; run the call it ends with, if any."""
    ep.text += new
    ep.tokens += len(tok(new, add_special_tokens=False)["input_ids"])
    ended_by_call = any(new.endswith(s) for s in toolset.stop_strings)
    turn = (toolset.step(ep.text[ep.mark:]) if ended_by_call and len(ep.turns) < max_turns
            else None)
    if turn is None:
        ep.done = True
        return
    ep.turns.append(turn)
    obs = toolset.observation(turn)
    ep.text += obs
    ep.mark = len(ep.text)
    ep.tokens += len(tok(obs, add_special_tokens=False)["input_ids"])
    ep.done = ep.tokens >= max_new_tokens


def run_episodes(model, tok, toolset, prompts: list[str], *, n: int = 1, greedy: bool = True,
                 max_new_tokens: int = 64, max_turns: int = 2, batch_size: int = 256,
                 seed: int = 0, prefix: str = "") -> list[Episode]:
    """``n`` episodes per prompt (prompt-major), at most ``max_turns`` tool calls each and
    ``max_new_tokens`` response tokens in all (observations count). ``prefix``: response text
    to start from (e.g. the opening tag, to measure how well the model writes a call)."""
    import torch

    torch.manual_seed(seed)
    was_training, side = model.training, tok.padding_side
    model.eval()
    tok.padding_side = "left"
    start = len(tok(prefix, add_special_tokens=False)["input_ids"]) if prefix else 0
    eps = [Episode(p, prefix, tokens=start) for p in prompts for _ in range(1 if greedy else n)]
    try:
        while True:
            live = [e for e in eps if not e.done]
            if not live:
                break
            for i in range(0, len(live), batch_size):
                chunk = live[i:i + batch_size]
                outs = _generate(model, tok, [e.prompt + e.text for e in chunk],
                                 toolset.stop_strings, greedy=greedy,
                                 rooms=[max_new_tokens - e.tokens for e in chunk])
                for e, new in zip(chunk, outs):
                    _advance(e, new, toolset, tok, max_new_tokens, max_turns)
    finally:
        model.train(was_training)
        tok.padding_side = side
    return eps


def summary(episodes: list[Episode], answers: list[str], per_prompt: int) -> dict:
    """Accuracy (the ``arith`` verifier), tool-call rate (episodes with a call) and tool-error
    rate (calls whose ``error`` is set), overall and by outcome."""
    from tcli.verifiers.arith import verify_arith

    hits = [verify_arith(e.text, answers[i // per_prompt], {})[0] == 1.0
            for i, e in enumerate(episodes)]
    called = [bool(e.turns) for e in episodes]
    calls = [t for e in episodes for t in e.turns]
    n = max(len(episodes), 1)
    with_call = [h for h, c in zip(hits, called) if c]
    without = [h for h, c in zip(hits, called) if not c]
    return {"accuracy": sum(hits) / n, "tool_call_rate": sum(called) / n,
            "tool_error_rate": sum(t.error is not None for t in calls) / max(len(calls), 1),
            "acc_with_call": sum(with_call) / max(len(with_call), 1),
            "acc_without_call": sum(without) / max(len(without), 1)}
