"""Edges of multi-turn sampling's pieces that need no model (tcli.engines.turns): the stop-string
scan on byte-level tokenizers, and the per-token bookkeeping of an episode."""

from __future__ import annotations

import pytest

from tcli.engines.turns import StopScan


class ByteLevel:
    """A byte-level tokenizer (as GPT-2's BPE): a token is a byte string, possibly part of a
    character; decoding replaces a cut character with U+FFFD, as those tokenizers do."""

    def __init__(self, pieces: list[bytes]):
        self.vocab = pieces

    def decode(self, ids, skip_special_tokens=False):
        return b"".join(self.vocab[i] for i in ids).decode("utf-8", "replace")


def calls(text: str, stops, cut=1) -> list[tuple[int, str]]:
    """(tokens so far, call text) at every prefix of ``text`` tokenized ``cut`` bytes a token,
    where the scan finds a stop string ending in the newest token."""
    b = text.encode()
    tok = ByteLevel([b[i:i + cut] for i in range(0, len(b), cut)])
    scan = StopScan(tok, stops)
    ids = list(range(len(tok.vocab)))
    return [(n, t) for n in range(1, len(ids) + 1) if (t := scan.call_text(ids[:n], 0)) is not None]


@pytest.mark.parametrize("stop", ["→", "。", "</call>→", "é", "🙂"])
def test_a_non_ascii_stop_string_ends_a_call_on_byte_level_tokens(stop):
    """The token that completes the character holds only its last byte(s): it decodes to U+FFFD
    alone, and the scan must still look (and find the call ending there, not earlier)."""
    text = f"x=1{stop}z"
    end = len(f"x=1{stop}".encode())
    assert calls(text, (stop,)) == [(end, f"x=1{stop}")]
    for cut in (2, 3):  # tokens that cut the characters elsewhere
        assert [t for _, t in calls(text, (stop,), cut)] == [f"x=1{stop}"]


def test_a_stop_string_of_many_multibyte_characters_fits_the_window():
    """'。。。' is 3 characters but 9 byte tokens: the scan's window counts bytes."""
    assert calls("ab。。。c", ("。。。",)) == [(len("ab。。。".encode()), "ab。。。")]


def test_a_cut_character_before_the_stop_string_does_not_hide_it():
    """The newest token completes both a character cut across tokens and the stop string."""
    b = "→".encode()
    tok = ByteLevel([b"x", b[:2], b[2:] + b"</c>", b"z"])
    scan = StopScan(tok, ("</c>",))
    assert scan.call_text([0, 1], 0) is None
    assert scan.call_text([0, 1, 2], 0) == "x→</c>"
    assert scan.call_text([0, 1, 2, 3], 0) is None   # the stop string is not in the newest token


def test_an_ascii_stop_string_does_not_decode_on_every_cut_token():
    """Only a non-ASCII last character makes a U+FFFD token a candidate."""
    b = "→".encode()
    tok = ByteLevel([b"x", b[:2], b[2:], b">"])
    scan = StopScan(tok, ("</c>",))
    assert scan.call_text([0, 1, 2], 0) is None
    assert scan.may_end == {2: False}
    scan2 = StopScan(tok, ("→",))
    assert scan2.call_text([0, 1, 2], 0) == "x→" and scan2.may_end == {2: True}


class Pieces:
    """A tokenizer of fixed text pieces; ``sentencepiece`` decodes "▁" as a space and drops the
    leading one, as SentencePiece tokenizers do."""

    def __init__(self, vocab, sentencepiece=False):
        self.vocab, self.sp = vocab, sentencepiece

    def decode(self, ids, skip_special_tokens=False):
        text = "".join(self.vocab[i] for i in ids)
        if self.sp:
            text = text.replace("▁", " ")
            text = text[1:] if text.startswith(" ") else text
        return text


def test_the_window_reaches_past_a_leading_space_a_decoder_drops():
    """Decoding a window that starts at a "▁" token loses that space: the window holds two
    tokens more than the stop string can span."""
    tok = Pieces(["x", "▁", "<", "c", ">"], sentencepiece=True)
    scan = StopScan(tok, (" <c>",))
    assert scan.call_text([0, 1, 2, 3, 4], 0) == "x <c>"


def test_a_stop_string_ending_in_whitespace_is_looked_for_after_every_token():
    """A lone "▁" decodes to nothing, so the newest token's own text cannot tell."""
    tok = Pieces(["x", "<c>", "▁"], sentencepiece=True)
    scan = StopScan(tok, ("<c> ",))
    assert scan.call_text([0, 1, 2], 0) == "x<c> "


