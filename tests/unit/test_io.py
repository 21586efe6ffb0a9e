"""Record streams (tcli.io): exact JSONL <-> Arrow round trips, format detection, atomic output,
grouping and schema errors."""

from __future__ import annotations

import io
import os

import orjson
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tcli.errors import DataError, UsageError
from tcli.io import (EXTRA_COLUMN, MISSING_COLUMN, RecordReader, RecordWriter, detect_format,
                     dumps, iter_groups, output_format)
from tcli.io.arrow import iter_arrow

from conftest import arrow_bytes, read_all


def canon(rec: dict) -> bytes:
    """Type-exact comparison key: 1 and 1.0 differ, key order does not matter."""
    return orjson.dumps(rec, option=orjson.OPT_SORT_KEYS)


def assert_same(got: list[dict], want: list[dict]) -> None:
    assert [canon(r) for r in got] == [canon(r) for r in want]


def write_jsonl(path, recs) -> None:
    with open(path, "wb") as f:
        for r in recs:
            f.write(dumps(r))


HETERO = [
    {"schema": "tcli.rollout/1", "prompt_id": "p0", "token_ids": [1, 2, 3], "reward": 1.0,
     "meta": {"source": "gsm8k", "line": 3}, "text": "héllo ✓ 😀", "logprobs": [-0.5, -1.25, 0.0]},
    {"prompt_id": "p0", "token_ids": [], "reward": 0, "meta": {"other": [1, {"x": None}]},
     "text": None, "logprobs": []},                       # int reward, different meta keys, null
    {"prompt_id": 7, "token_ids": [9007199254740993, 2**63 - 1], "reward": -0.0,   # big ints, -0.0
     "nested": [[1, 2], [3]], "flag": True, "choices": {"A": "x", "B": "y"}},
    {"prompt_id": "p1", "reward": 1e-300, "extra_only_here": "\u0000\t\n\"quote\"",
     "logprobs": [1, 2.5]},                               # missing token_ids, int in a float list
    {"prompt_id": "p1", "token_ids": [2**64 - 1], "reward": 12345678901234567890},
    {"prompt_id": "p2", EXTRA_COLUMN: {"clash": 1}, MISSING_COLUMN: ["a"], "reward": 0.5},
]


@pytest.mark.parametrize("batch_size", [1, 2, 1024])
def test_jsonl_arrow_jsonl_round_trip_is_exact(tmp_path, batch_size):
    src = tmp_path / "in.jsonl"
    write_jsonl(src, HETERO)
    recs = read_all(src)
    assert_same(recs, HETERO)
    arrow = tmp_path / "mid.arrow"
    arrow.write_bytes(arrow_bytes(recs, batch_size))
    back = read_all(arrow)
    assert_same(back, HETERO)
    out = tmp_path / "out.jsonl"
    with RecordWriter(str(out)) as w:
        w.write_all(back)
    assert_same(read_all(out), HETERO)


def test_later_batch_that_does_not_fit_the_first_schema(tmp_path):
    """The schema comes from the first 1024 records; later records with other types still
    round-trip (via the side column) through the real RecordWriter."""
    first = [{"prompt_id": f"g{i // 4}", "reward": 1, "token_ids": [i, i + 1], "score": i,
              "tag": "a"} for i in range(1024)]
    later = [
        {"prompt_id": "late", "reward": 0.5, "token_ids": [1], "score": "not a number", "tag": 3},
        {"prompt_id": "late", "reward": True, "token_ids": [1.5, 2], "score": [1, 2], "new": {"k": 1}},
        {"prompt_id": "late", "reward": 2**63, "token_ids": None, "score": None},
        {"prompt_id": "late"},
    ]
    recs = first + later
    path = tmp_path / "x.arrow"
    with RecordWriter(str(path)) as w:
        assert w.fmt == "arrow"
        w.write_all(recs)
    assert_same(read_all(path), recs)
    assert detect_format(path.read_bytes()[:8]) == "arrow"


json_scalars = (st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1)
                | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=8))
json_values = st.recursive(json_scalars, lambda kids: st.lists(kids, max_size=4)
                           | st.dictionaries(st.text(max_size=5), kids, max_size=4), max_leaves=10)
records = st.dictionaries(st.sampled_from(["a", "b", "token_ids", "reward", "meta", "ü", ""]),
                          json_values, max_size=5)


@settings(max_examples=80, deadline=None)
@given(st.lists(records, max_size=8), st.sampled_from([1, 3, 100]))
def test_round_trip_property(recs, batch_size):
    raw = b"".join(dumps(r) for r in recs)
    parsed = [orjson.loads(line) for line in raw.splitlines()]
    back = _read_arrow_bytes(arrow_bytes(parsed, batch_size))
    assert_same(back, parsed)


def _read_arrow_bytes(data: bytes) -> list[dict]:
    return [rec for _, rec in iter_arrow(io.BufferedReader(io.BytesIO(data)), "<mem>", False)]


# ----------------------------------------------------------------------------- detection

