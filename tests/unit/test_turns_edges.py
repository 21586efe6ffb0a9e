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
