"""Record I/O edges the main tests leave open: where an error points (line, column, field), what
the reader calls a truncated line, saved-dataset file names, and the atomic writer's steps."""

from __future__ import annotations

import json

import pytest

from tcli.errors import DataError
from tcli.io import ARROW_STREAM_MAGIC, RecordReader, RecordWriter, output_format


def read_all(path, input_format=None) -> list[dict]:
    return [rec for _, rec in RecordReader(str(path), input_format)]


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
