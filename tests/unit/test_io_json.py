"""Exact JSON (tcli.io.codec) and malformed stream input, as units and through the real CLI.

- integers beyond 64 bits survive JSONL -> JSONL and JSONL -> Arrow -> JSONL digit for digit
  (orjson alone reads 10**30 as 1e30 and refuses to write it);
- a repeated key (``{"reward": 1, "reward": 0}``) is bad data, not "the last one wins";
- invalid UTF-8 in Arrow strings and bad JSON in Arrow JSON columns are bad data;
all with exit 65 and one line naming file, line (record) and field.
"""

from __future__ import annotations

import io
import json
import os
import re

import numpy as np
import orjson
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import run_tcli
from tcli.errors import DataError
from tcli.io import RecordReader, RecordWriter
from tcli.io import codec
from tcli.io.arrow import EXTRA_COLUMN, MISSING_COLUMN, ArrowSink

BIG = [10**30, 2**64 + 1, 2**64, -(2**63) - 1, -(10**40), 10**400]


def jsonl(recs) -> bytes:
    return b"".join(codec.dumps(r) for r in recs)


def rollouts(**extra) -> list[dict]:
    return [{"schema": "tcli.rollout/1", "prompt_id": "p", "sample_id": i, "token_ids": t,
             "reward": r, "text": f"#### {i}", "answer": "1", **extra}
            for i, (t, r) in enumerate([([5, 7, 9, 2], 1.0), ([5, 7, 8, 2], 0.0), ([4, 6, 2], 1.0)])]


def one_error_line(stderr: bytes) -> str:
    lines = stderr.decode().strip().splitlines()
    assert len(lines) == 1, stderr.decode()
    assert lines[0].startswith("tcli: error: ") and "Traceback" not in stderr.decode()
    return lines[0]


def arrow_stream(table_or_batch) -> bytes:
    sink = io.BytesIO()
    with pa.ipc.new_stream(sink, table_or_batch.schema) as w:
        w.write(table_or_batch)
    return sink.getvalue()


# ----------------------------------------------------------------------------- big integers: units

@pytest.mark.parametrize("n", BIG + [2**64 - 1, -(2**63), 10**18, 0])
def test_integers_read_and_write_exactly(n):
    raw = b'{"answer": %d, "meta": {"x": [1, %d]}}\n' % (n, n)
    rec = codec.loads(raw)
    assert rec == {"answer": n, "meta": {"x": [1, n]}}
    assert type(rec["answer"]) is int
    assert codec.dumps(rec) == b'{"answer":%d,"meta":{"x":[1,%d]}}\n' % (n, n)
    assert b"e+" not in codec.dumps(rec) and b"e3" not in codec.dumps(rec)


def test_floats_are_untouched():
    raw = b'{"a": 1e30, "b": 0.0012345678901234567, "c": -1.2345678901234567e-05, "d": 1.0}'
    assert codec.loads(raw) == orjson.loads(raw)
    assert type(codec.loads(raw)["a"]) is float


def test_numpy_values_still_serialise():
    rec = {"a": np.int64(3), "b": np.arange(3), "c": np.float32(0.5), "big": 10**30}
    assert codec.dumps(rec) == b'{"a":3,"b":[0,1,2],"c":0.5,"big":1000000000000000000000000000000}\n'


def _long_int_reference(raw: bytes) -> bool:
    return re.search(rb"(?<![0-9.])[0-9]{19}", raw) is not None


number_text = st.one_of(
    st.integers(-(10**25), 10**25).map(lambda n: str(n).encode()),
    st.floats(allow_nan=False, allow_infinity=False).map(lambda x: repr(x).encode()),
    st.text("0123456789.e-", max_size=30).map(str.encode),
    st.sampled_from([b"0.00123456789012345678", b"1e0000000000000000000001", b"x"]))


@settings(max_examples=300, deadline=None)
@given(st.lists(number_text, max_size=12), st.sampled_from([b",", b" ", b".", b"", b'"']))
def test_long_integer_scan_matches_a_regex(parts, sep):
    """The translate scan (short texts) and the numpy scan (long texts) agree with a plain regex:
    19 or more digits that do not follow a digit or a decimal point."""
    raw = sep.join(parts)
    want = _long_int_reference(raw)
    assert codec._long_int(raw) == want
    assert codec._long_int_np(np.frombuffer(raw, np.uint8)) == want


def test_long_lines_take_the_numpy_scan():
    pad = b'"pad": [' + b",".join([b"0.0012345678901234567"] * 600) + b"]"
    for n, lost in [(10**30, True), (10**17, False)]:
        raw = b'{"a": %d, %s, "t": "Step 1: x"}' % (n, pad)
        assert len(raw) >= codec._NUMPY_FROM
        assert codec._may_lose(raw, orjson.loads(raw)) is lost
        assert codec.loads(raw)["a"] == n and type(codec.loads(raw)["a"]) is int


