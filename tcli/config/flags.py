"""Command-line flags generated from ``Options`` dataclasses.

A command declares a parameter typed with an ``Options`` class (``opts: SampleOptions``);
:func:`options_command` replaces it with one typer option per setting and hands the command a
validated instance. ``Annotated[SampleOptions, Without("mode", ...)]`` leaves settings out (they
keep their defaults); ``overrides=True`` makes every flag default to None so that a TOML file can
supply the value (``tcli loop``).
"""

from __future__ import annotations

import functools
import inspect
import typing
from dataclasses import dataclass
from typing import Annotated, Any, List, Optional

import typer

from tcli.config.spec import Options, item_type, settings_of, spec_of, value_type


@dataclass(frozen=True)
class Without:
    """Settings a command does not offer (they keep their defaults)."""

    names: tuple[str, ...]

    def __init__(self, *names: str):
        object.__setattr__(self, "names", names)


def shown_default(v: Any) -> str:
    """A default as help texts show it ('' = none to show)."""
    if v is None:
        return ""
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, tuple):  # a list setting: as its flag takes it
        return ",".join(str(x) for x in v)
    return str(v)


def help_text(cls: type[Options], f, *, overrides: bool = False) -> str:
    spec = spec_of(f)
    text = spec.help
    if spec.choices is not None:
        text += f" One of: {', '.join(spec.choices())}."
    if f.name in cls.RECORDED:
        text += " When not given, a checkpoint that records it supplies it."
    if (overrides or isinstance(f.default, tuple)) and shown_default(f.default):
        text += f" [default: {shown_default(f.default)}]"
    return text


def typer_parameter(cls: type[Options], f, *, overrides: bool = False, flag: str | None = None
                    ) -> inspect.Parameter:
    """One keyword parameter whose annotation makes typer offer the setting as a flag."""
    typ, _ = value_type(cls, f.name)
    flag = flag or cls.flag(f.name)
    spec = spec_of(f)
    if typ is bool:
        decls = (f"{flag}/--no-{flag[2:]}",)
    else:
        decls = (flag, spec.short) if spec.short and not cls.FLAG_PREFIX else (flag,)
    optional = overrides or f.default is None
    metavar = None
    if typ is tuple:  # a list setting: the flag repeats or takes commas (the help shows it)
        metavar = f"<{item_type(cls, f.name).__name__}>,..."
        typ, optional = List[str], True
    option = typer.Option(*decls, help=help_text(cls, f, overrides=overrides),
                          show_default=not optional, metavar=metavar)
    annotation = Annotated[Optional[typ] if optional else typ, option]
    return inspect.Parameter(flag[2:].replace("-", "_"), inspect.Parameter.KEYWORD_ONLY,
                             default=None if overrides else f.default, annotation=annotation)


def param_name(cls: type[Options], name: str) -> str:
    return cls.flag(name)[2:].replace("-", "_")


def offered(cls: type[Options], without: tuple[str, ...] = ()) -> list:
    return [f for f in settings_of(cls) if f.name not in without]


def _options_params(fn) -> dict[str, tuple[type[Options], tuple[str, ...]]]:
    hints = typing.get_type_hints(fn, include_extras=True)
    found = {}
    for name, hint in hints.items():
        base, extra = hint, ()
        if typing.get_origin(hint) is Annotated:
            base, *meta = typing.get_args(hint)
            extra = next((m.names for m in meta if isinstance(m, Without)), ())
        if isinstance(base, type) and issubclass(base, Options):
            found[name] = (base, extra)
    return found


def _given(param: str) -> bool:
    """Was the flag on the command line (not its default)? True outside a click command."""
    try:  # typer >= 0.20 vendors click
        from typer._click.core import ParameterSource
        from typer._click.globals import get_current_context
    except ImportError:  # pragma: no cover
        from click import get_current_context
        from click.core import ParameterSource

    ctx = get_current_context(silent=True)
    source = ctx.get_parameter_source(param) if ctx is not None else ParameterSource.COMMANDLINE
    return source not in (None, ParameterSource.DEFAULT)


def options_command(fn):
    """Expand ``Options``-typed parameters of ``fn`` into flags; call ``fn`` with instances."""
    groups = _options_params(fn)
    hints = typing.get_type_hints(fn, include_extras=True)
    params = []
    for p in inspect.signature(fn).parameters.values():
        if p.name in groups:
            cls, without = groups[p.name]
            params += [typer_parameter(cls, f) for f in offered(cls, without)]
        else:
            params.append(p.replace(annotation=hints.get(p.name, p.annotation)))

    @functools.wraps(fn)
    def command(**kw: Any):
        for name, (cls, without) in groups.items():
            values = {f.name: kw.pop(param_name(cls, f.name)) for f in offered(cls, without)}
            for n in cls.RECORDED:  # not given: None, for a checkpoint to fill in
                if n in values and not _given(param_name(cls, n)):
                    values[n] = None
            kw[name] = cls.given(values)
        return fn(**kw)

    command.__signature__ = inspect.Signature(params)
    command.__annotations__ = {p.name: p.annotation for p in params}  # resolved, not strings
    del command.__wrapped__  # typer must see the generated signature, not fn's
    return command
