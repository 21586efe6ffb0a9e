"""Tools a policy may call during an episode: exact arithmetic, sandboxed Python, plugins.

This package only re-exports; each job has its module:

- ``calc``: exact arithmetic parsed with ``ast`` (never evaluated);
- ``sandbox``: a limited worker process for Python code and plugins (``sandbox_boot`` is the
  script it runs, never imported);
- ``registry``: the ``TOOLS`` table and ``python:module:function`` plugins;
- ``formats``: the ``hermes`` and ``tags`` call formats, their stop strings and framing;
- ``toolset``: ``Toolset`` (parse, run, observe) and the ``Turn`` record.

Nothing here imports torch; transformers is used only through a tokenizer handed in.
"""

from __future__ import annotations

from tcli.tools.formats import FORMATS, choose_format
from tcli.tools.registry import TOOLS, Tool, get_tool
from tcli.tools.sandbox import Limits, network_isolation
from tcli.tools.toolset import ERRORS, Toolset, Turn

__all__ = ["ERRORS", "FORMATS", "Limits", "TOOLS", "Tool", "Toolset", "Turn", "choose_format",
           "get_tool", "network_isolation"]
