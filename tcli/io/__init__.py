"""Record streams: JSONL and Arrow IPC, format detection, atomic output, grouping.

Records are plain dicts. Readers yield ``(line, record)`` where ``line`` is the 1-based line
(JSONL) or record number (Arrow), so every later error can name where the bad data came from.
"""

from __future__ import annotations

import io
import os
import sys
import tempfile
from dataclasses import dataclass, field
from typing import IO, Iterable, Iterator

import orjson

from tcli import SCHEMA, SCHEMA_MAJOR
from tcli.errors import DataError, TcliError, UsageError

ARROW_STREAM_MAGIC = b"\xff\xff\xff\xff"
ARROW_FILE_MAGIC = b"ARROW1"
EXTRA_COLUMN = "_tcli_extra"  # JSON of fields that did not fit the Arrow schema of the stream
MISSING_COLUMN = "_tcli_missing"  # keys absent from a record whose column exists
FORMATS = ("jsonl", "arrow")


def display_name(path: str) -> str:
    return "<stdin>" if path == "-" else path


# ----------------------------------------------------------------------------- reading

def check_schema(rec: dict, file: str, line: int) -> None:
    tag = rec.get("schema")
    if tag is None:
        return
    if not isinstance(tag, str) or not tag.startswith("tcli.rollout/"):
        raise DataError(f"unknown schema tag {tag!r} (expected {SCHEMA!r})", file=file, line=line,
                        field="schema")
    major = tag.rsplit("/", 1)[1].split(".")[0]
    if not major.isdigit():
        raise DataError(f"malformed schema tag {tag!r}", file=file, line=line, field="schema")
    if int(major) > SCHEMA_MAJOR:
        raise DataError(f"schema {tag!r} is newer than this tcli understands ({SCHEMA!r}); upgrade tcli",
                        file=file, line=line, field="schema")


def _open_binary(path: str) -> IO[bytes]:
    if path == "-":
        if sys.stdin is None:
            raise UsageError("no input: stdin is closed; give an INPUT path")
        if sys.stdin.isatty():
            raise UsageError("no input: stdin is a terminal; pipe records in or give an INPUT path")
        return sys.stdin.buffer
    try:
        return open(path, "rb")
    except FileNotFoundError:
        raise UsageError(f"input file not found: {path}") from None
    except IsADirectoryError:
        raise UsageError(f"input is a directory: {path}") from None


def _peek(f: IO[bytes], n: int = 8) -> bytes:
    if hasattr(f, "peek"):
        data = f.peek(n)
        if len(data) < n:  # peek may return fewer bytes than available; good enough for magic
            return data[:n]
        return data[:n]
    raise UsageError("input is not peekable")


def detect_format(head: bytes) -> str:
    if head.startswith(ARROW_STREAM_MAGIC):
        return "arrow"
    if head.startswith(ARROW_FILE_MAGIC):
        return "arrow-file"
    return "jsonl"


def _nonfinite_field(raw: bytes) -> str | None:
    """The top-level field holding NaN/Infinity (or a number too large for a float), if that is why
    orjson rejected the line. Python's json accepts those literals, so it can point at the field."""
    import json
    import math

    try:
        obj = json.loads(raw)
    except (ValueError, RecursionError):
        return None

    def bad(v) -> bool:
        if isinstance(v, float):
            return not math.isfinite(v)
        if isinstance(v, list):
            return any(bad(x) for x in v)
        if isinstance(v, dict):
            return any(bad(x) for x in v.values())
        return False

    if isinstance(obj, dict):
        for k, v in obj.items():
            if bad(v):
                return k
    return None


