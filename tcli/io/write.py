"""Writing record streams: choose the format, encode records, and hand the bytes to an output
that appears only when the command succeeds (see ``target``)."""

from __future__ import annotations

from typing import IO, Iterable

from tcli.errors import TcliError, UsageError
from tcli.io.codec import dumps
from tcli.io.target import Output

FORMATS = ("jsonl", "arrow")
# suffixes of compressed files, and how a stream is compressed into one
_GZ, _ZST = ("gzip", "gzip > {}"), ("zstd", "zstd -o {}")
COMPRESSED_SUFFIXES = {".gz": _GZ, ".gzip": _GZ, ".tgz": _GZ, ".zst": _ZST, ".zstd": _ZST,
                       ".bz2": ("bzip2", "bzip2 > {}"), ".xz": ("xz", "xz > {}"),
                       ".zip": ("zip", "zip {} -"), ".lz4": ("lz4", "lz4 > {}")}


class JsonlSink:
    def __init__(self, f: IO[bytes]):
        self.f = f

    def write(self, rec: dict) -> None:
        self.f.write(dumps(rec))

    def close(self) -> None:
        self.f.flush()


def output_format(path: str, fmt: str | None) -> str:
    """The format to write ``path`` in; a usage error for a name that would mislead a reader."""
    suffix = next((s for s in COMPRESSED_SUFFIXES if path.lower().endswith(s)), None)
    if suffix is not None:
        from tcli.io.read import command_line

        kind, compress = COMPRESSED_SUFFIXES[suffix]
        raise UsageError(f"{path}: tcli writes uncompressed records, not {kind}; compress its "
                         f"stdout instead (e.g. {command_line()} ... | {compress.format(path)}), or "
                         f"drop {path[-len(suffix):]} from the name")
    if fmt not in (None, "auto", *FORMATS):
        raise UsageError(f"unknown output format {fmt!r}; valid: jsonl, arrow")
    if fmt in (None, "auto"):
        # formats tcli reads (Parquet) or never reads: a JSONL file under such a name misleads
        # (suffixes in any case, as the refusals above: OUT.ARROW is Arrow, not JSONL)
        name = path.lower()
        if name.endswith((".parquet", ".pq", ".csv", ".json")):
            raise UsageError(f"{path}: tcli writes JSONL or Arrow; name the output .jsonl or "
                             ".arrow (or give --format jsonl|arrow)")
        return "arrow" if name.endswith((".arrow", ".arrows", ".ipc")) else "jsonl"
    return fmt


class RecordWriter:
    """Writes records to stdout or to ``path`` (see ``target`` for what each kind of path gets).

    Use as a context manager: on an exception the temporary file is removed and the target is
    untouched; on success it is renamed into place (atomic on one file system).
    """

    def __init__(self, path: str = "-", fmt: str | None = None):
        self.path = path
        self.fmt = output_format(path, fmt)
        self._out = Output(path)
        if self.fmt == "arrow":
            from tcli.io.arrow import ArrowSink

            self._sink = ArrowSink(self._out.file)
        else:
            self._sink = JsonlSink(self._out.file)
        self.count = 0

    def write(self, rec: dict) -> None:
        try:
            self._sink.write(rec)
        except OSError as e:
            self._write_failed(e)
        self.count += 1

    def _write_failed(self, e: OSError) -> None:
        """A full disk (or any write error) on an output file: one clear line naming the file.
        A closed pipe stays as it is: that is how `| head` ends a command."""
        if self.path == "-" or isinstance(e, BrokenPipeError):
            raise e
        if self._out.atomic:
            raise TcliError(f"cannot write {self.path}: {e.strerror or e}; nothing was written "
                            "(an existing file of that name is unchanged)") from e
        raise TcliError(f"cannot write {self.path}: {e.strerror or e}") from e

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
            self._out.commit()
        except OSError as e:
            self._write_failed(e)

    def abort(self) -> None:
        self._out.abort()