def test_detects_jsonl_arrow_stream_and_arrow_file(tmp_path):
    recs = [{"prompt_id": "a", "token_ids": [1, 2], "reward": 1.0}, {"prompt_id": "a", "x": [1.5]}]
    j = tmp_path / "r.data"
    write_jsonl(j, recs)
    s = tmp_path / "s.data"
    s.write_bytes(arrow_bytes(recs))
    f = tmp_path / "f.data"
    table = pa.Table.from_pylist([{"prompt_id": "a", "token_ids": [1, 2], "reward": 1.0},
                                  {"prompt_id": "a", "token_ids": [3], "reward": 0.0}])
    with pa.ipc.new_file(str(f), table.schema) as w:
        w.write_table(table)
    assert detect_format(j.read_bytes()[:8]) == "jsonl"
    assert detect_format(s.read_bytes()[:8]) == "arrow"
    assert detect_format(f.read_bytes()[:8]) == "arrow-file"
    assert_same(read_all(j), recs)
    assert_same(read_all(s), recs)
    assert_same(read_all(f), table.to_pylist())
    assert_same(read_all(f, "arrow"), table.to_pylist())  # forcing arrow accepts the file format too


def test_forced_input_format(tmp_path):
    recs = [{"prompt_id": "a", "reward": 1.0}]
    j = tmp_path / "r.arrow"          # misleading suffix: detection looks at bytes, not names
    write_jsonl(j, recs)
    assert_same(read_all(j), recs)
    assert_same(read_all(j, "jsonl"), recs)
    with pytest.raises(DataError) as e:
        read_all(j, "arrow")
    assert e.value.file == str(j) and e.value.line == 1
    s = tmp_path / "s.jsonl"
    s.write_bytes(arrow_bytes(recs))
    with pytest.raises(DataError):
        read_all(s, "jsonl")
    with pytest.raises(UsageError):
        RecordReader(str(s), "csv")
    with pytest.raises(DataError):  # an Arrow stream forced to be read as Parquet
        read_all(s, "parquet")


def test_output_format_from_suffix_and_option():
    assert output_format("x.arrow", None) == "arrow"
    assert output_format("x.jsonl", None) == "jsonl"
    assert output_format("-", None) == "jsonl"
    assert output_format("x.jsonl", "arrow") == "arrow"
    with pytest.raises(UsageError):
        output_format("x", "csv")
    for name in ("out.parquet", "out.PQ", "out.csv", "out.json"):  # not silently JSONL
        with pytest.raises(UsageError, match="writes JSONL or Arrow"):
            output_format(name, None)
    assert output_format("out.json", "jsonl") == "jsonl"  # said explicitly


def test_blank_lines_are_skipped_and_lines_counted(tmp_path):
    p = tmp_path / "b.jsonl"
    p.write_bytes(b'{"prompt_id": 1}\n\n   \n{"prompt_id": 2}\n{"prompt_id": 3\n')
    got = []
    with pytest.raises(DataError) as e:
        for line, rec in RecordReader(str(p)):
            got.append((line, rec["prompt_id"]))
    assert got == [(1, 1), (4, 2)]
    assert e.value.line == 5 and "invalid JSON" in str(e.value)


@pytest.mark.parametrize("via", ["file", "stdin"])
def test_a_leading_utf8_bom_is_skipped(tmp_path, monkeypatch, via):
    """Windows editors save UTF-8 with a byte-order mark: not CSV, not bad JSON."""
    data = b'\xef\xbb\xbf{"prompt_id": 1}\n{"prompt_id": 2}\n'
    p = tmp_path / "bom.jsonl"
    p.write_bytes(data)
    if via == "stdin":
        monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BufferedReader(io.BytesIO(data))))
    assert list(RecordReader("-" if via == "stdin" else str(p))) == [
        (1, {"prompt_id": 1}), (2, {"prompt_id": 2})]
    p.write_bytes(b'{"prompt_id": 1}\n\xef\xbb\xbf{"prompt_id": 2}\n')  # only at the start
    with pytest.raises(DataError) as e:
        read_all(p)
    assert e.value.line == 2
    p.write_bytes(b"\xef\xbb\xbf\n")  # a BOM and nothing else: an empty input
    assert read_all(p) == []


def test_truncated_last_line(tmp_path):
    p = tmp_path / "t.jsonl"
    p.write_bytes(b'{"prompt_id": 1}\n{"prompt_id": ')
    with pytest.raises(DataError) as e:
        read_all(p)
    assert e.value.line == 2 and "truncated" in str(e.value)


@pytest.mark.parametrize("literal, field", [(b"NaN", "reward"), (b"-Infinity", "reward"),
                                            (b"1e999", "reward")])
def test_nan_and_infinity_literals_name_the_field(tmp_path, literal, field):
    p = tmp_path / "n.jsonl"
    p.write_bytes(b'{"prompt_id": 1, "reward": 1}\n{"prompt_id": 1, "token_ids": [1], "reward": '
                  + literal + b"}\n")
    with pytest.raises(DataError) as e:
        read_all(p)
    assert (e.value.line, e.value.field) == (2, field)
    assert "NaN" in str(e.value)


