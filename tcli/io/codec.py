"""Exact JSON for records: orjson on the fast path, Python's json where orjson would lose data.

orjson reads an integer beyond 64 bits as a float (10**30 comes back as 1e30), keeps the last of
repeated keys (``{"reward": 1, "reward": 0}`` silently means 0) and refuses to write integers
beyond 64 bits. Two tests on the raw bytes, cheap next to parsing, send the rare texts where that
could happen through the standard library, which is exact and sees every key.
"""

from __future__ import annotations

import json
import math
import re

import orjson

# Digits -> "0", "." -> ".", anything else -> " ": an integer of 19 or more digits (the shortest
# orjson can lose is -9223372036854775809) is a run of "0" that does not follow a "." (a fraction).
_DIGIT_CLASS = bytes(0x30 if 0x30 <= b <= 0x39 else b if b == 0x2E else 0x20 for b in range(256))
_RUN = b"0" * 19
_NUMPY_FROM = 8192  # bytes
_KEY_END = re.compile(rb'"[ \t\r\n]*:')  # every key ends so (strings can add more matches)
_LOW, _HIGH = -(2**63), 2**64 - 1  # what orjson reads and writes as an integer
_OPTS = orjson.OPT_SERIALIZE_NUMPY
_LINE = _OPTS | orjson.OPT_APPEND_NEWLINE
MAX_DEPTH = 254  # containers nested in a record (itself one) that orjson still writes
NONFINITE = ("NaN/Infinity (or a number too large for a float) is not valid JSON; write a "
             "finite number")


class BadJson(ValueError):
    """Why a JSON text was refused: one line, and the top-level field when it is known.
    ``syntax`` marks text that is not JSON at all; ``cut`` text that ended before its value did
    (a truncated line, unlike one with a stray character after a complete value)."""

    def __init__(self, message: str, field: str | None = None, syntax: bool = False,
                 cut: bool = False):
        super().__init__(message)
        self.message, self.field, self.syntax, self.cut = message, field, syntax, cut


class _Repeated(Exception):
    def __init__(self, key: str):
        self.key = key


# ----------------------------------------------------------------------------- reading

def loads(raw: bytes, room: int = MAX_DEPTH):
    """Parse one JSON text exactly. Raises :class:`BadJson` for anything that is not valid JSON,
    holds NaN/Infinity, repeats a key in an object, or nests containers more than ``room`` deep
    (it could be read but not written back: the error belongs to the input, not the output)."""
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError as e:
        obj = _loads_refused(raw, e)
    else:
        if _may_lose(raw, obj):
            obj = _loads_exact(raw.decode("utf-8"))
    if raw.count(b"[") + raw.count(b"{") > room and _deeper(obj, room):  # (brackets bound depth)
        field = next((k for k, v in obj.items() if _deeper(v, room - 1)), None) \
            if type(obj) is dict else None
        raise BadJson(f"JSON nested more than {MAX_DEPTH} levels deep (tcli could not write it "
                      "back)", field=field)
    return obj


def _deeper(v, room: int) -> bool:
    """True when ``v`` nests objects and arrays more than ``room`` deep (a scalar: 0 deep).
    Iterative: the nesting may exceed Python's recursion limit."""
    stack = [(v, 1)] if type(v) is dict or type(v) is list else []
    while stack:
        x, depth = stack.pop()
        if depth > room:
            return True
        kids = x.values() if type(x) is dict else x
        if type(x) is list and {dict, list}.isdisjoint(set(map(type, x))):
            continue  # a flat list (token ids): no Python loop over its elements
        stack.extend((k, depth + 1) for k in kids if type(k) is dict or type(k) is list)
    return False


def _may_lose(raw: bytes, obj) -> bool:
    """True when orjson's ``obj`` may differ from what ``raw`` says: a key written more often than
    kept, or an integer too long for 64 bits. Long texts are scanned with numpy, about half the
    cost of ``bytes.translate`` on number-heavy rollouts (short ones: numpy's per-call cost wins)."""
    if len(raw) >= _NUMPY_FROM:
        import numpy as np

        a = np.frombuffer(raw, np.uint8)
        return _keys_may_repeat(raw, obj, int(np.count_nonzero(a == 0x3A))) or _long_int_np(a)
    return _keys_may_repeat(raw, obj, raw.count(b":")) or _long_int(raw)


def _long_int(raw: bytes) -> bool:
    """True when ``raw`` has a run of 19+ digits that is not a fraction (strings count too: a rare
    false alarm only costs a slower parse)."""
    classes = raw.translate(_DIGIT_CLASS)
    i = classes.find(_RUN)  # the leftmost match starts its run
    while i >= 0:
        if i == 0 or classes[i - 1] != 0x2E:
            return True
        end = classes.find(b" ", i)  # a fraction ends at "e" or a delimiter
        i = classes.find(_RUN, end) if end >= 0 else -1
    return False


def _long_int_np(a) -> bool:
    """``_long_int`` on the bytes as a numpy uint8 array."""
    import numpy as np

    digit = (a - 0x30) < 10  # unsigned: every non-digit wraps to >= 10
    run = digit
    for shift in (1, 2, 4, 8, 3):  # run[i]: digits at i .. i+1, +3, +7, +15, +18
        run = run[:-shift] & run[shift:]
    starts = np.flatnonzero(run)
    if not starts.size:
        return False
    if starts[0] == 0:
        return True
    starts = starts[~digit[starts - 1]]  # where each run begins
    return bool((a[starts - 1] != 0x2E).any())


