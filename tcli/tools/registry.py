"""The ``TOOLS`` table (``calc``, ``python``) and ``python:module:function`` plugins.

A tool is a name the model writes, a description and JSON schema for the system text, the
argument the ``tags`` format fills with the text between its tags, and ``run(arguments, limits)
-> Outcome``. ``run`` never raises for what the model wrote: a bad argument is a ``tool_error``.
Bad configuration (an unknown name, a plugin that does not import) is a ``UsageError`` here.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass
from typing import Callable

from tcli.errors import UsageError
from tcli.registry import Registry
from tcli.tools.calc import MAX_CHARS, CalcError, calc
from tcli.tools.sandbox import Limits, Outcome, plugin_request, run_code, run_plugin, run_worker

PLUGIN_PREFIX = "python:"


@dataclass(frozen=True)
class Tool:
    name: str                                    # what the model writes
    description: str
    parameters: dict                             # JSON schema of the arguments
    tag_argument: str                            # filled by the "tags" format
    run: Callable[[dict, Limits], Outcome]

    def schema(self) -> dict:
        """The OpenAI/Hermes function description chat templates take as ``tools``."""
        return {"type": "function", "function": {"name": self.name, "description": self.description,
                                                 "parameters": self.parameters}}


TOOLS: Registry[Callable[[], Tool]] = Registry("tool")


def _string_argument(tool: str, arguments, key: str) -> str:
    if not isinstance(arguments, dict) or not isinstance(arguments.get(key), str):
        raise CalcError(f'{tool} takes {{"{key}": "<text>"}}, got {_short(arguments)}')
    return arguments[key]


def _short(x) -> str:
    s = repr(x)
    return s if len(s) <= 80 else s[:77] + "..."


def _run_calc(arguments: dict, limits: Limits) -> Outcome:
    start = time.monotonic()
    try:
        text, error = calc(_string_argument("calc", arguments, "expression")), None
    except CalcError as e:
        text, error = f"error: {e}", "tool_error"
    return Outcome(text, error, time.monotonic() - start)


def unfence(code: str) -> str:
    """The program inside a Markdown fence (```python ... ```), which models often write."""
    lines = code.strip().split("\n")
    if len(lines) >= 2 and lines[0].startswith("```") and lines[-1].strip() == "```":
        return "\n".join(lines[1:-1])
    return code


def _run_python(arguments: dict, limits: Limits) -> Outcome:
    try:
        code = _string_argument("python", arguments, "code")
    except CalcError as e:
        return Outcome(f"error: {e}", "tool_error", 0.0)
    return run_code(unfence(code), limits)


def _string_schema(key: str, what: str) -> dict:
    return {"type": "object", "properties": {key: {"type": "string", "description": what}},
            "required": [key]}


@TOOLS.register("calc")
def _calc() -> Tool:
    return Tool("calc", "Exact arithmetic on integers, decimals and fractions: + - * / // % ** and "
                "parentheses. Answers an integer, an exact decimal or a reduced fraction p/q.",
                _string_schema("expression", f"e.g. (12*7 - 3)/4; at most {MAX_CHARS} characters"),
                "expression", _run_calc)


@TOOLS.register("python")
def _python() -> Tool:
    return Tool("python", "Run a Python program (standard library only, no network, no files "
                "outside its own empty working directory, a few seconds of CPU). Answers what it "
                "prints on stdout and stderr; print what you want to see.",
                _string_schema("code", "a complete Python program"), "code", _run_python)


def _plugin_path() -> list[str]:
    """Where the worker looks for a plugin's module: this process's import path and the working
    directory (the `tcli` script leaves it off ``sys.path``, unlike ``python -m``)."""
    return [os.path.abspath(p) for p in sys.path if p] + [os.getcwd()]


def plugin_tool(spec: str, limits: Limits) -> Tool:
    """``python:module:function``, checked now: the module imports in a worker and has the
    function (UsageError otherwise)."""
    parts = spec.split(":")
    if len(parts) != 3 or not parts[1] or not parts[2] or not parts[2].isidentifier():
        raise UsageError(f"bad tool {spec!r}; write python:module:function "
                         "(e.g. python:my_tools:lookup)")
    _, module, function = parts
    path = _plugin_path()
    check = plugin_request(module, function, path, mode="check")
    out, rc, killed, _ = run_worker(check, limits, cap=1 << 16)
    try:
        ans = json.loads(out)
    except ValueError:
        ans = {"ok": False, "error": f"the check ended without an answer (exit status {rc}, "
                                     f"{killed or 'no limit hit'}): {out[-300:]!r}"}
    if not ans.get("ok"):
        raise UsageError(f"cannot use tool {spec}: {ans.get('error')}")

    def run(arguments: dict, lim: Limits) -> Outcome:
        if not isinstance(arguments, dict):
            return Outcome(f"error: {function} takes a JSON object, got {_short(arguments)}",
                           "tool_error", 0.0)
        return run_plugin(plugin_request(module, function, path, arguments=arguments), lim)

    doc = ans.get("doc") or f"the {function} tool"
    return Tool(function, doc, {"type": "object"}, "input", run)


def get_tool(name: str, limits: Limits) -> Tool:
    """The tool ``name`` names: a registry name or ``python:module:function``."""
    if name.startswith(PLUGIN_PREFIX):
        return plugin_tool(name, limits)
    if name not in TOOLS:
        valid = ", ".join([*TOOLS.names(), "python:module:function"])
        raise UsageError(f"unknown tool {name!r}; valid: {valid}")
    return TOOLS.get(name)()