def _iter_jsonl(f: IO[bytes], name: str) -> Iterator[tuple[int, dict]]:
    for lineno, raw in enumerate(f, 1):
        if not raw.strip():
            continue  # blank lines are allowed and ignored (documented in the README)
        try:
            rec = orjson.loads(raw)
        except orjson.JSONDecodeError as e:
            field = _nonfinite_field(raw)
            if field is not None:
                raise DataError("NaN/Infinity (or a number too large for a float) is not valid "
                                "JSON; write a finite number", file=name, line=lineno,
                                field=field) from None
            truncated = not raw.endswith(b"\n")
            what = "truncated JSON (no newline at end of input)" if truncated else f"invalid JSON ({e})"
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as u:  # orjson's message for this is about surrogates
                what = f"invalid UTF-8 (byte 0x{raw[u.start]:02x} at column {u.start + 1})"
            raise DataError(what, file=name, line=lineno) from None
        if not isinstance(rec, dict):
            raise DataError(f"record is a JSON {type(rec).__name__}, not an object", file=name,
                            line=lineno)
        check_schema(rec, name, lineno)
        yield lineno, rec


def _iter_arrow(f: IO[bytes], name: str, file_format: bool) -> Iterator[tuple[int, dict]]:
    import pyarrow as pa

    try:
        if file_format:
            reader = pa.ipc.open_file(pa.py_buffer(f.read()))
            batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
        else:
            reader = pa.ipc.open_stream(f)
            batches = iter(reader)
        json_cols = {fld.name for fld in reader.schema
                     if fld.metadata and fld.metadata.get(b"tcli.json") == b"1"}
    except (pa.ArrowInvalid, OSError) as e:
        raise DataError(f"not a readable Arrow stream ({e})", file=name, line=1) from None
    tag = (reader.schema.metadata or {}).get(b"tcli.schema")
    if tag is not None:
        check_schema({"schema": tag.decode("utf-8", "replace")}, name, 1)
    n = 0
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            return
        except (pa.ArrowInvalid, OSError) as e:
            raise DataError(f"truncated or corrupt Arrow stream after record {n} ({e})",
                            file=name, line=n + 1) from None
        for rec in batch.to_pylist():
            n += 1
            for k in json_cols:
                v = rec.get(k)
                if v is not None:
                    rec[k] = orjson.loads(v)
            missing = rec.pop(MISSING_COLUMN, None)
            extra = rec.pop(EXTRA_COLUMN, None)
            if missing:
                for k in missing:
                    rec.pop(k, None)
            if extra:
                rec.update(orjson.loads(extra))
            check_schema(rec, name, n)
            yield n, rec


@dataclass
class RecordReader:
    """Iterates ``(line, record)`` from a path or stdin, in JSONL or Arrow (auto-detected)."""

    path: str = "-"
    input_format: str | None = None  # jsonl | arrow | None (detect)
    name: str = field(init=False)

    def __post_init__(self) -> None:
        self.name = display_name(self.path)
        if self.input_format not in (None, "auto", "jsonl", "arrow"):
            raise UsageError(f"unknown input format {self.input_format!r}; valid: jsonl, arrow")

    def __iter__(self) -> Iterator[tuple[int, dict]]:
        f = _open_binary(self.path)
        try:
            fmt = self.input_format if self.input_format not in (None, "auto") else None
            head = _peek(f)
            detected = detect_format(head)
            if fmt is None:
                fmt = detected
            elif fmt == "arrow" and detected == "arrow-file":
                fmt = "arrow-file"
            if fmt == "jsonl":
                yield from _iter_jsonl(f, self.name)
            else:
                yield from _iter_arrow(f, self.name, file_format=(fmt == "arrow-file"))
        finally:
            if f is not sys.stdin.buffer:
                f.close()


def read_records(path: str = "-", input_format: str | None = None) -> Iterator[tuple[int, dict]]:
    return iter(RecordReader(path, input_format))


# ----------------------------------------------------------------------------- grouping

