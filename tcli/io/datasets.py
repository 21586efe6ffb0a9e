"""Hugging Face ``datasets`` saved with ``save_to_disk``, read with pyarrow alone.

Such a directory holds ``state.json`` (which lists its ``data-*.arrow`` files, Arrow IPC streams)
and ``dataset_info.json``; a ``DatasetDict`` holds one such directory per split and a
``dataset_dict.json``. Records are numbered across the files, as one stream.
"""

from __future__ import annotations

import json
import os
from typing import Iterator

from tcli.errors import DataError, UsageError


def _splits(path: str) -> list[str]:
    try:
        with open(os.path.join(path, "dataset_dict.json"), "rb") as f:
            return [str(s) for s in json.load(f).get("splits", [])]
    except (OSError, ValueError, AttributeError):
        return []


def is_saved_dataset(path: str) -> bool:
    """A directory written by ``save_to_disk`` (one split, or a DatasetDict)."""
    return any(os.path.isfile(os.path.join(path, f)) for f in ("state.json", "dataset_dict.json"))


def data_files(path: str) -> list[str]:
    """The Arrow files of a saved dataset, in order; a usage error for other directories."""
    state = os.path.join(path, "state.json")
    if not os.path.isfile(state):
        splits = _splits(path)
        if splits:
            raise UsageError(f"{path} is a DatasetDict; give one split, e.g. "
                             f"{os.path.join(path, splits[0])} (splits: {', '.join(splits)})")
        raise UsageError(f"input is a directory but not a saved Hugging Face dataset "
                         f"(no state.json): {path}")
    try:
        with open(state, "rb") as f:
            files = [d["filename"] for d in json.load(f)["_data_files"]]
    except (ValueError, KeyError, TypeError) as e:
        raise DataError(f"not a dataset state file ({type(e).__name__}: {e})", file=state) from None
    for name in files:
        if not isinstance(name, str) or name in ("", ".", "..") or "\0" in name:
            raise DataError(f"data file name {name!r} is not a file name", file=state)
        if os.path.basename(name) != name:
            raise DataError(f"data file {name!r} is not inside the dataset directory", file=state)
    return [os.path.join(path, name) for name in files]


def iter_saved_dataset(path: str) -> Iterator[tuple[int, dict]]:
    from tcli.io.arrow import ARROW_STREAM_MAGIC, iter_arrow

    n = 0
    for file in data_files(path):
        try:
            f = open(file, "rb")
        except FileNotFoundError:
            raise DataError("data file listed in state.json is missing", file=file) from None
        except IsADirectoryError:
            raise DataError("data file listed in state.json is a directory", file=file) from None
        with f:
            if f.peek(4)[:4] != ARROW_STREAM_MAGIC:  # (not record n + 1 of the directory)
                raise DataError("not an Arrow IPC stream (save_to_disk writes streams)", file=file)
            try:
                for n, rec in iter_arrow(f, path, file_format=False, first=n):
                    yield n, rec
            except DataError as e:  # records are numbered across the files: say which one
                e.message += f" (in {os.path.basename(file)})"
                raise
