"""Record I/O edges the main tests leave open: where an error points (line, column, field), what
the reader calls a truncated line, saved-dataset file names, and the atomic writer's steps."""

from __future__ import annotations

import io
import json
import os

import pytest

from tcli.errors import DataError, TcliError
from tcli.io import ARROW_STREAM_MAGIC, RecordReader, RecordWriter, dumps, output_format
from tcli.io.arrow import iter_arrow
from tcli.io.benchmarks import BENCHMARKS, _size, benchmark_table, resolve_data
from tcli.io.codec import MAX_DEPTH

from conftest import arrow_bytes, read_all


def refusal(path, input_format=None) -> DataError:
    with pytest.raises(DataError) as e:
        read_all(path, input_format)
    return e.value


# ----------------------------------------------------------------------------- JSONL


def test_invalid_utf8_names_its_line_and_1_based_column(tmp_path):
    p = tmp_path / "u.jsonl"
    p.write_bytes(b'{"prompt_id": 1}\n{"text": "ab\xffc"}\n')
    e = refusal(p)
    assert e.line == 2
    assert "byte 0xff at column 13" in str(e)  # '{"text": "ab' is 12 bytes


@pytest.mark.parametrize("last, truncated", [
    (b'{"prompt_id": 2', True),              # cut inside the object
    (b'{"prompt_id": 2, "text": "ab', True),  # cut inside a string
    (b'{"prompt_id": 2\r', True),             # CRLF file cut before its last "}"
    (b'{"prompt_id": 2}}', False),            # a stray "}" after a complete object
    (b'{"prompt_id": 2}\r{"prompt_id": 3}', False),  # CR-only line ends: two records on a line
])
def test_only_a_cut_last_line_is_called_truncated(tmp_path, last, truncated):
    """A last line without newline whose JSON is complete but followed by junk is invalid JSON
    at that spot, not a truncated file: the hint would send the user looking for a crash."""
    p = tmp_path / "t.jsonl"
    p.write_bytes(b'{"prompt_id": 1}\n' + last)
    e = refusal(p)
    assert e.line == 2
    assert ("truncated" in str(e)) == truncated, str(e)
    if not truncated:
        assert "unexpected content after document" in str(e)


def test_a_stray_line_with_commas_later_in_jsonl_is_not_called_csv(tmp_path):
    """Only a first line decides "this is CSV": a log line that slipped into a JSONL stream
    later (a tool printing to stdout) is invalid JSON at its line."""
    p = tmp_path / "r.jsonl"
    p.write_bytes(b'{"prompt_id": 1}\nWARNING: slow tokenizer, falling back\n{"prompt_id": 2}\n')
    e = refusal(p)
    assert e.line == 2 and "invalid JSON" in str(e) and "CSV" not in str(e)
    p.write_bytes(b"id,prompt\n1,hi\n")  # (a real CSV file is named as such)
    assert "looks like CSV" in str(refusal(p))


def test_reading_stdin_leaves_it_open(monkeypatch):
    """The reader closes the files it opened, never the process's stdin."""
    stdin = io.TextIOWrapper(io.BufferedReader(io.BytesIO(b'{"prompt_id": 1}\n')))
    monkeypatch.setattr("sys.stdin", stdin)
    assert read_all("-") == [{"prompt_id": 1}]
    assert not stdin.buffer.closed


def test_big_integers_in_a_tuple_are_written_exactly():
    """Stages may hold lists as tuples; orjson refuses integers beyond 64 bits wherever they sit."""
    assert dumps({"ids": (2**70, -(2**64)), "n": [(2**65,)]}) == (
        b'{"ids":[1180591620717411303424,-18446744073709551616],"n":[[36893488147419103232]]}\n')


def nested(depth: int) -> bytes:
    """A record ``depth`` containers deep (the record is one of them) in field "meta"."""
    return b'{"prompt_id": 1, "meta": ' + b"[" * (depth - 1) + b"]" * (depth - 1) + b"}\n"