def test_nan_nested_in_a_list_names_the_top_field(tmp_path):
    p = tmp_path / "n.jsonl"
    p.write_bytes(b'{"prompt_id": 1, "logprobs": [0.5, NaN]}\n')
    with pytest.raises(DataError) as e:
        read_all(p)
    assert e.value.field == "logprobs"


def test_non_object_record(tmp_path):
    p = tmp_path / "l.jsonl"
    p.write_bytes(b"[1, 2]\n")
    with pytest.raises(DataError) as e:
        read_all(p)
    assert e.value.line == 1 and "not an object" in str(e.value)


def test_truncated_arrow_stream(tmp_path):
    data = arrow_bytes([{"prompt_id": i, "token_ids": list(range(50))} for i in range(100)], 10)
    p = tmp_path / "cut.arrow"
    p.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(DataError) as e:
        read_all(p)
    assert "Arrow" in str(e.value)


def test_missing_input_file_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError):
        read_all(tmp_path / "nope.jsonl")
    with pytest.raises(UsageError):
        read_all(tmp_path)


# ----------------------------------------------------------------------------- schema tags

@pytest.mark.parametrize("tag, ok", [("tcli.rollout/1", True), ("tcli.rollout/1.4", True),
                                     ("tcli.rollout/0", True), ("tcli.rollout/2", False),
                                     ("tcli.rollout/10.0", False), ("other/1", False),
                                     ("tcli.rollout/x", False), (3, False)])
def test_schema_tag(tmp_path, tag, ok):
    p = tmp_path / "s.jsonl"
    write_jsonl(p, [{"prompt_id": 1}, {"schema": tag, "prompt_id": 1}])
    if ok:
        assert len(read_all(p)) == 2
    else:
        with pytest.raises(DataError) as e:
            read_all(p)
        assert (e.value.line, e.value.field) == (2, "schema")


def test_newer_schema_in_arrow_metadata(tmp_path):
    table = pa.table({"prompt_id": ["a"]}).replace_schema_metadata({"tcli.schema": "tcli.rollout/2"})
    p = tmp_path / "m.arrow"
    with pa.ipc.new_stream(str(p), table.schema) as w:
        w.write_table(table)
    with pytest.raises(DataError) as e:
        read_all(p)
    assert e.value.field == "schema"


# ----------------------------------------------------------------------------- grouping

def groups_of(recs):
    return [(lines, [r["prompt_id"] for r in rs]) for lines, rs in
            iter_groups(((i + 1, r) for i, r in enumerate(recs)), "in.jsonl")]


def test_groups_are_consecutive_runs():
    recs = [{"prompt_id": k} for k in ["a", "a", "b", 3, 3, "3"]]
    assert groups_of(recs) == [([1, 2], ["a", "a"]), ([3], ["b"]), ([4, 5], [3, 3]), ([6], ["3"])]


def test_group_split_across_the_stream():
    recs = [{"prompt_id": k} for k in ["a", "a", "b", "a"]]
    with pytest.raises(DataError) as e:
        groups_of(recs)
    assert (e.value.file, e.value.line, e.value.field) == ("in.jsonl", 4, "prompt_id")
    assert "in.jsonl:4: field 'prompt_id'" in str(e.value)


@pytest.mark.parametrize("bad", [{}, {"prompt_id": None}, {"prompt_id": True}, {"prompt_id": [1]}])
def test_bad_prompt_id(bad):
    with pytest.raises(DataError) as e:
        groups_of([{"prompt_id": "a"}, bad])
    assert (e.value.line, e.value.field) == (2, "prompt_id")


# ----------------------------------------------------------------------------- atomic output

@pytest.mark.parametrize("name", ["out.jsonl", "out.arrow"])
def test_writer_is_atomic(tmp_path, name):
    target = tmp_path / name
    with pytest.raises(RuntimeError):
        with RecordWriter(str(target)) as w:
            w.write({"prompt_id": 1, "token_ids": list(range(10_000))})
            raise RuntimeError("stage failed")
    assert os.listdir(tmp_path) == []
    target.write_bytes(b"old\n")
    with pytest.raises(RuntimeError):
        with RecordWriter(str(target)) as w:
            w.write({"prompt_id": 1})
            raise RuntimeError("stage failed")
    assert os.listdir(tmp_path) == [name] and target.read_bytes() == b"old\n"
    with RecordWriter(str(target)) as w:
        w.write({"prompt_id": 2})
    assert os.listdir(tmp_path) == [name] and read_all(target) == [{"prompt_id": 2}]


def test_writer_needs_an_existing_directory(tmp_path):
    with pytest.raises(UsageError):
        RecordWriter(str(tmp_path / "no" / "out.jsonl"))


def test_empty_arrow_output_is_a_valid_stream(tmp_path):
    p = tmp_path / "e.arrow"
    with RecordWriter(str(p)):
        pass
    assert read_all(p) == []