def test_only_the_current_turn_is_scanned():
    """A stop string that begins in the previous turn (an observation) and ends in the newest
    token is no call: the turn's text is what the policy wrote."""
    tok = Pieces(["<c>1", "</", "c>"])
    scan = StopScan(tok, ("</c>",))
    assert scan.call_text([0, 1, 2], 0) == "<c>1</c>"
    assert scan.call_text([0, 1, 2], 2) is None
    assert scan.call_text([0, 1, 2], 3) is None and scan.call_text([], 0) is None   # no turn yet


def test_a_stop_string_that_ended_before_the_newest_token_is_not_found_again():
    tok = Pieces(["ab", "b"])
    assert StopScan(tok, ("ab",)).call_text([0, 1], 0) is None
    assert StopScan(tok, ("ab",)).call_text([1, 0], 0) == "bab"


def test_the_call_ends_at_the_first_stop_string_to_end():
    tok = Pieces(["<c", ">x"])
    scan = StopScan(tok, ("c>x", "<c>"))
    assert scan.call_text([0, 1], 0) == "<c>"


# ----------------------------------------------------------------------------- episodes

ALPHABET = "abcdefghij"   # a random model writes the stop strings often


class Turn:
    def __init__(self, text: str):
        self.call, self.raw, self.result, self.error = {"name": "echo"}, text, text[-3:], None

    def as_record(self) -> dict:
        return {"call": self.call, "raw": self.raw, "result": self.result, "error": None}


class Echo:
    """A call ends with "ab" or "j"; a turn ending with "j" that holds an "i" has none. Every
    call text is logged; the observation is the call's last characters, or nothing."""

    stop_strings = ("ab", "j")

    def __init__(self, observe: bool = True):
        self.log: list[str] = []
        self.observe = observe

    def step(self, text: str):
        self.log.append(text)
        if text.endswith("j") and "i" in text:
            return None
        return Turn(text)

    def observation(self, turn) -> str:
        return turn.result if self.observe else ""


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    torch = pytest.importorskip("torch")
    from conftest import TINY, shared_model
    from tcli.engines.hf import HFEngine

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield HFEngine(shared_model(tmp_path_factory, seed=3, alphabet=ALPHABET, **TINY))
    torch.set_num_threads(old)


def sample(engine, tools, record=False, max_new_tokens=60, **plan):
    from tcli.engines.sampling import SamplingConfig, ToolPlan

    prompts = [engine.tokenizer(p)["input_ids"] for p in ("abc", "defghij", "jihgfedcba")]
    cfg = SamplingConfig(temperature=1.0, max_new_tokens=max_new_tokens, seed=5)
    plan = ToolPlan(tools, **{"max_turns": 4, "width": 4, "depth": 1, **plan})
    return engine.sample_with_tools(prompts, plan, cfg, entropy=record)


def only_at_the_end(text: str) -> bool:
    """A turn's text holds one stop string, at its end (the scan stops at the first)."""
    return not any(s in text[:-1] for s in Echo.stop_strings) and text.endswith(("ab", "j"))


@pytest.mark.parametrize("observe", [True, False], ids=["observation", "empty observation"])
@pytest.mark.parametrize("depth", [1, 3])
def test_every_call_is_the_text_of_its_own_turn(engine, observe, depth):
    """After an observation (even one of no tokens) the next turn starts afresh, in a row and in
    the children it splits into: no call text reaches back into an earlier turn."""
    tools = Echo(observe)
    groups = sample(engine, tools, depth=depth)
    assert len(tools.log) > 10, tools.log
    assert all(only_at_the_end(t) for t in tools.log), tools.log
    multi = [lf for g in groups for lf in g if len(lf.turns) > 1]
    assert multi   # (several turns happened)
    if depth > 1:
        assert any(len(lf.node_path) > 1 for g in groups for lf in g)   # it split


def test_an_empty_observation_still_lets_the_row_split(engine):
    groups = sample(engine, Echo(observe=False), depth=2)
    split = [lf for g in groups for lf in g if len(lf.node_path) == 2]
    assert split and all(len(lf.segment_ends) == 2 for lf in split)
    assert all(lf.loss_mask == [1] * len(lf.token_ids) for g in groups for lf in g)


@pytest.mark.parametrize("record", [False, True])
def test_no_room_gives_empty_episodes_with_entropies_when_recorded(engine, record):
    groups = sample(engine, Echo(), record=record, max_new_tokens=0)
    for g in groups:
        assert [lf.node_path for lf in g] == [(0,), (1,), (2,), (3,)]
        assert all(lf.token_ids == [] and lf.finish_reason == "length" for lf in g)
        assert all(lf.entropies == ([] if record else None) for lf in g)
