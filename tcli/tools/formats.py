"""How the model writes a tool call and reads its result: the ``hermes`` and ``tags`` formats.

``hermes``: ``<tool_call>{"name": "calc", "arguments": {"expression": "12*7"}}</tool_call>``; the
result comes back in the chat template's tool turn (``<tool_response>`` inside a user turn for
Qwen-style templates), framed by the text the template puts between an assistant message and the
next generation prompt. ``tags``: ``<calc>12*7</calc>``, the result in ``<result>...</result>``.

Parsing never raises: a call it cannot read is a ``Parsed`` with ``error="parse"``. When a turn
holds several complete calls, the last one counts (generation pauses after the first stop string,
so more than one means the stop strings were not used).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from tcli.registry import Registry

MAX_CALL_CHARS = 64 << 10  # a call body longer than this is not parsed
CALL_MARK, RESULT_MARK = "TCLI-CALL-4f1d", "TCLI-RESULT-4f1d"
QWEN_FRAMING = ("<|im_end|>\n<|im_start|>user\n<tool_response>\n",
                "\n</tool_response><|im_end|>\n<|im_start|>assistant\n")
TAGS_FRAMING = ("\n<result>\n", "\n</result>\n")


@dataclass
class Parsed:
    call: dict | None     # {"name", "arguments"} or None when unreadable
    raw: str              # the call's text as written
    error: str | None     # None, "parse" or "unknown_tool"
    message: str = ""     # why, for the model


def _no_constant(name: str):
    raise ValueError(f"{name} is not JSON")


class Format:
    name = ""

    def stop_strings(self, names: tuple[str, ...]) -> tuple[str, ...]:
        raise NotImplementedError

    def parse(self, text: str, names: tuple[str, ...], tag_args: dict) -> Parsed | None:
        raise NotImplementedError

    def system_text(self, tools) -> str:
        raise NotImplementedError


FORMATS: Registry[type[Format]] = Registry("tool format")


@FORMATS.register("hermes")
class Hermes(Format):
    name = "hermes"
    OPEN, CLOSE = "<tool_call>", "</tool_call>"

    def stop_strings(self, names):
        return (self.CLOSE,)

    def parse(self, text, names, tag_args):
        end = text.rfind(self.CLOSE)
        if end < 0:
            return None
        stop = end + len(self.CLOSE)
        start = text.rfind(self.OPEN, 0, end)
        if start < 0:
            return Parsed(None, text[:stop], "parse", f"{self.CLOSE} without {self.OPEN}")
        raw, body = text[start:stop], text[start + len(self.OPEN):end].strip()
        if len(body) > MAX_CALL_CHARS:
            return Parsed(None, raw, "parse", f"the call is over {MAX_CALL_CHARS} characters")
        try:
            obj = json.loads(body, parse_constant=_no_constant)
        except (ValueError, RecursionError) as e:
            return Parsed(None, raw, "parse", f"the call is not JSON: {' '.join(str(e).split())}")
        return self._call(obj, raw, names)

    @staticmethod
    def _call(obj, raw: str, names) -> Parsed:
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
            return Parsed(None, raw, "parse", 'write {"name": <tool>, "arguments": {...}}')
        args = obj.get("arguments", {})
        if isinstance(args, str):  # some models write the arguments as a JSON string
            try:
                args = json.loads(args, parse_constant=_no_constant)
            except (ValueError, RecursionError):
                pass
        if not isinstance(args, dict):
            return Parsed(None, raw, "parse", "arguments must be a JSON object")
        call = {"name": obj["name"], "arguments": args}
        if obj["name"] not in names:
            return Parsed(call, raw, "unknown_tool",
                          f"unknown tool {obj['name']!r}; tools: {', '.join(names)}")
        return Parsed(call, raw, None)

    def system_text(self, tools) -> str:
        schemas = "\n".join(json.dumps(t.schema(), ensure_ascii=False) for t in tools)
        return ("# Tools\n\nYou can call these functions while you work; their signatures are "
                f"inside <tools></tools>:\n<tools>\n{schemas}\n</tools>\n\n"
                "To call one, write a JSON object with its name and arguments between "
                "<tool_call></tool_call> tags, then stop:\n<tool_call>\n"
                '{"name": <function-name>, "arguments": <arguments-json-object>}\n</tool_call>\n'
                "The result comes back inside <tool_response></tool_response>.")


@FORMATS.register("tags")
class Tags(Format):
    name = "tags"

    def stop_strings(self, names):
        return tuple(f"</{n}>" for n in names)

    def parse(self, text, names, tag_args):
        best = None  # (end, name) of the last closing tag
        for n in names:
            end = text.rfind(f"</{n}>")
            if end >= 0 and (best is None or end > best[0]):
                best = (end, n)
        if best is None:
            return None
        end, n = best
        close, opening = f"</{n}>", f"<{n}>"
        stop = end + len(close)
        start = text.rfind(opening, 0, end)
        if start < 0:
            return Parsed(None, text[:stop], "parse", f"{close} without {opening}")
        body = text[start + len(opening):end].strip("\r\n")
        if len(body) > MAX_CALL_CHARS:
            return Parsed(None, text[start:stop], "parse",
                          f"the call is over {MAX_CALL_CHARS} characters")
        return Parsed({"name": n, "arguments": {tag_args[n]: body}}, text[start:stop], None)

    def system_text(self, tools) -> str:
        lines = [f"- <{t.name}>{t.tag_argument.upper()}</{t.name}>: {t.description}" for t in tools]
        return ("You can use these tools while you work. Write the call and stop; its result "
                "follows inside <result></result>.\n" + "\n".join(lines))


def _template_source(tokenizer) -> str:
    src = getattr(tokenizer, "chat_template", None)
    if isinstance(src, dict):
        src = "\n".join(str(v) for v in src.values())
    return src if isinstance(src, str) else ""


def template_framing(tokenizer) -> tuple[str, str] | None:
    """(text before, text after) the tool result that the tokenizer's chat template puts between
    an assistant message and the next generation prompt; None if it renders no tool message."""
    if "tool" not in _template_source(tokenizer):
        return None
    messages = [{"role": "user", "content": "question"},
                {"role": "assistant", "content": CALL_MARK},
                {"role": "tool", "name": "calc", "tool_call_id": "call0", "content": RESULT_MARK}]
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception:  # noqa: BLE001 - any template error means: no usable tool turn
        return None
    if not isinstance(text, str):
        return None
    a, r = text.find(CALL_MARK), text.find(RESULT_MARK)
    if a < 0 or r < a + len(CALL_MARK):
        return None
    return text[a + len(CALL_MARK):r], text[r + len(RESULT_MARK):]


def choose_format(tokenizer) -> str:
    """"hermes" when the tokenizer's chat template renders tool messages, else "tags"."""
    return "hermes" if tokenizer is not None and template_framing(tokenizer) else "tags"


def framing(fmt: str, tokenizer) -> tuple[str, str]:
    """The observation's framing for format ``fmt``."""
    if fmt == "tags":
        return TAGS_FRAMING
    return (template_framing(tokenizer) if tokenizer is not None else None) or QWEN_FRAMING
