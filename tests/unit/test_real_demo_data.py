"""examples/real/make_data.py: the demo-real task is deterministic, its splits are disjoint by
expression (no held-out question is ever trained on), and the gsm8k verifier the demo uses scores
the model's usual answer shapes."""

from __future__ import annotations

import pytest

from examples.real.make_data import make_prompts, split_of  # noqa: E402


def test_splits_are_disjoint_and_deterministic():
    splits = {s: make_prompts(n, 0, s) for s, n in (("train", 2000), ("dev", 200), ("test", 200))}
    exprs = {s: {r["prompt"] for r in recs} for s, recs in splits.items()}
    assert not exprs["train"] & exprs["test"] and not exprs["train"] & exprs["dev"]
    assert not exprs["dev"] & exprs["test"]
    assert all(split_of(r["prompt"][8:-1]) == s for s, recs in splits.items() for r in recs)
    assert make_prompts(50, 0, "test") == splits["test"][:50]  # a prefix: same seed, same file
    assert make_prompts(50, 1, "train") != splits["train"][:50]
    kinds = {r["meta"]["kind"] for r in splits["test"][:12]}
    assert len(kinds) == 6  # the first records take turns over the six kinds
    for r in splits["test"]:
        a, op, b = r["prompt"][len("What is "):-1].split()
        assert int(r["answer"]) == (int(a) + int(b) if op == "+" else int(a) - int(b)) >= 0


def test_too_many_prompts_is_an_error():
    with pytest.raises(ValueError, match="cannot draw"):
        make_prompts(10 ** 6, 0, "test")


@pytest.mark.parametrize("text, reward", [("44 + 39 = 83", 1.0), ("83", 1.0),
                                          ("The answer is 83.", 1.0), ("44 + 39 = 84", 0.0),
                                          ("I don't know", 0.0)])
def test_the_demo_verifier_scores_plain_answers(text, reward):
    from tcli.verifiers import VERIFIERS

    got, _ = VERIFIERS.get("gsm8k")(text, "83", {})
    assert got == reward
