"""Arrow IPC streams of records: the writing sink (schema inference, side columns) and the reader.

A record must come back exactly as it went in, whatever its fields and types. The schema comes
from the first batch; a field that is not a plain scalar or flat list becomes a JSON string
column (tagged ``tcli.json``), and a later value or field the schema cannot hold unchanged goes
to a JSON side column. pyarrow is imported inside the functions: commands that never see Arrow
do not pay for it.
"""

from __future__ import annotations

from typing import IO, Iterator

from tcli import SCHEMA
from tcli.errors import DataError
from tcli.io.codec import MAX_DEPTH, BadJson, dumps_value, loads
from tcli.io.schema import check_schema

ARROW_STREAM_MAGIC = b"\xff\xff\xff\xff"  # the first bytes of an Arrow IPC stream
ARROW_FILE_MAGIC = b"ARROW1"  # ... and of an Arrow IPC file
EXTRA_COLUMN = "_tcli_extra"  # JSON of fields that did not fit the Arrow schema of the stream
MISSING_COLUMN = "_tcli_missing"  # keys absent from a record whose column exists
_JSON_TAG = {"tcli.json": "1"}


# ----------------------------------------------------------------------------- writing

def _is_plain(v) -> bool:
    """A scalar or a flat list (type set of the elements in C, not a Python loop per element)."""
    nested = (dict, list, tuple)
    if isinstance(v, dict):
        return False
    if isinstance(v, (list, tuple)):
        return not any(issubclass(k, nested) for k in set(map(type, v)))
    return True


def _kind_check(typ):
    """A test on Python element types that an Arrow type stores and gives back unchanged, or None.

    pyarrow converts quietly between numbers (1 -> 1.0 in a double column, 0.5 -> 0 in an int
    column); a record must come back exactly as it went in, so such values take the side column.
    """
    import numpy as np
    import pyarrow as pa

    if pa.types.is_boolean(typ):
        return lambda k: k is bool or k is np.bool_
    if pa.types.is_integer(typ):
        return lambda k: issubclass(k, (int, np.integer)) and not issubclass(k, (bool, np.bool_))
    if pa.types.is_floating(typ):
        return lambda k: issubclass(k, (float, np.floating))
    if pa.types.is_string(typ) or pa.types.is_large_string(typ):
        return lambda k: issubclass(k, str)
    return None


def _misfits(vals: list, typ) -> list[int]:
    """Indices of values whose Python types the column ``typ`` would not give back unchanged."""
    import pyarrow as pa

    none = type(None)
    if pa.types.is_list(typ) or pa.types.is_large_list(typ):
        # an unknown element type (list<null>: the first batch had only empty lists) takes only
        # nulls; and a non-list must never reach Arrow, which reads "" as an empty list
        ok = _kind_check(typ.value_type) or (lambda k: False)
        return [i for i, v in enumerate(vals) if v is not None and (
            not isinstance(v, (list, tuple)) or not all(k is none or ok(k) for k in set(map(type, v))))]
    ok = _kind_check(typ)
    if ok is None:
        return []
    return [i for i, v in enumerate(vals) if v is not None and not ok(type(v))]


def _infer_field(name: str, vals: list):
    """The column for ``name`` from the first batch's values: Arrow's own type for plain values,
    else a JSON string column (also for all-null, whose type says nothing)."""
    import pyarrow as pa

    if all(_is_plain(v) for v in vals):
        try:
            typ = pa.array(vals).type
            if not pa.types.is_null(typ):
                return pa.field(name, typ)
        except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):
            pass  # mixed kinds, or integers beyond 64 bits
    return pa.field(name, pa.string(), metadata=_JSON_TAG)


