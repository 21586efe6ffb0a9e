"""Plumbing shared by every command: input/output options and the drivers that run a stage over
a record stream. Stage settings are not declared here: they come from ``tcli.config``."""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from typing import Annotated, Callable, Iterable, Iterator, Optional

import typer

from tcli.errors import DataError
from tcli.io import RecordReader, RecordWriter, iter_groups

InputArg = Annotated[str, typer.Argument(help="Input records (JSONL, Arrow, Parquet, or a saved "
                                         "Hugging Face dataset directory); '-' = stdin.",
                                         show_default=True)]
OutputOpt = Annotated[str, typer.Option("-o", "--output", help="Output path; '-' = stdout. A file "
                                        "is written atomically (temp file, then rename; a symlink's "
                                        "target is replaced); devices, FIFOs and /dev/stdout are "
                                        "written directly.")]
FormatOpt = Annotated[Optional[str], typer.Option("--format", help="Output format: jsonl | arrow "
                                                  "(default: from the -o suffix, else jsonl).")]
InputFormatOpt = Annotated[Optional[str], typer.Option("--input-format", help="Force the input "
                                                       "format: jsonl | arrow | parquet (default: "
                                                       "detect; a directory is read as a Hugging "
                                                       "Face dataset saved with save_to_disk).")]
SeedOpt = Annotated[int, typer.Option("--seed", help="Random seed (same inputs + seed = same output).")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress or summary on stderr.")]
ModelOpt = Annotated[str, typer.Option("--model", "-m", help="Model or checkpoint directory, or a "
                                       "Hugging Face Hub name already in the local cache "
                                       "(TCLI_ALLOW_DOWNLOADS=1 lets tcli download it).")]


def stderr_console(quiet: bool = False):
    """A rich console on stderr, or None when quiet."""
    if quiet:
        return None
    from rich.console import Console

    return Console(stderr=True)


def progress_enabled(quiet: bool) -> bool:
    return not quiet and sys.stderr.isatty()


@contextmanager
def group_progress(label: str, quiet: bool, total: int | None = None):
    """A progress bar on a terminal's stderr, else plain lines at a bounded rate (logs); yields
    the per-group callback (None when quiet)."""
    if quiet:
        yield None
        return
    from tcli.stages.sample import sampled_tokens

    if not progress_enabled(quiet):
        from tcli.progress import LineProgress

        lines = LineProgress(label, total)
        yield lambda group: lines.advance(1, tokens=sum(map(sampled_tokens, group)))
        lines.finish()
        return
    from rich.progress import (BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn)

    bar = Progress(SpinnerColumn(), TextColumn(label), BarColumn(),
                   TextColumn("{task.completed} prompts"), TextColumn("{task.fields[tps]:.0f} tok/s"),
                   TimeElapsedColumn(), console=stderr_console(), transient=False)
    task = bar.add_task(label, total=total, tps=0.0)
    t0, tokens = time.perf_counter(), [0]

    def on_group(group: list[dict]) -> None:
        tokens[0] += sum(map(sampled_tokens, group))
        bar.update(task, advance=1, tps=tokens[0] / max(time.perf_counter() - t0, 1e-9))

    with bar:
        yield on_group


def input_total(path: str, limit: int | None = None) -> int | None:
    """How many records a JSONL file holds (at most ``limit``), for progress lines; None for
    stdin and other formats. One cheap pass over the bytes, no parsing."""
    import os

    from tcli.io import detect_format

    if path == "-" or not os.path.isfile(path):
        return limit
    with open(path, "rb") as f:
        if detect_format(f.read(8)) != "jsonl":
            return limit
        f.seek(0)
        n = sum(1 for line in f if not line.isspace())
    return min(n, limit) if limit else n


def checkpoint_sampling(opts, model: str, quiet: bool):
    """``opts`` with the checkpoint's recorded prompt template, chat-template choice and response
    cap wherever the user gave none; one line on stderr says which were taken."""
    from tcli.models.load import check_model_dir
    from tcli.models.recorded import notice, with_recorded

    check_model_dir(model)  # a bad --model fails here, before torch is imported
    opts, changed = with_recorded(opts, model)
    line = notice(changed, opts)
    if line and not quiet:
        sys.stderr.write(f"tcli: {line}\n")
        sys.stderr.flush()
    return opts


def refuse_same_file(flag: str, path: str | None, what: str, other: str | None) -> None:
    """Exit 2 before anything is written when ``path`` (written by ``flag``) is the file
    ``other``: the input the command reads, or another of its outputs, would be lost. Real paths
    are compared (links, ``./`` spellings); a device or FIFO is never replaced, so never refused."""
    import os
    import stat

    if not path or not other or "-" in (path, other):
        return
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            return
        same = os.path.samefile(path, other)
    except OSError:  # a new file: the same as ``other`` only by name (``-o F --summary F``)
        same = os.path.realpath(path) == os.path.realpath(other)
    if same:
        from tcli.errors import UsageError

        raise UsageError(f"{flag} {path} is {what}; refusing to write into it (choose another "
                         "file)")


def check_not_input(start: str, output: str, flag: str, override: str = "") -> None:
    """Writing the new checkpoint over the one it starts from (``flag``) would lose the start for
    good, unless the ``override`` flag says that is meant: ``refuse_same_file`` for directories."""
    import os

    from tcli.errors import UsageError

    if os.path.realpath(start) == os.path.realpath(output):
        raise UsageError(f"-o/--output {output} is the input checkpoint {flag} {start}; write "
                         "the new checkpoint to another directory"
                         + (f" (or give {override})" if override else ""))


def located(e: DataError, name: str, lines: list[int]) -> DataError:
    """A stage's error (which knows the record's index in its group) at the record's line."""
    idx = getattr(e, "index", None)
    return e.located(name, lines[idx] if idx is not None and idx < len(lines) else
                     (lines[0] if lines else None))


def run_groups(input: str, output: str, fmt: str | None, input_format: str | None,
               fn: Callable[[list[dict]], Iterable[dict]],
               finish: Callable[[], Iterable[dict]] | None = None) -> int:
    """Read groups of consecutive records by prompt_id, apply ``fn`` and write what it returns,
    then what ``finish()`` returns (for stages that need the whole input, e.g. whitening)."""
    reader = RecordReader(input, input_format)
    n = 0
    with RecordWriter(output, fmt) as writer:
        for lines, recs in iter_groups(reader, reader.name):
            try:
                for rec in fn(recs):
                    writer.write(rec)
                    n += 1
            except DataError as e:
                raise located(e, reader.name, lines) from None
        for rec in finish() if finish else ():
            writer.write(rec)
            n += 1
    return said_if_empty(n, reader.name)


def run_records(input: str, output: str, fmt: str | None, input_format: str | None,
                fn: Callable[[Iterator[tuple[int, dict]], str], Iterable[dict]]) -> int:
    """Stream records one by one through ``fn(records, source_name)``."""
    reader = RecordReader(input, input_format)
    n = 0
    with RecordWriter(output, fmt) as writer:
        for rec in fn(iter(reader), reader.name):
            writer.write(rec)
            n += 1
    return said_if_empty(n, reader.name)


def said_if_empty(n: int, source: str) -> int:
    """An empty stream passes through (exit 0, docs/design.md §2.3), but not unremarked: in a
    pipeline it usually means a stage upstream failed."""
    if n == 0:
        sys.stderr.write(f"tcli: warning: no records in {source}; the output is empty\n")
        sys.stderr.flush()
    return n