def _keys_may_repeat(raw: bytes, obj, colons: int) -> bool:
    """True unless ``raw`` provably holds no more keys than ``obj`` kept.

    Every key is followed by a colon, so ``colons`` bounds the keys written; when it equals the
    keys parsed, nothing was merged. Colons inside strings (or objects inside arrays) make the
    bound loose; then a tighter count decides, and only a real mismatch costs a full re-parse."""
    if colons == 0 or (type(obj) is dict and colons == len(obj)):
        return False  # (nested objects would need colons of their own)
    try:
        kept = _count_keys(obj, False)
        if colons == kept:
            return False
        written = len(_KEY_END.findall(raw))
        return written != kept and written != _count_keys(obj, True)
    except RecursionError:
        return True


def _count_keys(v, into_lists: bool) -> int:
    """Keys in ``v`` and the objects nested in it (through arrays too when ``into_lists``)."""
    t = type(v)
    if t is dict:
        return len(v) + sum(_count_keys(x, into_lists) for x in v.values()
                            if type(x) is dict or (into_lists and type(x) is list))
    if t is list and into_lists and v and not {dict, list}.isdisjoint(set(map(type, v))):
        return sum(_count_keys(x, True) for x in v)
    return 0


def _unique_pairs(pairs: list) -> dict:
    d = dict(pairs)
    if len(d) != len(pairs):
        seen: set = set()
        for k, _ in pairs:
            if k in seen:
                raise _Repeated(k)
            seen.add(k)
    return d


def _loads_exact(text: str):
    """The standard library's parse: exact integers, and a repeated key is an error."""
    try:
        return json.loads(text, object_pairs_hook=_unique_pairs)
    except _Repeated as r:
        raise BadJson(*_repeated_message(text, r.key)) from None
    except RecursionError:
        raise BadJson("JSON nested too deeply") from None
    except ValueError as e:  # e.g. an integer of more than 4300 digits
        raise BadJson(f"invalid JSON ({' '.join(str(e).split())})", syntax=True) from None


class _Pairs(list):
    """An object as its list of pairs, to find where a repeated key sits."""


def _repeated_message(text: str, key: str) -> tuple[str, str | None]:
    """The message, and the top-level field that is repeated or holds the repeating object."""
    def repeats(v) -> bool:
        if isinstance(v, _Pairs):
            keys = [k for k, _ in v]
            return len(set(keys)) != len(keys) or any(repeats(x) for _, x in v)
        return isinstance(v, list) and any(repeats(x) for x in v)

    field = None
    try:
        obj = json.loads(text, object_pairs_hook=_Pairs)
        if isinstance(obj, _Pairs):
            keys = [k for k, _ in obj]
            top = next((k for i, k in enumerate(keys) if k in keys[:i]), None)
            if top is not None:
                key = field = top
            else:
                field = next((k for k, v in obj if repeats(v)), None)
    except (ValueError, RecursionError):
        pass  # the message without a field
    return (f"key {key!r} appears more than once in one JSON object (only one value would be "
            "kept)"), field


def _loads_refused(raw: bytes, err: Exception):
    """orjson refused ``raw``: accept it when only an integer too large for a double was the
    reason (exact through the standard library), otherwise say why in one line."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as u:  # orjson's message for this is about surrogates
        raise BadJson(f"invalid UTF-8 (byte 0x{raw[u.start]:02x} at column {u.start + 1})") \
            from None
    try:
        lenient = json.loads(text)  # accepts NaN/Infinity, 1e999, big integers, lone surrogates
        bad = _nonfinite(lenient)
    except (ValueError, RecursionError):
        cut = getattr(err, "pos", -1) >= len(raw.rstrip())  # orjson stopped at the end of data
        raise BadJson(f"invalid JSON ({err})", syntax=True, cut=cut) from None
    if bad:
        field = next((k for k, v in lenient.items() if _nonfinite(v)), None) \
            if isinstance(lenient, dict) else None
        raise BadJson(NONFINITE, field=field)
    if not _long_int(raw):
        raise BadJson(f"invalid JSON ({err})", syntax=True)
    obj = _loads_exact(text)
    try:
        dumps_value(obj)  # a lone surrogate the standard library let through
    except (TypeError, ValueError):
        raise BadJson(f"invalid JSON ({err})", syntax=True) from None
    return obj


def _nonfinite(v) -> bool:
    if isinstance(v, float):
        return not math.isfinite(v)
    if isinstance(v, list):
        return any(_nonfinite(x) for x in v)
    if isinstance(v, dict):
        return any(_nonfinite(x) for x in v.values())
    return False


# ----------------------------------------------------------------------------- writing

def _json_default(obj):
    import numpy as np

    if isinstance(obj, np.generic):
        return obj.item()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def dumps(rec: dict) -> bytes:
    """One JSONL line (with its newline)."""
    try:
        return orjson.dumps(rec, default=_json_default, option=_LINE)
    except orjson.JSONEncodeError:
        return orjson.dumps(_big_ints_verbatim(rec), default=_json_default, option=_LINE)


def dumps_value(v) -> bytes:
    """A JSON value without a newline (Arrow side columns)."""
    try:
        return orjson.dumps(v, default=_json_default, option=_OPTS)
    except orjson.JSONEncodeError:
        return orjson.dumps(_big_ints_verbatim(v), default=_json_default, option=_OPTS)


def _big_ints_verbatim(v):
    """``v`` with integers beyond 64 bits as pre-written JSON digits (orjson refuses them).
    Only runs after orjson refused a value, so the common path never walks a record."""
    t = type(v)
    if t is int:
        return v if _LOW <= v <= _HIGH else orjson.Fragment(str(v).encode())
    if t is dict:
        return {k: _big_ints_verbatim(x) for k, x in v.items()}
    if t is list or t is tuple:
        return [_big_ints_verbatim(x) for x in v]
    return v