def _infer_schema(recs: list[dict]):
    import pyarrow as pa

    keys = dict.fromkeys(k for r in recs for k in r)
    keys.pop(MISSING_COLUMN, None)  # a record's own fields of these names go to the side column
    keys.pop(EXTRA_COLUMN, None)
    fields = [_infer_field(k, [r.get(k) for r in recs]) for k in keys]
    fields.append(pa.field(MISSING_COLUMN, pa.list_(pa.string())))
    fields.append(pa.field(EXTRA_COLUMN, pa.string()))
    return pa.schema(fields, metadata={"tcli.schema": SCHEMA})


class _Side:
    """Per record of a batch: the fields without a column (written as JSON in EXTRA_COLUMN) and
    the column names the record lacks (MISSING_COLUMN), so a null is not mistaken for absence."""

    def __init__(self, recs: list[dict], names: list[str]):
        cols = set(names)
        self.extra = [{k: v for k, v in r.items() if k not in cols} for r in recs]
        self.missing = [[n for n in names if n not in r] for r in recs]

    def put(self, i: int, name: str, value) -> None:
        self.extra[i][name] = value
        self.missing[i].append(name)

    def arrays(self) -> list:
        import pyarrow as pa

        return [pa.array([m or None for m in self.missing], type=pa.list_(pa.string())),
                pa.array([dumps_value(e).decode() if e else None for e in self.extra],
                         type=pa.string())]


class ArrowSink:
    """Arrow IPC stream writer, one record batch per ``batch_size`` records."""

    def __init__(self, f: IO[bytes], batch_size: int = 1024):
        self.f = f
        self.batch_size = batch_size
        self.buf: list[dict] = []
        self.writer = None
        self.schema = None

    def write(self, rec: dict) -> None:
        self.buf.append(rec)
        if len(self.buf) >= self.batch_size:
            self.flush()

    def flush(self) -> None:
        import pyarrow as pa

        if not self.buf:
            return
        if self.schema is None:
            self.schema = _infer_schema(self.buf)
            self.writer = pa.ipc.new_stream(self.f, self.schema)
        fields = list(self.schema)[:-2]
        side = _Side(self.buf, [fld.name for fld in fields])
        arrays = [self._column(fld, [r.get(fld.name) for r in self.buf], side) for fld in fields]
        self.writer.write_batch(pa.record_batch(arrays + side.arrays(), schema=self.schema))
        self.buf = []

    @staticmethod
    def _column(fld, vals: list, side: _Side):
        """One column of the batch; values it would not give back unchanged go to ``side``."""
        import pyarrow as pa

        if fld.metadata and fld.metadata.get(b"tcli.json") == b"1":
            return pa.array([None if v is None else dumps_value(v).decode() for v in vals],
                            type=fld.type)
        for i in _misfits(vals, fld.type):  # Arrow would convert these silently
            side.put(i, fld.name, vals[i])
            vals[i] = None
        try:
            return pa.array(vals, type=fld.type)
        except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError, TypeError):
            # e.g. an integer beyond 64 bits: this batch's values of the column go to the side
            for i, v in enumerate(vals):
                if v is not None:
                    side.put(i, fld.name, v)
            return pa.nulls(len(vals), type=fld.type)

    def close(self) -> None:
        import pyarrow as pa

        self.flush()
        if self.writer is None:  # empty stream: still a valid Arrow stream with an empty schema
            self.schema = pa.schema([], metadata={"tcli.schema": SCHEMA})
            self.writer = pa.ipc.new_stream(self.f, self.schema)
        self.writer.close()
        self.f.flush()


# ----------------------------------------------------------------------------- reading

def _mapped(f: IO[bytes]):
    """A regular file (a path or a redirected stdin) memory-mapped at ``f``'s position, so that a
    corrupt message length is a short read (ArrowInvalid) instead of an allocation of what it
    claims (MemoryError); a pipe is read as it comes."""
    import mmap
    import os
    import stat

    import pyarrow as pa

    try:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode) or st.st_size == 0:
            return f
        m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        if hasattr(m, "madvise"):  # read once, front to back: pages behind may be dropped
            m.madvise(mmap.MADV_SEQUENTIAL)
        src = pa.BufferReader(pa.py_buffer(m))
        src.seek(f.tell())
        return src
    except (OSError, ValueError, AttributeError):
        return f


