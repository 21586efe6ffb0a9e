"""Settings declared once: a dataclass field carries its default, help text and check.

Every stage has one ``Options`` dataclass built from :func:`setting` fields. The stage command's
flags (``tcli.config.flags``) and the loop's TOML table (``tcli.config.loop``) are generated from
those fields, and an ``Options`` object validates itself when it is built, so a bad value fails
with exit 2 the same way from a flag, a TOML file or library code, before anything touches disk.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Optional, Sequence

from tcli.errors import UsageError

Check = Callable[[Any], Optional[str]]  # returns what is wrong, or None


@dataclass(frozen=True)
class Setting:
    """What a field says about itself besides its default."""

    help: str
    check: Optional[Check] = None
    choices: Optional[Callable[[], Sequence[str]]] = None  # e.g. a registry's names
    short: Optional[str] = None                            # one-letter flag, e.g. "-e"


def setting(default: Any, help: str, *, check: Check | None = None,
            choices: Callable[[], Sequence[str]] | None = None, short: str | None = None) -> Any:
    """A dataclass field with its default, help text, validation and allowed names."""
    return field(default=default, metadata={"tcli": Setting(help, check, choices, short)})


def like(cls: type, name: str, default: Any, help: str | None = None) -> Any:
    """The setting ``cls.name`` with another default, and another help text where what it means
    differs (one place says why a command differs)."""
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    if help is None:
        return field(default=default, metadata=f.metadata)
    return field(default=default, metadata={"tcli": dataclasses.replace(spec_of(f), help=help)})


# ----------------------------------------------------------------------------- checks

def at_least(lo: float) -> Check:
    return lambda v: None if v is None or v >= lo else f"must be >= {lo}, got {v}"


def finite(v) -> str | None:
    return None if v is None or math.isfinite(v) else f"must be a finite number, got {v}"


def both(*checks: Check) -> Check:
    def run(v):
        return next((m for m in (c(v) for c in checks) if m), None)
    return run


def finite_at_least(lo: float) -> Check:
    return both(finite, at_least(lo))


def in_range(lo: float, hi: float, *, lo_open: bool = False, hi_open: bool = False) -> Check:
    def check(v):
        if v is None:  # an optional setting left out
            return None
        ok = math.isfinite(v) and (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)
        left, right = "(" if lo_open else "[", ")" if hi_open else "]"
        return None if ok else f"must be in {left}{lo}, {hi}{right}, got {v}"
    return check


# ----------------------------------------------------------------------------- options

def settings_of(cls: type) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if "tcli" in f.metadata]


def spec_of(f: dataclasses.Field) -> Setting:
    return f.metadata["tcli"]


def _hint(cls: type, name: str) -> tuple[Any, bool]:
    hint = typing.get_type_hints(cls)[name]
    args = typing.get_args(hint)
    optional = type(None) in args
    return (next(a for a in args if a is not type(None)) if optional else hint), optional


def value_type(cls: type, name: str) -> tuple[type, bool]:
    """(bool | int | float | str | tuple, optional?) of a field, from its annotation; a list
    setting is annotated ``tuple[X, ...]`` (see :func:`item_type`)."""
    base, optional = _hint(cls, name)
    return (tuple if typing.get_origin(base) is tuple else base), optional


def item_type(cls: type, name: str) -> type:
    """The item type X of a list setting ``tuple[X, ...]``."""
    return typing.get_args(_hint(cls, name)[0])[0]


_TYPE_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def _items(item: type, value: Any, label: str) -> tuple:
    """A list setting's value: one value or a list (TOML), strings split at commas (flags:
    ``-t a -t b`` or ``-t a,b``; ``--weights 1,0.2``)."""
    out = []
    for v in value if isinstance(value, (list, tuple)) else [value]:
        for x in ([p.strip() for p in v.split(",")] if isinstance(v, str) else [v]):
            if item in (float, int) and isinstance(x, str):
                try:
                    x = item(x)
                except ValueError:
                    x = None
            if item is float and isinstance(x, int) and not isinstance(x, bool):
                x = float(x)
            if not isinstance(x, item) or isinstance(x, bool):
                raise UsageError(f"{label} must be {_TYPE_NAMES[item]} or a list of them "
                                 f"(comma-separated as a flag), got {value!r}")
            out.append(x)
    return tuple(out)


def coerce(cls: type, name: str, value: Any, label: str) -> Any:
    """A TOML or flag value checked against the field's type (ints are fine where floats go)."""
    typ, optional = value_type(cls, name)
    if value is None and optional:
        return None
    if typ is tuple:
        return _items(item_type(cls, name), value, label)
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
        raise UsageError(f"{label} must be {_TYPE_NAMES[typ]}, got {value!r}")
    return value


class Options:
    """Base of the stage option dataclasses: validates every setting when built.

    ``FLAG_PREFIX`` names the flags of a class whose settings are prefixed on the command line
    (the loop's ``[eval]`` table: ``--eval-n``)."""

    TABLE: ClassVar[str] = ""
    FLAG_PREFIX: ClassVar[str] = ""
    RECORDED: ClassVar[tuple[str, ...]] = ()  # settings a checkpoint records (tcli.models.recorded)
    unset: ClassVar[frozenset] = frozenset()  # of RECORDED, those the user left out (see given)

    def __post_init__(self) -> None:
        for f in settings_of(type(self)):
            label = self.label(f.name)
            v = coerce(type(self), f.name, getattr(self, f.name), label)
            object.__setattr__(self, f.name, v)
            spec = spec_of(f)
            for x in (v if isinstance(v, tuple) else (v,)):  # a list setting: every item
                if spec.choices is not None and x is not None and x not in spec.choices():
                    raise UsageError(f"{label}: unknown value {x!r}; valid: "
                                     f"{', '.join(spec.choices())}")
            msg = spec.check(v) if spec.check is not None else None
            if msg:
                raise UsageError(f"{label} {msg}")
        self.check()

    def check(self) -> None:
        """Checks that involve more than one field (override)."""

    @classmethod
    def flag(cls, name: str) -> str:
        return "--" + (cls.FLAG_PREFIX + name).replace("_", "-")

    @classmethod
    def label(cls, name: str) -> str:
        """How errors name a setting: its flag, and its TOML key when it lives in a table."""
        key = f"{cls.TABLE}.{name}" if cls.TABLE else name
        return f"{cls.flag(name)} ({key})"

    @classmethod
    def given(cls, values: dict[str, Any]):
        """An instance from what the user gave (None = not given: the default), remembering which
        RECORDED settings were left out, so that a checkpoint's own values can fill them in."""
        inst = cls(**{k: v for k, v in values.items() if v is not None})
        object.__setattr__(inst, "unset", frozenset(n for n in cls.RECORDED if values.get(n) is None))
        return inst

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in settings_of(type(self))}

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)
