"""``python:module:function`` tools: checked when the Toolset is made, run in the sandboxed
worker (so a plugin gets the same limits and refusals as model code)."""

from __future__ import annotations

import os
import textwrap

import pytest

from tcli.errors import UsageError
from tcli.tools import Limits, Toolset

PLUGIN = '''
import os

print("a plugin module that prints when imported")

def shout(arguments):
    """Upper-case the text."""
    print("prints are dropped")
    return arguments.get("text", arguments.get("input", "")).upper()

def boom(arguments):
    raise ValueError("no good " + str(arguments))

def number(arguments):
    return 3

def pid(arguments):
    return str(os.getpid())

def peek(arguments):
    return open("/etc/passwd").read()

def chatty(arguments):
    return "y" * 100_000

def bye(arguments):
    os._exit(9)
'''
LIMITS = Limits(cpu_seconds=2, wall_seconds=60, output_bytes=1000)


@pytest.fixture
def plugins(tmp_path, monkeypatch):
    name = f"tcli_test_tools_{os.getpid()}"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(PLUGIN))
    monkeypatch.syspath_prepend(str(tmp_path))
    return lambda *fns, fmt="hermes": Toolset([f"python:{name}:{f}" for f in fns], fmt=fmt,
                                              limits=LIMITS)


def _call(ts, name, args):
    import json

    return ts.step(f"<tool_call>{json.dumps({'name': name, 'arguments': args})}</tool_call>")


def test_plugin_success(plugins):
    ts = plugins("shout", "pid")
    assert ts.names == ("shout", "pid")
    turn = _call(ts, "shout", {"text": "abc"})
    assert (turn.result, turn.error) == ("ABC", None)
    assert "Upper-case the text." in ts.system_text()
    assert int(_call(ts, "pid", {}).result) != os.getpid()  # it ran in another process
    tags = plugins("shout", fmt="tags")
    assert tags.stop_strings == ("</shout>",)
    assert tags.step("<shout>hi there</shout>").result == "HI THERE"
    assert _call(ts, "shout", {"text": "x"}).result == _call(ts, "shout", {"text": "x"}).result


def test_plugin_failures_are_error_turns(plugins):
    ts = plugins("boom", "number", "peek", "chatty", "bye")
    turn = _call(ts, "boom", {"a": 1})
    assert turn.error == "tool_error" and turn.result == "ValueError: no good {'a': 1}"
    assert _call(ts, "number", {}).error == "tool_error"
    assert "not str" in _call(ts, "number", {}).result
    peek = _call(ts, "peek", {})
    assert peek.error == "tool_error" and "is not allowed" in peek.result
    chatty = _call(ts, "chatty", {})
    assert chatty.error == "limit" and chatty.result.startswith("y" * 1000 + "\n[output truncated")
    assert _call(ts, "bye", {}).error == "crash"
    assert _call(ts, "boom", "not a dict").error == "parse"


@pytest.mark.parametrize("spec, words", [
    ("python:tcli_no_such_module_xyz:f", "No module named 'tcli_no_such_module_xyz'"),
    ("python:json:no_such_function", "has no function 'no_such_function'"),
    ("python:json:dumps:extra", "python:module:function"),
])
def test_plugins_that_cannot_be_used_are_usage_errors(spec, words):
    with pytest.raises(UsageError, match=words):
        Toolset([spec])


def test_a_plugin_module_that_fails_at_import_is_a_usage_error(tmp_path, monkeypatch):
    (tmp_path / "tcli_test_broken_tool.py").write_text("raise RuntimeError('broken at import')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(UsageError, match="RuntimeError: broken at import"):
        Toolset(["python:tcli_test_broken_tool:f"])


def test_plugin_named_like_another_tool_is_a_usage_error(plugins, tmp_path):
    (tmp_path / "tcli_test_calc_tool.py").write_text("def calc(arguments):\n    return ''\n")
    with pytest.raises(UsageError, match="like another tool"):
        Toolset(["calc", "python:tcli_test_calc_tool:calc"])