def _open(f: IO[bytes], name: str, file_format: bool | str, first: int = 0):
    """(schema, iterator of record batches); an unreadable header is bad data at the record
    after ``first``. ``file_format``: False (IPC stream), True (IPC file) or "parquet"."""
    import pyarrow as pa

    try:
        if file_format == "parquet":
            import pyarrow.parquet as pq

            pf = pq.ParquetFile(pa.BufferReader(f.read()))
            return pf.schema_arrow, pf.iter_batches(batch_size=1024)
        if file_format:
            reader = pa.ipc.open_file(pa.py_buffer(f.read()))
            return reader.schema, (reader.get_batch(i) for i in range(reader.num_record_batches))
        reader = pa.ipc.open_stream(_mapped(f))
        return reader.schema, iter(reader)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError, UnicodeDecodeError) as e:
        # (UnicodeDecodeError: a corrupt Parquet footer's column name that is not UTF-8)
        what = "Parquet file" if file_format == "parquet" else "Arrow stream"
        raise DataError(f"not a readable {what} ({e})", file=name, line=first + 1) from None


def _column_roles(schema, name: str) -> tuple[set[str], set[str]]:
    """(columns holding JSON text, columns to read as bytes): the JSON ones and the side column.
    Reading them as bytes leaves UTF-8 checking to the JSON decoder, which names the byte.
    A column name given twice is refused, like a repeated key in JSON."""
    import pyarrow as pa

    try:
        names = schema.names
    except UnicodeDecodeError:
        raise DataError("a column name is not valid UTF-8", file=name, line=1) from None
    twice = next((n for i, n in enumerate(names) if n in names[:i]), None)
    if twice is not None:
        raise DataError("column appears more than once in the Arrow schema", file=name, line=1,
                        field=twice)
    textual = (pa.types.is_string, pa.types.is_large_string, pa.types.is_binary,
               pa.types.is_large_binary)
    json_cols = {fld.name for fld in schema
                 if fld.metadata and fld.metadata.get(b"tcli.json") == b"1"}
    as_bytes = json_cols | ({EXTRA_COLUMN} & set(schema.names))
    for col in as_bytes:
        if not any(is_type(schema.field(col).type) for is_type in textual):
            raise DataError(f"column holds {schema.field(col).type}, not JSON text", file=name,
                            line=1, field=col)
    if MISSING_COLUMN in schema.names:
        typ = schema.field(MISSING_COLUMN).type
        if not ((pa.types.is_list(typ) or pa.types.is_large_list(typ))
                and any(is_type(typ.value_type) for is_type in textual[:2])):
            raise DataError(f"column holds {typ}, not a list of strings", file=name, line=1,
                            field=MISSING_COLUMN)
    return json_cols, as_bytes


def _as_binary(col):
    import pyarrow as pa

    if pa.types.is_string(col.type):
        return col.cast(pa.binary())
    if pa.types.is_large_string(col.type):
        return col.cast(pa.large_binary())
    return col


def _check_batch(batch, name: str, first: int) -> None:
    """Full validation of a batch decoded from bytes: corrupt offsets or lengths crash the
    conversion to Python instead of raising. Top-level strings are checked as bytes; invalid UTF-8
    is left to the conversion, which names its record and field."""
    import pyarrow as pa

    try:
        pa.RecordBatch.from_arrays([_as_binary(c) for c in batch.columns],
                                   names=batch.schema.names).validate(full=True)
    except pa.ArrowInvalid as e:
        if "Invalid UTF8" not in str(e):
            raise DataError(f"corrupt record batch ({' '.join(str(e).split())})", file=name,
                            line=first + 1) from None


