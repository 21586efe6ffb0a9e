"""examples/tools: the tool-calling task is deterministic, its answers are right, its splits are
disjoint (no held-out expression is ever trained on), and the warm-start traces are exactly what
the real toolset parses and returns."""

from __future__ import annotations

import random

import pytest

from examples.tools.task import (KINDS, evaluate, expression_of, guess, head_trace, make_prompts,
                                 split_of)


def _value(expr: str) -> int:
    """The answer computed independently of the generator."""
    if "*" in expr:
        a, b = expr.split("*")
        return int(a) * int(b)
    return sum(map(int, expr.split("+")))


def test_prompts_are_deterministic_and_answers_right():
    recs = make_prompts(300, 0, "train")
    assert recs == make_prompts(300, 0, "train")
    assert make_prompts(30, 0, "train") == recs[:30]          # a prefix: same seed, same file
    assert make_prompts(30, 1, "train") != recs[:30]
    assert [r["meta"]["kind"] for r in recs[:6]] == list(KINDS) * 2
    for r in recs:
        expr = expression_of(r["prompt"])
        assert int(r["answer"]) == _value(expr) == evaluate(expr)
        assert r["prompt"] == f"{expr}=?\n"
    mul = [expression_of(r["prompt"]) for r in recs if r["meta"]["kind"] == "mul"]
    assert all(100 <= int(e.split("*")[0]) <= 999 and 11 <= int(e.split("*")[1]) <= 99
               for e in mul)
    assert len({r["id"] for r in recs}) == len({r["prompt"] for r in recs}) == 300


def test_splits_are_disjoint_whatever_the_seed():
    train = {r["prompt"] for s in (0, 1) for r in make_prompts(2000, s, "train")}
    test = {r["prompt"] for s in (0, 1) for r in make_prompts(300, s, "test")}
    assert not train & test
    assert all(split_of(expression_of(p)) == "test" for p in test)
    assert all(split_of(expression_of(p)) == "train" for p in train)


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="split"):
        make_prompts(3, 0, "dev")
    with pytest.raises(ValueError, match="not a tools-arith prompt"):
        expression_of("what is two and two?")
    with pytest.raises(ValueError, match="not a task expression"):
        evaluate("2-1")


def test_a_guess_keeps_the_leading_digits_and_is_rarely_right():
    rng = random.Random(0)
    guesses = [guess(123456, rng) for _ in range(500)]
    assert all(str(g).startswith("12") and len(str(g)) == 6 for g in guesses)
    assert sum(g == 123456 for g in guesses) < 25            # 1 in 10,000 on average
    assert guess(42, rng) == 42                               # nothing left to guess
    rec = make_prompts(1, 0, "test")[0]
    assert head_trace(rec, random.Random(1)).startswith("#### ")


def test_traces_are_what_the_real_toolset_parses_and_returns():
    pytest.importorskip("tcli.tools")
    from examples.tools.task import call_text, policy_prompt, protocol_tokens, tool_trace
    from examples.tools.warmstart import make_toolset, sft_examples
    from tcli.verifiers.arith import verify_arith

    ts = make_toolset()
    assert ts.format == "tags"
    recs = make_prompts(12, 0, "train")
    for r in recs:
        trace = tool_trace(ts, r)
        call = call_text(ts, expression_of(r["prompt"]))
        assert call == f"<calc>{expression_of(r['prompt'])}</calc>"
        assert any(call.endswith(s) for s in ts.stop_strings)
        turn = ts.step(call)                                  # what the loop does after the stop
        assert turn is not None and turn.error is None and turn.result.strip() == r["answer"]
        assert trace.startswith(call + ts.observation(turn))  # the observation, verbatim
        assert ts.step(trace[len(call + ts.observation(turn)):]) is None   # no second call
        assert verify_arith(trace, r["answer"], {})[0] == 1.0
    words = protocol_tokens(ts)
    assert words[0] == ts.system_text() and {"<calc>", "</calc>"} <= set(words)
    assert "".join(words[-2:]) == ts.observation(turn).replace(turn.result, "")
    prompt = policy_prompt(ts, recs[0])
    assert prompt.startswith(ts.system_text()) and prompt.endswith(recs[0]["prompt"])
    examples = sft_examples(recs, 600, 0.3, 0, ts)
    assert {p for p, _ in examples} == {policy_prompt(ts, r) for r in recs}
    calls = sum(resp.startswith("<calc>") for _, resp in examples)
    assert 0.2 < calls / len(examples) < 0.4
    assert sft_examples(recs, 600, 0.3, 0, ts) == examples


