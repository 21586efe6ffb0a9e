"""Errors that map to exit codes: 65 bad data, 2 usage, 1 runtime failure."""

from __future__ import annotations

EXIT_OK = 0
EXIT_RUNTIME = 1
EXIT_USAGE = 2
EXIT_DATA = 65


class TcliError(Exception):
    """Base class: carries the process exit code and a one-line message."""

    exit_code = EXIT_RUNTIME

    def one_line(self) -> str:
        return " ".join(str(self).split("\n"))


class UsageError(TcliError):
    exit_code = EXIT_USAGE


class DataError(TcliError):
    """Bad input data. Names the file, the line (1-based record number) and the field."""

    exit_code = EXIT_DATA

    def __init__(self, message: str, *, file: str | None = None, line: int | None = None,
                 field: str | None = None):
        super().__init__(message)
        self.message = message
        self.file = file
        self.line = line
        self.field = field

    def located(self, file: str | None = None, line: int | None = None) -> "DataError":
        """Fill in the location if the raiser did not know it (stages know records, not files)."""
        if self.file is None:
            self.file = file
        if self.line is None:
            self.line = line
        return self

    def __str__(self) -> str:
        where = self.file or "<input>"
        if self.line is not None:
            where += f":{self.line}"
        field = f" field '{self.field}':" if self.field else ""
        return f"{where}:{field} {self.message}"