def _rows(batch, as_bytes: set[str], name: str, first: int) -> list[dict]:
    """``batch.to_pylist()`` with the ``as_bytes`` columns as bytes; a value Python cannot take
    (invalid UTF-8 in a string, an out-of-range date) is bad data at its record and field."""
    import pyarrow as pa

    _check_batch(batch, name, first)
    if as_bytes:
        cols = [_as_binary(c) if n in as_bytes else c
                for n, c in zip(batch.schema.names, batch.columns)]
        batch = pa.RecordBatch.from_arrays(cols, names=batch.schema.names)
    try:
        return batch.to_pylist()
    except (ValueError, TypeError, OverflowError, NotImplementedError, pa.ArrowException) as e:
        raise _locate(batch, name, first, e) from None


def _locate(batch, name: str, first: int, err: Exception) -> DataError:
    """The record and column of the first value that ``to_pylist`` could not convert."""
    for field, col in zip(batch.schema.names, batch.columns):
        for i in range(len(col)):
            try:
                col[i].as_py()
            except Exception as e:  # noqa: BLE001 - whatever pyarrow raised, it is this value
                what = ("invalid UTF-8 in a string" if isinstance(e, UnicodeDecodeError)
                        else f"unreadable value ({' '.join(str(e).split())})")
                return DataError(what, file=name, line=first + i + 1, field=field)
    return DataError(f"unreadable record batch ({' '.join(str(err).split())})", file=name,
                     line=first + 1)


def _json_cell(raw: bytes, name: str, line: int, col: str):
    try:  # a column's value sits one level inside its record; the side column's fields do not
        return loads(raw, MAX_DEPTH if col == EXTRA_COLUMN else MAX_DEPTH - 1)
    except BadJson as e:
        field = e.field if col == EXTRA_COLUMN and e.field else col
        raise DataError(f"bad JSON in Arrow column {col!r}: {e.message}", file=name, line=line,
                        field=field) from None


def _finish(rec: dict, json_cols: set[str], name: str, line: int) -> dict:
    """A row as the record that was written: JSON cells parsed, side columns applied."""
    for k in json_cols:
        v = rec.get(k)
        if v is not None:
            rec[k] = _json_cell(v, name, line, k)
    missing = rec.pop(MISSING_COLUMN, None)
    extra = rec.pop(EXTRA_COLUMN, None)
    if missing:
        for k in missing:
            rec.pop(k, None)
    if extra is not None:
        side = _json_cell(extra, name, line, EXTRA_COLUMN)
        if not isinstance(side, dict):
            raise DataError(f"must hold a JSON object, got {type(side).__name__}", file=name,
                            line=line, field=EXTRA_COLUMN)
        both = next((k for k in side if k in rec), None)
        if both is not None:
            raise DataError(f"given both as a column and in {EXTRA_COLUMN}", file=name,
                            line=line, field=both)
        rec.update(side)
    check_schema(rec, name, line)
    return rec


def iter_arrow(f: IO[bytes], name: str, file_format: bool | str, first: int = 0
               ) -> Iterator[tuple[int, dict]]:
    """Records of an Arrow IPC stream or file, or a Parquet file (``file_format="parquet"``),
    numbered from ``first + 1``."""
    import pyarrow as pa

    schema, batches = _open(f, name, file_format, first)
    tag = (schema.metadata or {}).get(b"tcli.schema")
    if tag is not None:
        check_schema({"schema": tag.decode("utf-8", "replace")}, name, 1)
    json_cols, as_bytes = _column_roles(schema, name)
    n = first
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            return
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError) as e:
            what = "Parquet file" if file_format == "parquet" else "Arrow stream"
            raise DataError(f"truncated or corrupt {what} after record {n} ({e})",
                            file=name, line=n + 1) from None
        for rec in _rows(batch, as_bytes, name, n):
            n += 1
            yield n, _finish(rec, json_cols, name, n)
