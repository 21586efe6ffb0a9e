"""Groups: the consecutive records of one prompt, checked as they stream past.

A group that reappears later in the stream is an error (stages would otherwise see half of it
twice), so every group key seen is remembered, in about 8 bytes per key."""

from __future__ import annotations

from typing import Iterable, Iterator

from tcli.errors import DataError


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


def check_sample_ids(recs: list[dict], lines: list[int], name: str, sample_key: str) -> None:
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


def _group_key(rec: dict, key: str, name: str, line: int):
    try:
        k = rec[key]
    except KeyError:
        raise DataError("missing required field", file=name, line=line, field=key) from None
    if not isinstance(k, (str, int)) or isinstance(k, bool):
        raise DataError(f"must be a string or integer, got {type(k).__name__}", file=name,
                        line=line, field=key)
    return k


def iter_groups(records: Iterable[tuple[int, dict]], name: str, key: str = "prompt_id",
                sample_key: str | None = "sample_id") -> Iterator[tuple[list[int], list[dict]]]:
    """Yield consecutive records sharing ``key`` as (lines, records); a key seen again is an error,
    and so is a repeated ``sample_key`` inside a group. Memory: one group plus ~8 bytes per key."""
    seen = SeenKeys()
    cur_key = object()
    lines: list[int] = []
    recs: list[dict] = []
    for line, rec in records:
        k = _group_key(rec, key, name, line)
        if k != cur_key or type(k) is not type(cur_key):  # 3 and "3" are different groups
            if recs:
                if sample_key:
                    check_sample_ids(recs, lines, name, sample_key)
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
            check_sample_ids(recs, lines, name, sample_key)
        yield lines, recs
