"""The tools one episode may call, in one format: stop strings, parsing, running, observations.

A multi-turn sampler pauses generation at a stop string, hands the turn's text to ``step`` and
appends ``observation(turn)`` as environment tokens. ``step`` never raises for model output: an
unreadable call, an unknown tool, a tool error, a time-out or a crashed worker is a ``Turn`` with
``error`` set and a ``result`` that tells the model what went wrong, and the episode goes on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from tcli.errors import UsageError
from tcli.tools.formats import FORMATS, choose_format, framing
from tcli.tools.registry import Tool, get_tool
from tcli.tools.sandbox import Limits, Outcome

ERRORS = ("parse", "unknown_tool", "timeout", "limit", "crash", "tool_error")


@dataclass
class Turn:
    call: dict | None      # {"name": str, "arguments": dict} as parsed; None when unparseable
    raw: str               # the call text as the model wrote it
    result: str            # what the tool returned, or the error text shown to the model
    error: str | None      # None on success, else one of ERRORS
    seconds: float         # wall time of the call

    def as_record(self) -> dict:
        """The JSON-ready form that goes into a rollout's ``turns`` list."""
        return {"call": _valid_utf8(self.call), "raw": _valid_utf8(self.raw),
                "result": _valid_utf8(self.result), "error": self.error,
                "seconds": round(float(self.seconds), 6)}


def _valid_utf8(x):
    """``x`` with lone surrogates (JSON escapes like \\ud800 in a call) replaced, so that every
    JSON writer takes it."""
    if isinstance(x, str):
        return x.encode("utf-8", "replace").decode("utf-8")
    if isinstance(x, dict):
        return {_valid_utf8(k): _valid_utf8(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_valid_utf8(v) for v in x]
    return x


class Toolset:
    """``names`` are what the model calls (a plugin ``python:module:function`` is called
    ``function``); ``format`` is "hermes" or "tags" once "auto" is resolved. Each call runs in a
    process of its own that is gone when ``step`` returns, so ``step`` may be called from several
    threads at once and ``close`` has nothing to release."""

    def __init__(self, names: Sequence[str], fmt: str = "auto", tokenizer=None,
                 limits: Limits | None = None):
        if isinstance(names, str) or not names or not all(isinstance(n, str) for n in names):
            raise UsageError("tools: give a list of one or more tool names")
        if len(set(names)) != len(names):
            raise UsageError(f"tools: a tool is named twice in {list(names)}")
        self.limits = limits if limits is not None else Limits()
        tools = [get_tool(n, self.limits) for n in names]
        self._tools: dict[str, Tool] = {}
        for spec, t in zip(names, tools):
            if t.name in self._tools:
                raise UsageError(f"tools: {spec} is called {t.name!r}, like another tool")
            self._tools[t.name] = t
        self.names: tuple[str, ...] = tuple(self._tools)
        self.format: str = choose_format(tokenizer) if fmt == "auto" else fmt
        self._fmt = FORMATS.get(self.format)()
        self._framing = framing(self.format, tokenizer)
        self.stop_strings: tuple[str, ...] = self._fmt.stop_strings(self.names)
        self._tag_args = {n: t.tag_argument for n, t in self._tools.items()}

    def system_text(self) -> str:
        """How to call the tools, for a prompt or a system message."""
        return self._fmt.system_text(list(self._tools.values()))

    def schemas(self) -> list[dict]:
        """The tools as function descriptions (a chat template's ``tools`` argument)."""
        return [t.schema() for t in self._tools.values()]

    def step(self, turn_text: str) -> Turn | None:
        """The call at the end of ``turn_text``, run; None when the turn holds no call."""
        parsed = self._fmt.parse(turn_text, self.names, self._tag_args)
        if parsed is None:
            return None
        if parsed.error is not None:
            return Turn(parsed.call, parsed.raw, f"error: {parsed.message}", parsed.error, 0.0)
        tool = self._tools[parsed.call["name"]]
        try:
            out = tool.run(parsed.call["arguments"], self.limits)
        except Exception as e:  # noqa: BLE001 - a failing tool must not end the episode
            msg = " ".join(str(e).split())[:300]
            out = Outcome(f"error: the tool failed: {type(e).__name__}: {msg}", "crash", 0.0)
        return Turn(parsed.call, parsed.raw, out.text, out.error, out.seconds)

    def close(self) -> None:
        """Nothing to release (no worker outlives its call); here for callers that own a
        toolset and end it."""

    def __enter__(self) -> "Toolset":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def observation(self, turn: Turn) -> str:
        """The text appended after the call as environment tokens."""
        before, after = self._framing
        return f"{before}{turn.result}{after}"