# ----------------------------------------------------------------------------- repeated keys: units

@pytest.mark.parametrize("raw, field", [
    (b'{"reward": 1, "reward": 0}', "reward"),
    (b'{"reward":1,"x":2,"reward":0}', "reward"),
    (b'{"a" : 1, "a"\t:2}', "a"),                             # whitespace before the colon
    (b'{"meta": {"k": 1, "k": 2}, "r": 1}', "meta"),           # nested: the top field is named
    (b'{"m": [{"k": 1}, {"k": 1, "k": 2}]}', "m"),            # inside an array
    (b'{"t": "a: b: c", "r": 1, "r": 2}', "r"),               # colons in strings loosen the bound
    (b'{"t": "\\": \\":", "r": 1, "r": 2}', "r"),              # quote-colon inside a string too
    (b'{"big": 100000000000000000000, "x": 1, "x": 2}', "x"),  # and with a big integer
])
def test_repeated_key_is_refused(raw, field):
    with pytest.raises(codec.BadJson) as e:
        codec.loads(raw)
    assert e.value.field == field
    assert "more than once" in e.value.message


@pytest.mark.parametrize("raw", [b'{"t": "a: b", "u": {"v": "c:d"}}', b'{"m": [{"k": 1}, {"k": 2}]}',
                                 b'{"a": {}, "b": [{}], "c": ":"}', b'[{"a": 1}, {"a": 2}]',
                                 b'{"k": "\\"x\\": 1"}'])
def test_distinct_keys_with_colons_and_nesting_are_fine(raw):
    assert codec.loads(raw) == json.loads(raw)


keys = st.sampled_from(["a", "b", "reward", "a:b", 'q"', ""])
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(10**22), 10**22) | st.text(":\" ab", max_size=5),
    lambda kids: st.lists(kids, max_size=3) | st.lists(st.tuples(keys, kids), max_size=4),
    max_leaves=12)


def _write(v, sep) -> str:
    """JSON text of ``v`` where a list of (key, value) pairs is an object, repeats and all."""
    if isinstance(v, list) and v and all(isinstance(p, tuple) for p in v):
        return "{" + ",".join(json.dumps(k) + sep + _write(x, sep) for k, x in v) + "}"
    if isinstance(v, list):
        return "[" + ",".join(_write(x, sep) for x in v) + "]"
    return json.dumps(v)


def _has_repeat(v) -> bool:
    if isinstance(v, list) and v and all(isinstance(p, tuple) for p in v):
        ks = [k for k, _ in v]
        return len(set(ks)) != len(ks) or any(_has_repeat(x) for _, x in v)
    return isinstance(v, list) and any(_has_repeat(x) for x in v)


@settings(max_examples=400, deadline=None)
@given(st.lists(st.tuples(keys, json_values), max_size=5), st.sampled_from([":", " : ", ":\t"]))
def test_repeats_are_never_missed(pairs, sep):
    raw = _write(pairs, sep).encode() if pairs else b"{}"
    if _has_repeat(pairs):
        with pytest.raises(codec.BadJson):
            codec.loads(raw)
    else:
        assert codec.loads(raw) == json.loads(raw)


# ----------------------------------------------------------------------------- other refusals

@pytest.mark.parametrize("raw, words, field", [
    (b'{"r": NaN}', "NaN", "r"), (b'{"r": 1e999}', "NaN", "r"),
    (b'{"r": "\\ud800", "n": 1' + b"0" * 30 + b"}", "surrogate", None),
    (b'{"n": 1' + b"0" * 5000 + b"}", "invalid JSON", None),  # beyond Python's int-string limit
    (b'{"n": ' + b"[" * 2000 + b"]" * 2000 + b"}", "invalid JSON", None),
    (b'{"a": "\xff"}', "UTF-8", None),
])
def test_other_refusals(raw, words, field):
    with pytest.raises(codec.BadJson) as e:
        codec.loads(raw)
    assert words in e.value.message and e.value.field == field


# ----------------------------------------------------------------------------- Arrow

def test_arrow_side_and_json_columns_carry_big_integers(tmp_path):
    recs = [{"prompt_id": "a", "answer": 1, "ids": [1, 2]}] * 3 + \
        [{"prompt_id": "a", "answer": 10**30, "ids": [2**64 + 1], "meta": {"n": -(2**70)}}]
    buf = io.BytesIO()
    sink = ArrowSink(buf, batch_size=2)  # big values arrive after the schema is fixed
    for r in recs:
        sink.write(r)
    sink.close()
    p = tmp_path / "x.arrow"
    p.write_bytes(buf.getvalue())
    back = [r for _, r in RecordReader(str(p))]
    assert back == recs
    assert [type(r["answer"]) for r in back] == [int] * 4
    first = [{"prompt_id": "a", "answer": 10**30}]  # in the first batch: a JSON column
    with RecordWriter(str(p)) as w:
        w.write_all(first)
    assert [r for _, r in RecordReader(str(p))] == first