class SeenKeys:
    """Set of group keys seen so far, in about 8 bytes per key, for streams of millions of groups.

    A key is kept as a 64-bit BLAKE2b digest: recent digests in a small Python set, merged in
    batches into one sorted numpy array (a set of Python strings costs about 90 bytes per key and
    made peak memory grow with the stream). Two different keys share a digest with probability
    about n**2 / 2**65 for n keys (3e-6 at ten million groups); such a pair would be reported as
    a repeated group.
    """

    def __init__(self, batch: int = 4096):
        self._batch = batch
        self._recent: set[int] = set()
        self._sorted = None  # numpy uint64, ascending
        self._n = 0

    @staticmethod
    def digest(key) -> int:
        import hashlib

        data = b"s" + key.encode("utf-8", "surrogatepass") if isinstance(key, str) \
            else b"i" + str(key).encode()
        return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")

    def __len__(self) -> int:
        return self._n

    def _in_sorted(self, h: int) -> bool:
        import numpy as np

        arr = self._sorted
        if arr is None or not len(arr):
            return False
        i = int(np.searchsorted(arr, np.uint64(h)))
        return i < len(arr) and int(arr[i]) == h

    def add(self, key) -> bool:
        """Add ``key``; False if it was already there."""
        h = self.digest(key)
        if h in self._recent or self._in_sorted(h):
            return False
        self._recent.add(h)
        self._n += 1
        if len(self._recent) >= max(self._batch, self._n // 64):  # amortised O(1) per key
            self._merge()
        return True

    def _merge(self) -> None:
        import numpy as np

        new = np.sort(np.fromiter(self._recent, dtype=np.uint64, count=len(self._recent)))
        if self._sorted is None:
            self._sorted = new
        else:
            self._sorted = np.insert(self._sorted, np.searchsorted(self._sorted, new), new)
        self._recent = set()


def _check_sample_ids(recs: list[dict], lines: list[int], name: str, sample_key: str) -> None:
    """``sample_id`` is optional; when present it is a non-negative integer, unique in its group."""
    seen: dict[int, int] = {}
    for line, rec in zip(lines, recs):
        if sample_key not in rec:
            continue
        s = rec[sample_key]
        if isinstance(s, bool) or not isinstance(s, int) or s < 0:
            raise DataError(f"must be a non-negative integer, got {s!r}", file=name, line=line,
                            field=sample_key)
        if s in seen:
            raise DataError(f"duplicate {sample_key} {s} in group {rec.get('prompt_id')!r} (also "
                            f"on line {seen[s]})", file=name, line=line, field=sample_key)
        seen[s] = line


def iter_groups(records: Iterable[tuple[int, dict]], name: str, key: str = "prompt_id",
                sample_key: str | None = "sample_id") -> Iterator[tuple[list[int], list[dict]]]:
    """Yield consecutive records sharing ``key`` as (lines, records); a key seen again is an error,
    and so is a repeated ``sample_key`` inside a group. Memory: one group plus ~8 bytes per key."""
    seen = SeenKeys()
    cur_key = object()
    lines: list[int] = []
    recs: list[dict] = []
    for line, rec in records:
        try:
            k = rec[key]
        except KeyError:
            raise DataError("missing required field", file=name, line=line, field=key) from None
        if not isinstance(k, (str, int)) or isinstance(k, bool):
            raise DataError(f"must be a string or integer, got {type(k).__name__}", file=name,
                            line=line, field=key)
        if k != cur_key or type(k) is not type(cur_key):
            if recs:
                if sample_key:
                    _check_sample_ids(recs, lines, name, sample_key)
                yield lines, recs
            if not seen.add(k):
                raise DataError(f"group {k!r} appears again after other groups; records of one "
                                f"prompt must be consecutive (sort the stream by {key})",
                                file=name, line=line, field=key)
            cur_key = k
            lines, recs = [], []
        lines.append(line)
        recs.append(rec)
    if recs:
        if sample_key:
            _check_sample_ids(recs, lines, name, sample_key)
        yield lines, recs


# ----------------------------------------------------------------------------- writing

def _json_default(obj):
    import numpy as np

    if isinstance(obj, np.generic):
        return obj.item()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def dumps(rec: dict) -> bytes:
    return orjson.dumps(rec, default=_json_default,
                        option=orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_APPEND_NEWLINE)


class _JsonlSink:
    def __init__(self, f: IO[bytes]):
        self.f = f

    def write(self, rec: dict) -> None:
        self.f.write(dumps(rec))

    def close(self) -> None:
        self.f.flush()


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
        ok = _kind_check(typ.value_type)
        if ok is None:
            return []
        out = []
        for i, v in enumerate(vals):
            if v is None:
                continue
            if not isinstance(v, (list, tuple)) or not all(k is none or ok(k) for k in set(map(type, v))):
                out.append(i)
        return out
    ok = _kind_check(typ)
    if ok is None:
        return []
    return [i for i, v in enumerate(vals) if v is not None and not ok(type(v))]


class _ArrowSink:
    """Arrow IPC stream. The schema is inferred from the first batch; later fields or values that
    do not fit it go to a JSON side column, so every record round-trips exactly."""

    def __init__(self, f: IO[bytes], batch_size: int = 1024):
        self.f = f
        self.batch_size = batch_size
        self.buf: list[dict] = []
        self.writer = None
        self.schema = None
        self.json_cols: set[str] = set()

    def write(self, rec: dict) -> None:
        self.buf.append(rec)
        if len(self.buf) >= self.batch_size:
            self.flush()

    def _infer_schema(self, recs: list[dict]):
        import pyarrow as pa

        keys: dict[str, None] = {}
        for r in recs:
            for k in r:
                keys.setdefault(k)
        keys.pop(MISSING_COLUMN, None)  # a record's own fields of these names go to the side column
        keys.pop(EXTRA_COLUMN, None)
        fields = []
        for k in keys:
            vals = [r.get(k) for r in recs]
            if all(_is_plain(v) for v in vals):
                try:
                    typ = pa.array(vals).type
                    if pa.types.is_null(typ):
                        typ = pa.string()
                        self.json_cols.add(k)
                        fields.append(pa.field(k, typ, metadata={"tcli.json": "1"}))
                        continue
                    fields.append(pa.field(k, typ))
                    continue
                except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):
                    pass
            self.json_cols.add(k)
            fields.append(pa.field(k, pa.string(), metadata={"tcli.json": "1"}))
        fields.append(pa.field(MISSING_COLUMN, pa.list_(pa.string())))
        fields.append(pa.field(EXTRA_COLUMN, pa.string()))
        return pa.schema(fields, metadata={"tcli.schema": SCHEMA})

    def flush(self) -> None:
        import pyarrow as pa

        if not self.buf:
            return
        if self.schema is None:
            self.schema = self._infer_schema(self.buf)
            self.writer = pa.ipc.new_stream(self.f, self.schema)
        names = [f.name for f in self.schema][:-2]
        columns: dict[str, list] = {n: [] for n in names}
        missing_col, extra_col = [], []
        for r in self.buf:
            extra = {k: v for k, v in r.items() if k not in columns}
            missing = [n for n in names if n not in r]
            for n in names:
                v = r.get(n)
                if v is not None and n in self.json_cols:
                    v = orjson.dumps(v, default=_json_default,
                                     option=orjson.OPT_SERIALIZE_NUMPY).decode()
                columns[n].append(v)
            missing_col.append(missing or None)
            extra_col.append(orjson.dumps(extra, default=_json_default,
                                          option=orjson.OPT_SERIALIZE_NUMPY).decode()
                             if extra else None)
        arrays = []

        def to_side(i: int, name: str, v) -> None:
            e = orjson.loads(extra_col[i]) if extra_col[i] else {}
            e[name] = v
            extra_col[i] = orjson.dumps(e, default=_json_default,
                                        option=orjson.OPT_SERIALIZE_NUMPY).decode()
            missing_col[i] = (missing_col[i] or []) + [name]

        for fld in list(self.schema)[:-2]:
            vals = columns[fld.name]
            if fld.name not in self.json_cols:
                for i in _misfits(vals, fld.type):  # Arrow would convert these silently
                    to_side(i, fld.name, vals[i])
                    vals[i] = None
            try:
                arrays.append(pa.array(vals, type=fld.type))
            except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError, TypeError):
                # values of this batch do not fit the column: move them to the side column
                for i, v in enumerate(vals):
                    if v is not None:
                        to_side(i, fld.name, v)
                arrays.append(pa.nulls(len(vals), type=fld.type))
        arrays.append(pa.array(missing_col, type=pa.list_(pa.string())))
        arrays.append(pa.array(extra_col, type=pa.string()))
        self.writer.write_batch(pa.record_batch(arrays, schema=self.schema))
        self.buf = []

    def close(self) -> None:
        import pyarrow as pa

        self.flush()
        if self.writer is None:  # empty stream: still a valid Arrow stream with an empty schema
            self.schema = pa.schema([], metadata={"tcli.schema": SCHEMA})
            self.writer = pa.ipc.new_stream(self.f, self.schema)
        self.writer.close()
        self.f.flush()


