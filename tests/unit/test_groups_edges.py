"""Grouping a record stream (docs/design.md §2.2): the ``sample_id`` checks inside a group, the
stream's last group included."""

from __future__ import annotations

import pytest

from tcli.errors import DataError
from tcli.io.groups import check_sample_ids, iter_groups


def groups_of(recs, sample_key="sample_id"):
    return [[r.get("sample_id") for r in rs] for _, rs in
            iter_groups(((i + 1, r) for i, r in enumerate(recs)), "in.jsonl",
                        sample_key=sample_key)]


@pytest.mark.parametrize("bad", [-1, True, 1.0, "0"])
def test_sample_id_must_be_a_non_negative_integer(bad):
    recs = [{"prompt_id": "a", "sample_id": 0}, {"prompt_id": "a", "sample_id": bad}]
    with pytest.raises(DataError) as e:
        groups_of(recs)
    assert (e.value.file, e.value.line, e.value.field) == ("in.jsonl", 2, "sample_id")


@pytest.mark.parametrize("last", [False, True])
def test_duplicate_sample_id_names_both_lines(last):
    dup = [{"prompt_id": "b", "sample_id": 1}, {"prompt_id": "b"}, {"prompt_id": "b", "sample_id": 1}]
    other = [{"prompt_id": "c", "sample_id": 1}]
    recs = other + dup if last else dup + other  # the stream's last group is checked too
    with pytest.raises(DataError) as e:
        groups_of(recs)
    first = 2 if last else 1
    assert (e.value.line, e.value.field) == (first + 2, "sample_id")
    assert f"duplicate sample_id 1 in group 'b' (also on line {first})" in str(e.value)


def test_sample_ids_unchecked_without_a_sample_key():
    recs = [{"prompt_id": "a", "sample_id": 0}, {"prompt_id": "a", "sample_id": 0}]
    assert groups_of(recs, sample_key=None) == [[0, 0]]


def test_check_sample_ids_accepts_zero_and_missing_ids():
    check_sample_ids([{"sample_id": 0}, {}, {"sample_id": 2}], [1, 2, 3], "f", "sample_id")
