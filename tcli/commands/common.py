"""Options shared by every command and the driver that runs a stage over a record stream."""

from __future__ import annotations

import sys
from typing import Annotated, Callable, Iterable, Iterator, Optional

import typer

from tcli.errors import DataError
from tcli.io import RecordReader, RecordWriter, iter_groups

InputArg = Annotated[str, typer.Argument(help="Input records (JSONL or Arrow); '-' = stdin.",
                                         show_default=True)]
OutputOpt = Annotated[str, typer.Option("-o", "--output", help="Output path; '-' = stdout. "
                                        "Written atomically (temp file, then rename).")]
FormatOpt = Annotated[Optional[str], typer.Option("--format", help="Output format: jsonl | arrow "
                                                  "(default: from the -o suffix, else jsonl).")]
InputFormatOpt = Annotated[Optional[str], typer.Option("--input-format", help="Force the input "
                                                       "format: jsonl | arrow (default: detect).")]
SeedOpt = Annotated[int, typer.Option("--seed", help="Random seed (same inputs + seed = same output).")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress or summary on stderr.")]


def stderr_console(quiet: bool = False):
    """A rich console on stderr, or None when quiet."""
    if quiet:
        return None
    from rich.console import Console

    return Console(stderr=True)


def progress_enabled(quiet: bool) -> bool:
    return not quiet and sys.stderr.isatty()


def run_groups(input: str, output: str, fmt: str | None, input_format: str | None,
               fn: Callable[[list[dict]], Iterable[dict]]) -> int:
    """Read groups of consecutive records by prompt_id, apply ``fn`` and write what it returns.

    A DataError raised by ``fn`` carrying ``index`` (the record's position in its group) is
    located at that record's line.
    """
    reader = RecordReader(input, input_format)
    n = 0
    with RecordWriter(output, fmt) as writer:
        for lines, recs in iter_groups(reader, reader.name):
            try:
                out = fn(recs)
                for rec in out:
                    writer.write(rec)
                    n += 1
            except DataError as e:
                idx = getattr(e, "index", None)
                raise e.located(reader.name, lines[idx] if idx is not None else lines[0]) from None
    return n


def run_records(input: str, output: str, fmt: str | None, input_format: str | None,
                fn: Callable[[Iterator[tuple[int, dict]], str], Iterable[dict]]) -> int:
    """Stream records one by one through ``fn(records, source_name)``."""
    reader = RecordReader(input, input_format)
    n = 0
    with RecordWriter(output, fmt) as writer:
        for rec in fn(iter(reader), reader.name):
            writer.write(rec)
            n += 1
    return n