def test_a_wrong_calc_result_is_refused():
    pytest.importorskip("tcli.tools")
    from examples.tools.task import tool_trace
    from examples.tools.warmstart import make_toolset

    rec = dict(make_prompts(1, 0, "train")[0], answer="1")
    with pytest.raises(ValueError, match="calc gave"):
        tool_trace(make_toolset(), rec)


def test_added_tokens_are_one_token_each_and_decode_back():
    from tcli.models.tiny import build_char_tokenizer

    tok = build_char_tokenizer("0123456789*=?#\n ", added_tokens=["<calc>", "</calc>",
                                                                    "Use <calc> to compute."])
    text = "Use <calc> to compute.\n\n12*3=?\n<calc>12*3</calc>#### 36"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    pieces = [tok.decode([i]) for i in ids]
    assert pieces[0] == "Use <calc> to compute." and pieces.count("<calc>") == 1
    assert "</calc>" in pieces and len(ids) == 1 + 2 + 6 + 1 + 1 + 4 + 1 + 7
    assert tok.decode(ids, skip_special_tokens=True) == text


class _CharTok:
    """One token per character: enough for the episode bookkeeping."""

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": list(range(len(text)))}


def test_an_episode_runs_the_call_it_ends_with_and_stops_after_the_answer():
    pytest.importorskip("tcli.tools")
    from examples.tools.rollout import Episode, _advance, summary
    from examples.tools.warmstart import make_toolset

    ts, tok = make_toolset(), _CharTok()
    ep = Episode("12*3=?\n")
    _advance(ep, "<calc>12*3</calc>", ts, tok, max_new_tokens=200, max_turns=2)
    assert not ep.done and len(ep.turns) == 1 and ep.turns[0].result == "36"
    assert ep.text == "<calc>12*3</calc>" + ts.observation(ep.turns[0]) and ep.mark == len(ep.text)
    _advance(ep, "#### 36", ts, tok, max_new_tokens=200, max_turns=2)
    assert ep.done and ep.tokens == len(ep.text)
    bad = Episode("12*3=?\n")
    _advance(bad, "<calc>12*</calc>", ts, tok, max_new_tokens=200, max_turns=2)
    assert bad.turns[0].error is not None
    _advance(bad, "#### 35", ts, tok, max_new_tokens=200, max_turns=2)
    guess = Episode("12*3=?\n")
    _advance(guess, "#### 36", ts, tok, max_new_tokens=200, max_turns=2)
    got = summary([ep, bad, guess], ["36"], per_prompt=3)
    assert got["accuracy"] == pytest.approx(2 / 3) and got["tool_call_rate"] == pytest.approx(2 / 3)
    assert got["tool_error_rate"] == 0.5 and got["acc_with_call"] == 0.5
    assert got["acc_without_call"] == 1.0
    capped = Episode("12*3=?\n")      # no room left after the result: the episode ends there
    _advance(capped, "<calc>12*3</calc>", ts, tok, max_new_tokens=20, max_turns=2)
    assert capped.done


def test_report_counts_calls_and_failed_calls_from_eval_records():
    from examples.tools.report import tool_figures

    def rec(pid, reward, errors):
        return {"prompt_id": pid, "reward": reward, "token_ids": [1, 2],
                "turns": [{"error": e} for e in errors]}

    got = tool_figures([rec("a", 1.0, [None]), rec("b", 0.0, ["tool_error", None]),
                        rec("c", 0.0, []), rec("d", 1.0, [])])
    assert got["accuracy"] == 0.5 and got["tool_call_rate"] == 0.5 and got["calls"] == 3
    assert got["tool_error_rate"] == pytest.approx(1 / 3)
    assert got["acc_with_call"] == 0.5 and got["acc_without_call"] == 0.5


def test_the_demo_config_samples_with_calc_in_the_tags_format():
    from pathlib import Path

    from tcli.config.loop import load_config

    root = Path(__file__).resolve().parents[2]
    cfg = load_config(str(root / "examples" / "tools" / "demo.toml"))
    assert cfg.sample.tools == ("calc",) and cfg.sample.tool_format == "tags"
    assert cfg.verify.task in ("arith", ("arith",)) and cfg.sample.prompt_template == "plain"
    script = (root / "examples" / "tools" / "demo.sh").read_text()
    assert "--tools calc --tool-format tags" in script and "--task arith" in script