def output_format(path: str, fmt: str | None) -> str:
    if fmt not in (None, "auto", *FORMATS):
        raise UsageError(f"unknown output format {fmt!r}; valid: jsonl, arrow")
    if fmt in (None, "auto"):
        return "arrow" if path.endswith((".arrow", ".arrows", ".ipc")) else "jsonl"
    return fmt


class RecordWriter:
    """Writes records to stdout or to a file that appears only when the command succeeds.

    Use as a context manager: on an exception the temporary file is removed and the target is
    untouched; on success it is renamed into place (atomic on one file system).
    """

    def __init__(self, path: str = "-", fmt: str | None = None):
        self.path = path
        self.fmt = output_format(path, fmt)
        self._tmp: str | None = None
        if path == "-":
            self._f = sys.stdout.buffer
        else:
            d = os.path.dirname(os.path.abspath(path))
            if not os.path.isdir(d):
                raise UsageError(f"output directory does not exist: {d}")
            fd, self._tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".tmp-", dir=d)
            self._f = io.BufferedWriter(io.FileIO(fd, "wb"), buffer_size=1 << 20)
        self._sink = _ArrowSink(self._f) if self.fmt == "arrow" else _JsonlSink(self._f)
        self.count = 0

    def write(self, rec: dict) -> None:
        try:
            self._sink.write(rec)
        except OSError as e:
            raise self._write_failed(e) from e
        self.count += 1

    def _write_failed(self, e: OSError) -> BaseException:
        """A full disk (or any write error) on an output file: one clear line naming the file.
        stdout errors stay as they are (a closed pipe is how `| head` ends a command)."""
        if self._tmp is None:
            return e
        return TcliError(f"cannot write {self.path}: {e.strerror or e}; nothing was written "
                         "(an existing file of that name is unchanged)")

    def write_all(self, recs: Iterable[dict]) -> None:
        for r in recs:
            self.write(r)

    def __enter__(self) -> "RecordWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            try:
                self.commit()
            except BaseException:  # e.g. the disk filled up on the last flush: no temp file left
                self.abort()
                raise
        else:
            self.abort()

    def commit(self) -> None:
        try:
            self._sink.close()
            if self._tmp is not None:
                self._f.flush()
                os.fsync(self._f.fileno())
                self._f.close()
                os.replace(self._tmp, self.path)
                self._tmp = None
        except OSError as e:
            raise self._write_failed(e) from e

    def abort(self) -> None:
        if self._tmp is not None:
            try:
                self._f.close()
            except Exception:
                pass
            try:
                os.unlink(self._tmp)
            except FileNotFoundError:
                pass
            self._tmp = None


def write_atomic_bytes(path: str, data: bytes) -> None:
    """Write a small file atomically (temp file in the same directory, fsync, rename)."""
    d = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".tmp-", dir=d)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
