"""Reading record streams: open the input, detect its format, decode JSONL lines, check the
schema tag. Readers yield ``(line, record)`` where ``line`` is the 1-based line (JSONL) or record
number (Arrow), so every later error can name where the bad data came from.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from typing import IO, Iterator

from tcli.errors import DataError, UsageError
from tcli.io.arrow import ARROW_FILE_MAGIC, ARROW_STREAM_MAGIC
from tcli.io.codec import BadJson, loads
from tcli.io.schema import check_schema

PARQUET_MAGIC = b"PAR1"
# compressed files start so; each gets the command that writes it back out uncompressed
COMPRESSED = ((b"\x1f\x8b", "gzip", "zcat"), (b"\x28\xb5\x2f\xfd", "zstd", "zstdcat"),
              (b"BZh", "bzip2", "bzcat"), (b"\xfd7zXZ\x00", "xz", "xzcat"),
              (b"PK\x03\x04", "zip", "unzip -p"), (b"PK\x05\x06", "zip", "unzip -p"),
              (b"\x04\x22\x4d\x18", "lz4", "lz4cat"))


def display_name(path: str) -> str:
    return "<stdin>" if path == "-" else path


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
    """The first bytes without consuming them (a pipe cannot seek back)."""
    if hasattr(f, "peek"):
        return f.peek(n)[:n]  # may be fewer than n bytes; enough to tell the formats apart
    raise UsageError("input is not peekable")


def detect_format(head: bytes) -> str:
    if head.startswith(ARROW_STREAM_MAGIC):
        return "arrow"
    if head.startswith(ARROW_FILE_MAGIC):
        return "arrow-file"
    if head.startswith(PARQUET_MAGIC):
        return "parquet"
    return "jsonl"


def refuse_compressed(head: bytes, name: str) -> None:
    """A compressed input is bad data, said as such: decoding it would fail on its first byte
    with a message about UTF-8 or Arrow that hides what is wrong."""
    for magic, fmt, tool in COMPRESSED:
        if head.startswith(magic):
            cmd = command_line()
            how = (f"... | {tool.split()[0]} | {cmd}" if name == "<stdin>"
                   else f"{tool} {name} | {cmd}")
            raise DataError(f"{fmt}-compressed input; tcli reads uncompressed records: "
                            f"decompress it first (e.g. {how})", file=name)


def command_line() -> str:
    """``tcli <command>`` of the running command line, for the hint above."""
    try:  # typer >= 0.20 vendors click
        from typer._click.globals import get_current_context
    except ImportError:  # pragma: no cover
        from click import get_current_context

    ctx = get_current_context(silent=True)
    return f"tcli {ctx.info_name}" if ctx is not None and ctx.parent is not None else "tcli ..."


def _looks_tabular(name: str, raw: bytes) -> bool:
    """A first line that is no JSON at all, from a .csv/.tsv file or with comma/tab columns."""
    return (name.lower().endswith((".csv", ".tsv"))
            or (not raw.lstrip().startswith((b"{", b"[", b'"')) and (b"," in raw or b"\t" in raw)))


UTF8_BOM = b"\xef\xbb\xbf"


def iter_jsonl(f: IO[bytes], name: str) -> Iterator[tuple[int, dict]]:
    first = True
    for lineno, raw in enumerate(f, 1):
        if lineno == 1 and raw.startswith(UTF8_BOM):  # Windows editors and Excel write one
            raw = raw[len(UTF8_BOM):]
        if not raw or raw.isspace():
            continue  # blank lines are allowed and ignored (documented in the README)
        try:
            rec = loads(raw)
        except BadJson as e:
            what = e.message
            if e.cut and not raw.endswith(b"\n"):
                what = "truncated JSON (no newline at end of input)"
            if e.syntax and first and _looks_tabular(name, raw):
                what = ("not JSON Lines: this looks like CSV/TSV, which tcli does not read; give "
                        "JSONL (one JSON object per line), Arrow, Parquet or a saved Hugging Face "
                        "dataset directory")
            raise DataError(what, file=name, line=lineno, field=e.field) from None
        first = False
        if not isinstance(rec, dict):
            raise DataError(f"record is a JSON {type(rec).__name__}, not an object", file=name,
                            line=lineno)
        check_schema(rec, name, lineno)
        yield lineno, rec


@dataclass
class RecordReader:
    """Iterates ``(line, record)`` from a path or stdin, in JSONL or Arrow (auto-detected)."""

    path: str = "-"
    input_format: str | None = None  # jsonl | arrow | None (detect)
    name: str = field(init=False)

    def __post_init__(self) -> None:
        self.name = display_name(self.path)
        if self.input_format not in (None, "auto", "jsonl", "arrow", "parquet"):
            raise UsageError(f"unknown input format {self.input_format!r}; valid: jsonl, arrow, "
                             "parquet")

    def __iter__(self) -> Iterator[tuple[int, dict]]:
        if self.path != "-" and os.path.isdir(self.path):
            from tcli.io.datasets import iter_saved_dataset

            yield from iter_saved_dataset(self.path)
            return
        f = _open_binary(self.path)
        own = self.path != "-"
        try:
            fmt = self.input_format if self.input_format not in (None, "auto") else None
            head = _peek(f)
            refuse_compressed(head, self.name)
            detected = detect_format(head)
            if fmt is None:
                fmt = detected
            elif fmt == "arrow" and detected == "arrow-file":
                fmt = "arrow-file"
            if fmt == "jsonl":
                yield from iter_jsonl(f, self.name)
            else:
                from tcli.io.arrow import iter_arrow

                kind = "parquet" if fmt == "parquet" else fmt == "arrow-file"
                yield from iter_arrow(f, self.name, file_format=kind)
        finally:
            if own:
                f.close()