def _invalid_utf8_column():
    good = pa.array([b"fine", b"a\xffb"], type=pa.binary())
    return pa.Array.from_buffers(pa.string(), 2, good.buffers())


@pytest.mark.parametrize("make, line, field, words", [
    (lambda: pa.record_batch([pa.array(["a", "a"]), _invalid_utf8_column()], names=["prompt_id", "text"]),
     2, "text", "UTF-8"),
    (lambda: pa.record_batch([pa.array(["a", "a"]),
                              pa.array(['{"k": 1}', '{"k": '])],
                             schema=pa.schema([pa.field("prompt_id", pa.string()),
                                               pa.field("meta", pa.string(), metadata={"tcli.json": "1"})])),
     2, "meta", "invalid JSON"),
    (lambda: pa.record_batch([pa.array(["a", "a"]), pa.array(['{"k": 1, "k": 2}', None])],
                             schema=pa.schema([pa.field("prompt_id", pa.string()),
                                               pa.field("meta", pa.string(), metadata={"tcli.json": "1"})])),
     1, "meta", "more than once"),
    (lambda: pa.record_batch([pa.array(["a", "a"]), pa.array([None, '{"reward": 1, "reward": 0}'])],
                             names=["prompt_id", EXTRA_COLUMN]), 2, "reward", "more than once"),
    (lambda: pa.record_batch([pa.array(["a", "a"]), pa.array([None, "[1]"])],
                             names=["prompt_id", EXTRA_COLUMN]), 2, EXTRA_COLUMN, "JSON object"),
    (lambda: pa.record_batch([pa.array(["a"]), pa.array([1])], names=["prompt_id", MISSING_COLUMN]),
     1, MISSING_COLUMN, "list of strings"),
    (lambda: pa.record_batch([pa.array(["a"]), pa.array([3])],
                             schema=pa.schema([pa.field("prompt_id", pa.string()),
                                               pa.field("meta", pa.int64(), metadata={"tcli.json": "1"})])),
     1, "meta", "not JSON text"),
])
def test_malformed_arrow_is_bad_data(tmp_path, make, line, field, words):
    p = tmp_path / "bad.arrow"
    p.write_bytes(arrow_stream(make()))
    with pytest.raises(DataError) as e:
        list(RecordReader(str(p)))
    assert (e.value.line, e.value.field) == (line, field), str(e.value)
    assert words in str(e.value)


def test_arrow_names_a_field_once(tmp_path):
    """Two columns of one name, or a field both in its column and in the side column, are the
    Arrow form of a repeated key."""
    p = tmp_path / "bad.arrow"
    p.write_bytes(arrow_stream(pa.record_batch([pa.array(["a"]), pa.array([1.0]), pa.array([0.0])],
                                               names=["prompt_id", "reward", "reward"])))
    with pytest.raises(DataError) as e:
        list(RecordReader(str(p)))
    assert (e.value.line, e.value.field) == (1, "reward")
    p.write_bytes(arrow_stream(pa.record_batch(
        [pa.array(["a", "a"]), pa.array([1.0, 0.0]), pa.array([None, '{"reward": 1.0}'])],
        names=["prompt_id", "reward", EXTRA_COLUMN])))
    with pytest.raises(DataError) as e:
        list(RecordReader(str(p)))
    assert (e.value.line, e.value.field) == (2, "reward")


def test_invalid_utf8_deep_in_a_list_column(tmp_path):
    strings = _invalid_utf8_column()
    col = pa.ListArray.from_arrays(pa.array([0, 1, 2], pa.int32()), strings)
    p = tmp_path / "bad.arrow"
    p.write_bytes(arrow_stream(pa.record_batch([pa.array(["a", "a"]), col], names=["prompt_id", "tags"])))
    with pytest.raises(DataError) as e:
        list(RecordReader(str(p)))
    assert (e.value.line, e.value.field) == (2, "tags") and "UTF-8" in str(e.value)


# ----------------------------------------------------------------------------- through the CLI

CLI = {"build-tree": ["build-tree"], "advantages": ["advantages"],
       "verify": ["verify", "--task", "arith", "--workers", "0", "--quiet"]}