@pytest.mark.parametrize("fmt", ["jsonl", "arrow"])
def test_deepest_record_tcli_can_write_goes_through_both_formats(tmp_path, fmt):
    p, out = tmp_path / "deep.jsonl", tmp_path / f"out.{fmt}"
    p.write_bytes(nested(MAX_DEPTH))
    recs = read_all(p)
    with RecordWriter(str(out)) as w:
        w.write_all(recs)
    assert read_all(out) == recs


@pytest.mark.parametrize("fmt", ["jsonl", "arrow"])
def test_a_record_nested_too_deep_to_write_is_bad_data_at_its_line(tmp_path, fmt):
    """Before: read, then the writer failed with 'TypeError: Recursion limit reached' (exit 1,
    no file, no line) once the stage had run."""
    p = tmp_path / "deep.jsonl"
    p.write_bytes(b'{"prompt_id": 0}\n' + nested(MAX_DEPTH + 1))
    if fmt == "arrow":  # the same record in an Arrow stream, written by another tool
        import pyarrow as pa

        q = tmp_path / "deep.arrow"
        meta = pa.field("meta", pa.string(), metadata={"tcli.json": "1"})
        t = pa.table([pa.array([0, 1]), pa.array([None, nested(MAX_DEPTH + 1)[25:-2].decode()])],
                     schema=pa.schema([pa.field("prompt_id", pa.int64()), meta]))
        with pa.ipc.new_stream(str(q), t.schema) as w:
            w.write_table(t)
        p = q
    e = refusal(p)
    assert (e.line, e.field) == (2, "meta") and "nested more than" in str(e)


# ------------------------------------------------------------------------- JSONL and Arrow agree


@pytest.mark.parametrize("later", ["", "ab", [None], [1, "x"], 0, {}, None])
@pytest.mark.parametrize("batch_size", [1, 2])
def test_a_column_of_empty_lists_gives_later_values_back_unchanged(tmp_path, later, batch_size):
    """The first batch's empty lists make an Arrow list<null> column. Before: a later "" in it
    came back from Arrow as [] (pyarrow reads a string as a sequence), unlike from JSONL."""
    recs = [{"prompt_id": 1, "turns": []}, {"prompt_id": 2, "turns": later},
            {"prompt_id": 3, "turns": []}]
    p = tmp_path / "t.arrow"
    p.write_bytes(arrow_bytes(recs, batch_size))
    assert [dumps(r) for r in read_all(p)] == [dumps(r) for r in recs]


@pytest.mark.parametrize("first, later", [(1, True), (True, 1), (0, False), ([1], [True]),
                                          (1.5, True), ("a", 1), (1, 2**70)])
def test_a_later_value_of_another_kind_comes_back_as_it_was(tmp_path, first, later):
    """pyarrow stores True in an int64 column as 1 (and 1 in a bool column as true) without a
    word; such a value must take the side column, so Arrow gives back what JSONL does."""
    recs = [{"reward": first}, {"reward": later}, {"reward": first}]
    p = tmp_path / "k.arrow"
    p.write_bytes(arrow_bytes(recs, batch_size=1))
    assert [dumps(r) for r in read_all(p)] == [dumps(r) for r in recs]


# ----------------------------------------------------------------------------- Arrow reading


