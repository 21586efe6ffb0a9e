"""A single-value option given twice is a usage error, for every command alike.

Click keeps the last value without a word, so ``tcli loop --eval-data a --eval-data b`` would
evaluate on ``b`` alone and report a result that looks valid. The command line is read here the
way click's parser reads it, from the click command's own parameters (no option is special-cased),
before any command body runs; options declared ``multiple``, counting flags and a flag repeated
with the same meaning stay accepted. Only attributes of click parameters are read: nothing is
imported, so start-up pays nothing.
"""

from __future__ import annotations

# one occurrence on the command line: (click parameter, the option as typed, its value or None)
Seen = tuple[object, str, object]


def repeated_option(group, argv: list[str]) -> str | None:
    """The usage error for an option given more than once where one value is kept, else None.

    Walks from ``group`` down the subcommands named in ``argv``. An unknown option, a missing
    value or a value given to a flag stops the check: click reports those itself (``-h`` is one,
    so help still wins)."""
    cmd, args = group, list(argv)
    while cmd is not None:
        scanned = _scan(cmd, args)
        if scanned is None:
            return None
        seen, rest = scanned
        problem = _problem(seen)
        if problem or not rest:
            return problem
        cmd, args = (getattr(cmd, "commands", None) or {}).get(rest[0]), rest[1:]
    return None


def _options(cmd) -> tuple[dict, dict]:
    """Long and short option strings of ``cmd``, each mapped to its click parameter; click
    counts ``-x`` as short and everything else (``--xy``, ``-xy``) as long."""
    longs, shorts = {}, {}
    for p in cmd.params:
        if getattr(p, "param_type_name", "") != "option":
            continue
        for opt in (*p.opts, *p.secondary_opts):
            (shorts if len(opt) == 2 and opt[1] != "-" else longs)[opt] = p
    return longs, shorts


def _scan(cmd, args: list[str]) -> tuple[list[Seen], list[str]] | None:
    """The option occurrences in ``args`` and what follows them for a subcommand (a group stops
    at its first positional argument, a command reads options among its arguments); None where
    click would refuse the line itself."""
    longs, shorts = _options(cmd)
    group = hasattr(cmd, "commands")
    seen: list[Seen] = []
    rest = list(args)
    while rest:
        arg = rest.pop(0)
        if arg == "--":
            return seen, []
        if arg[:1] != "-" or len(arg) == 1:
            if group:
                return seen, [arg, *rest]
            continue
        name, eq, attached = arg.partition("=")
        if name in longs:
            taken = _take(longs[name], name, [attached] if eq else None, rest, seen)
        elif arg[:2] != "--":
            taken = _take_short(arg, shorts, rest, seen)
        else:
            taken = False
        if not taken:
            return None
    return seen, []


def _take(p, opt: str, attached: list[str] | None, rest: list[str], seen: list[Seen]) -> bool:
    """Record one option and consume its value(s); False where click would refuse it."""
    if p.is_flag or p.count:
        seen.append((p, opt, None))
        return attached is None
    value = [*(attached or []), *rest[: p.nargs - len(attached or [])]]
    if len(value) < p.nargs:
        return False
    del rest[: p.nargs - len(attached or [])]
    seen.append((p, opt, value[0] if p.nargs == 1 else " ".join(value)))
    return True


def _take_short(arg: str, shorts: dict, rest: list[str], seen: list[Seen]) -> bool:
    """``-q``, ``-ofile`` and grouped flags such as ``-qv``: the first short option that takes a
    value takes the remaining characters, or else the next argument."""
    for i, ch in enumerate(arg[1:], start=2):
        p = shorts.get(arg[0] + ch)
        if p is None:
            return False
        if not (p.is_flag or p.count):
            return _take(p, arg[0] + ch, [arg[i:]] if i < len(arg) else None, rest, seen)
        seen.append((p, arg[0] + ch, None))
    return True


def _problem(seen: list[Seen]) -> str | None:
    """The first parameter, in command-line order, whose repeats would lose a value."""
    by_param: dict[int, list[Seen]] = {}
    for s in seen:
        by_param.setdefault(id(s[0]), []).append(s)
    for group in by_param.values():
        p = group[0][0]
        if p.multiple or p.count or len(group) < 2:
            continue
        if not p.is_flag:
            values = ", ".join(str(v) for _, _, v in group)
            times = "twice" if len(group) == 2 else f"{len(group)} times"
            return f"{_label(p)} was given {times} ({values}): give it once"
        on = next((o for _, o, _ in group if o in p.opts), None)
        off = next((o for _, o, _ in group if o in p.secondary_opts), None)
        if on and off:
            return f"{on} and {off} were both given: give one of them"
    return None


def _label(p) -> str:
    """The option's names, short first, as the help shows them: ``-d/--data``."""
    return "/".join(sorted(p.opts, key=len))
