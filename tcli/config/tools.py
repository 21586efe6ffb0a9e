"""Tool-use settings of sampling, declared once (docs/design.md §5.8).

``SampleOptions`` (config/stages.py) takes these fields from ``ToolOptions``, so they reach the
flags of ``tcli sample-tree`` and ``tcli eval`` and the loop's ``[sample]`` table alike. Tool names
are checked where the toolset is built (tcli/tools, imported only then): a plugin
``python:module:function`` cannot be checked without importing it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from tcli.config.spec import Options, at_least, setting
from tcli.errors import UsageError

TOOL_FORMATS = ("auto", "hermes", "tags")


def _names(v: tuple[str, ...]) -> str | None:
    if len(set(v)) < len(v):
        return f"names a tool twice: {', '.join(v)}"
    return None


@dataclass(frozen=True)
class ToolOptions(Options):
    """Multi-turn rollouts: the policy calls tools and their results are appended as environment
    tokens (loss_mask 0)."""

    TOOLS_ONLY: ClassVar[tuple[str, ...]] = ("max_turns", "tool_format")  # read with tools only

    tools: tuple[str, ...] = setting(
        (), "Tools the policy may call while it samples (calc, python, or python:module:function; "
        "comma-separated, a list in TOML; empty = no tools). A call pauses its sequence, the "
        "tool's result is appended as environment tokens (loss_mask 0) and sampling goes on; "
        "--max-new-tokens caps policy and environment tokens together. hf engine only.",
        check=_names)
    max_turns: int = setting(4, "With --tools: tool calls per response at most; a further call "
                             "ends the response (finish_reason length).", check=at_least(1))
    tool_format: str = setting("auto", "With --tools: how calls are written. hermes: "
                               "<tool_call>{json}</tool_call> in the chat template's tool turns; "
                               "tags: <calc>12*7</calc>, results in <result>...</result>; auto: "
                               "hermes when the chat template knows tools, else tags.",
                               choices=lambda: TOOL_FORMATS)

    def check_tools(self) -> None:
        """What tools need of the other sample settings (``SampleOptions.check`` calls it)."""
        names = tuple(t for t in self.tools if t)  # `tools = ""` means none
        object.__setattr__(self, "tools", names)
        tree, branch = getattr(self, "mode", "") == "tree", getattr(self, "branch", "")
        if not names:
            if tree and branch == "tool":
                raise UsageError(f"{self.label('branch')} tool splits after tool results: give "
                                 f"{self.label('tools')}")
            return
        if getattr(self, "engine", "hf") == "vllm":
            raise UsageError(f"{self.label('tools')}: the vllm engine cannot sample with tools; "
                             f"use {self.label('engine')} hf")
        if tree and branch != "tool":
            raise UsageError(f"{self.label('tools')} with {self.label('mode')} tree needs "
                             f"{self.label('branch')} tool (a split after each tool result), got "
                             f"{branch}")

    def check_tools_read(self, model: str = "") -> None:
        """Tool settings changed from their defaults while no tool is named (given, or recorded
        by ``model``) would be ignored without a word: refused."""
        default = type(self)()
        idle = [k for k in self.TOOLS_ONLY if getattr(self, k) != getattr(default, k)]
        if self.tools or not idle:
            return
        one = not idle[1:]
        raise UsageError(f"{', '.join(map(self.label, idle))} {'is' if one else 'are'} read only "
                         f"with {self.label('tools')}, and no tool is named"
                         f"{f' (nor recorded by {model})' if model else ''}: name the tools, or "
                         f"leave {'it' if one else 'them'} out")