def test_a_cut_arrow_stream_names_the_record_after_the_last_good_one(tmp_path):
    recs = [{"prompt_id": i, "token_ids": list(range(50))} for i in range(100)]
    data = arrow_bytes(recs, batch_size=10)
    p = tmp_path / "cut.arrow"
    p.write_bytes(data[: len(data) * 2 // 3])
    got = []
    with pytest.raises(DataError) as e:
        for line, rec in RecordReader(str(p)):
            got.append(line)
    n = len(got)
    assert 0 < n < 100 and got == list(range(1, n + 1))
    assert e.value.line == n + 1 and f"after record {n}" in str(e.value)


def test_an_arrow_stdin_is_read_from_where_it_stands(tmp_path):
    """A redirected stdin is memory-mapped; the map must start at the descriptor's position
    (``{ head -c 6 >/dev/null; tcli ...; } < file``), not at the file's first byte."""
    recs = [{"prompt_id": 1, "token_ids": [1, 2]}, {"prompt_id": 2, "token_ids": []}]
    p = tmp_path / "prefixed"
    p.write_bytes(b"header" + arrow_bytes(recs))
    with open(p, "rb") as f:
        f.seek(6)
        assert [rec for _, rec in iter_arrow(f, "<stdin>", file_format=False)] == recs


def test_a_newer_schema_tag_in_an_arrow_record_is_refused_as_in_jsonl(tmp_path):
    recs = [{"prompt_id": 1, "schema": "tcli.rollout/1"},
            {"prompt_id": 2, "schema": "tcli.rollout/99"}]
    for fmt, data in (("jsonl", b"".join(dumps(r) for r in recs)), ("arrow", arrow_bytes(recs))):
        p = tmp_path / f"s.{fmt}"
        p.write_bytes(data)
        e = refusal(p)
        assert (e.line, e.field) == (2, "schema") and "newer" in str(e), fmt


# ----------------------------------------------------------------------------- saved datasets


def test_saved_dataset_file_name_with_a_nul_byte_is_bad_data(tmp_path):
    """Before: open() raised ValueError ("embedded null byte"), exit 1 without the file."""
    d = tmp_path / "ds"
    d.mkdir()
    (d / "state.json").write_text(json.dumps({"_data_files": [{"filename": "a\0b.arrow"}]}))
    e = refusal(d)
    assert e.file == str(d / "state.json") and "not a file name" in str(e)


# ----------------------------------------------------------------------------- output names


@pytest.mark.parametrize("name, fmt", [("out.ARROW", "arrow"), ("out.Arrow", "arrow"),
                                       ("out.IPC", "arrow"), ("out.arrows", "arrow"),
                                       ("out.ipc", "arrow"), ("out.JSONL", "jsonl")])
def test_output_suffix_is_read_in_any_case(name, fmt):
    """Before: .PQ and .JSON were refused whatever their case, but OUT.ARROW silently got JSONL,
    which Arrow readers of other tools cannot open."""
    assert output_format(name, None) == fmt


def test_arrow_named_output_in_upper_case_is_an_arrow_stream(tmp_path):
    p = tmp_path / "OUT.ARROW"
    with RecordWriter(str(p)) as w:
        w.write({"prompt_id": 1})
    assert p.read_bytes().startswith(ARROW_STREAM_MAGIC)
    assert read_all(p) == [{"prompt_id": 1}]


# ----------------------------------------------------------------------------- shipped benchmarks


def test_a_path_hiding_a_benchmark_is_said_once_and_a_dataset_dict_hides_it(tmp_path, monkeypatch,
                                                                           capsys):
    """A DatasetDict directory of a benchmark's name is data too: reading it (and being told to
    pick a split) beats scoring the shipped file under the user's name without a word."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("tcli.io.benchmarks._SAID_SHADOWED", set())
    (tmp_path / "aime24").mkdir()
    (tmp_path / "aime24" / "dataset_dict.json").write_text('{"splits": ["train"]}')
    assert resolve_data("aime24") == "aime24"
    assert resolve_data("aime24") == "aime24"
    assert capsys.readouterr().err.count("not the shipped benchmark 'aime24'") == 1


def test_benchmark_table_right_aligns_rows_and_sizes():
    lines = benchmark_table().splitlines()
    for col, cell in (("rows", lambda b: str(b.rows)), ("size", lambda b: _size(b.path))):
        end = lines[0].index(col) + len(col)
        for ln, b in zip(lines[1:], BENCHMARKS.values()):
            assert ln[:end].endswith(" " + cell(b)), (col, ln)


# ----------------------------------------------------------------------------- atomic output


def test_the_temporary_name_never_takes_over_an_existing_file(tmp_path, monkeypatch):
    """The temporary file is created, never opened over a file that is there: a file of that
    name (another writer's, or the user's) is not truncated and then renamed away."""
    draws = iter([b"\0\0\0\0", b"\0\0\0\1"])
    monkeypatch.setattr(os, "urandom", lambda n: next(draws))
    target = tmp_path / "out.jsonl"
    theirs = tmp_path / "out.jsonl.tmp-00000000"
    theirs.write_bytes(b"not tcli's\n")
    with RecordWriter(str(target)) as w:
        w.write({"prompt_id": 1})
    assert theirs.read_bytes() == b"not tcli's\n"
    assert read_all(target) == [{"prompt_id": 1}]
    assert sorted(os.listdir(tmp_path)) == ["out.jsonl", "out.jsonl.tmp-00000000"]


@pytest.mark.skipif(os.geteuid() != 0, reason="only root can give a file to another user")
def test_a_replaced_file_keeps_its_owner_where_allowed(tmp_path):
    target = tmp_path / "out.jsonl"
    target.write_bytes(b"old\n")
    os.chown(target, 4321, 4322)
    os.chmod(target, 0o640)
    with RecordWriter(str(target)) as w:
        w.write({"prompt_id": 1})
    st = target.stat()
    assert (st.st_uid, st.st_gid, st.st_mode & 0o7777) == (4321, 4322, 0o640)
    assert read_all(target) == [{"prompt_id": 1}]


def test_an_output_that_cannot_be_created_is_a_runtime_error_naming_it(tmp_path, monkeypatch):
    """A read-only directory (which root, running these tests, never meets) is exit 1, not a
    usage error: the command line is right, the machine refuses it."""
    def refuse(*a, **k):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(os, "open", refuse)
    with pytest.raises(TcliError) as e:
        RecordWriter(str(tmp_path / "out.jsonl"))
    assert e.value.exit_code == 1
    assert str(e.value) == f"cannot write {tmp_path / 'out.jsonl'}: Permission denied"


@pytest.mark.parametrize("stem", ["x" * 245, "x" + "é" * 122])  # 251 bytes with ".jsonl"
def test_an_output_name_near_the_length_limit_is_written(tmp_path, stem):
    """Before: '<name>.tmp-<8 hex>' passed the 255-byte limit of a file name, so a legal name
    failed with 'File name too long'."""
    target = tmp_path / f"{stem}.jsonl"
    with RecordWriter(str(target)) as w:
        w.write({"prompt_id": 1})
    assert read_all(target) == [{"prompt_id": 1}] and os.listdir(tmp_path) == [target.name]
    with pytest.raises(RuntimeError):
        with RecordWriter(str(target)) as w:
            w.write({"prompt_id": 2})
            raise RuntimeError("stage failed")
    assert read_all(target) == [{"prompt_id": 1}] and os.listdir(tmp_path) == [target.name]


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_a_failed_device_write_does_not_claim_nothing_was_written():
    """Bytes sent to a device cannot be taken back: only an atomic output may say so."""
    with pytest.raises(TcliError) as e:
        with RecordWriter("/dev/full") as w:
            w.write({"prompt_id": 1})
    assert str(e.value) == "cannot write /dev/full: No space left on device"


def test_a_committed_output_syncs_its_file_then_its_directory(tmp_path, monkeypatch):
    """The rename is durable only once the directory is synced: a power loss right after a
    step could otherwise bring the old file back under a run that went on."""
    synced = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")),
                                                 real(fd)))
    out = tmp_path / "out.jsonl"
    with RecordWriter(str(out)) as w:
        w.write({"a": 1})
    assert out.read_bytes() == b'{"a":1}\n'
    assert synced[-1] == str(tmp_path) and synced[-2].startswith(str(out) + ".tmp-"), synced