@pytest.mark.parametrize("cmd", CLI)
def test_cli_big_integers_round_trip_jsonl_and_arrow(cmd, tmp_path):
    recs = rollouts()
    for r, n in zip(recs, BIG):
        r["answer"] = n
        r["meta"] = {"id": 2**64 + 1, "ids": [n, 1]}
    src = tmp_path / "in.jsonl"
    src.write_bytes(jsonl(recs))
    r = run_tcli([*CLI[cmd], src, "-o", tmp_path / "out.jsonl"])
    assert r.returncode == 0, r.stderr
    r = run_tcli([*CLI[cmd], src, "-o", tmp_path / "mid.arrow"])
    assert r.returncode == 0, r.stderr
    r = run_tcli(["build-tree", tmp_path / "mid.arrow", "-o", tmp_path / "back.jsonl"])
    assert r.returncode == 0, r.stderr
    for name in ("out.jsonl", "back.jsonl"):
        raw = (tmp_path / name).read_bytes()
        for n in BIG[:3]:
            assert b'"answer":%d' % n in raw
        assert b'"id":18446744073709551617' in raw and b"e+" not in raw
        got = [json.loads(line) for line in raw.splitlines()]
        assert [g["answer"] for g in got] == BIG[:3]
        assert [g["meta"] for g in got] == [x["meta"] for x in recs]


@pytest.mark.parametrize("cmd", CLI)
@pytest.mark.parametrize("make, field", [
    (lambda b: b.replace(b'"reward":0.0', b'"reward":1,"reward":0.0'), "reward"),
    (lambda b: b.replace(b'"text":', b'"meta":{"k":1,"k":2},"text":'), "meta"),
    (lambda b: b.replace(b'"text":', b'"text":"x","text":'), "text"),
])
def test_cli_repeated_key_is_exit_65(cmd, make, field, tmp_path):
    lines = jsonl(rollouts()).splitlines(keepends=True)
    lines[1] = make(lines[1])
    src = tmp_path / "in.jsonl"
    src.write_bytes(b"".join(lines))
    r = run_tcli([*CLI[cmd], src, "-o", tmp_path / "out.jsonl"])
    assert r.returncode == 65, r.stderr
    msg = one_error_line(r.stderr)
    assert f"{src}:2: field '{field}'" in msg and "more than once" in msg
    assert os.listdir(tmp_path) == ["in.jsonl"]


@pytest.mark.parametrize("cmd", CLI)
@pytest.mark.parametrize("case", ["utf8", "json", "side"])
def test_cli_malformed_arrow_is_exit_65(cmd, case, tmp_path):
    good = tmp_path / "good.arrow"
    with RecordWriter(str(good)) as w:
        w.write_all(rollouts(meta={"k": 1}))
    table = pa.ipc.open_stream(good.read_bytes()).read_all()
    if case == "utf8":
        col, field = "text", "text"
        arr = pa.Array.from_buffers(pa.string(), 3, pa.array([b"a", b"b\xfe", b"c"]).buffers())
    elif case == "json":
        col, field = "meta", "meta"
        arr = pa.array(['{"k": 1}', '{"k": 1,', '{"k": 1}'])
    else:
        col, field = EXTRA_COLUMN, "reward"
        arr = pa.array([None, '{"reward": 1, "reward": 0}', None])
    i = table.schema.get_field_index(col)
    table = table.set_column(i, table.schema.field(i), arr)
    src = tmp_path / "in.arrow"
    src.write_bytes(arrow_stream(table))
    r = run_tcli([*CLI[cmd], src, "-o", tmp_path / "out.jsonl"])
    assert r.returncode == 65, r.stderr
    msg = one_error_line(r.stderr)
    assert f"{src}:2: field '{field}'" in msg, msg
    assert sorted(os.listdir(tmp_path)) == ["good.arrow", "in.arrow"]


def test_nineteen_digit_integer_on_a_long_line_stays_exact():
    """-9223372036854775809 (19 digits, one below int64's minimum) is the shortest integer orjson
    reads as a float; on a line long enough for the numpy scan it must still come back exact."""
    n = -9223372036854775809
    raw = b'{"pad": "%s", "n": %d}' % (b"x" * codec._NUMPY_FROM, n)
    assert len(raw) >= codec._NUMPY_FROM
    assert codec._long_int_np(np.frombuffer(raw, np.uint8))
    got = codec.loads(raw)["n"]
    assert got == n and type(got) is int


def test_only_a_syntax_error_on_the_last_line_is_called_truncated(tmp_path):
    """A last line without its newline that is not JSON was cut off; one that is JSON but breaks
    a rule (a repeated key, NaN) is reported for that rule, at its line."""
    p = tmp_path / "r.jsonl"
    for last, words, field in ((b'{"reward": 1', "truncated JSON", None),
                               (b'{"reward": 1, "reward": 0}', "appears more than once", "reward"),
                               (b'{"reward": NaN}', "NaN/Infinity", "reward")):
        p.write_bytes(b'{"reward": 1}\n' + last)
        with pytest.raises(DataError) as e:
            list(RecordReader(str(p)))
        assert words in e.value.message and (e.value.line, e.value.field) == (2, field), e.value
