"""Tool-call formats: parsing (good, malformed, unknown, several calls), stop strings, the
observation's framing from a chat template, choose_format on the tiny tokenizers, Turn records."""

from __future__ import annotations

import ast
import copy
import json

import orjson
import pytest

from conftest import REPO
from tcli.errors import UsageError
from tcli.tools import ERRORS, Toolset, Turn, choose_format
from tcli.tools.formats import QWEN_FRAMING, TAGS_FRAMING, template_framing

# A Qwen2.5-style template written for these tests: tool results go into a user turn inside
# <tool_response>, consecutive tool messages share it.
TOOL_TEMPLATE = (
    "{%- for m in messages %}"
    "{%- if m.role == 'tool' %}"
    "{%- if loop.first or messages[loop.index0 - 1].role != 'tool' %}{{- '<|im_start|>user' }}"
    "{%- endif %}"
    "{{- '\\n<tool_response>\\n' + m.content + '\\n</tool_response>' }}"
    "{%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}{{- '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- else %}{{- '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}{%- endif %}"
    "{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")
# a template that knows no tools: a tool message would come out as a role called "tool"
PLAIN_TEMPLATE = ("{%- for m in messages %}{{- m.role + ': ' + m.content + '\\n' }}{%- endfor %}"
                  "{%- if add_generation_prompt %}{{- 'assistant: ' }}{%- endif %}")


@pytest.fixture(scope="module")
def tok(tiny):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny)


def _with_template(tok, template):
    t = copy.deepcopy(tok)
    t.chat_template = template
    return t


def _hermes(name="calc", args=None, extra="") -> str:
    args = args if args is not None else {"expression": "12*7"}
    body = json.dumps({"name": name, "arguments": args})
    return f"<tool_call>\n{body}{extra}\n</tool_call>"


# ----------------------------------------------------------------------------- choose_format

def test_choose_format_on_the_tiny_tokenizers(tok, tmp_path_factory):
    from examples.arith.task import ALPHABET
    from transformers import AutoTokenizer

    from conftest import SMALL, shared_model

    assert tok.chat_template is None and choose_format(tok) == "tags"
    arith = AutoTokenizer.from_pretrained(shared_model(tmp_path_factory, seed=0, alphabet=ALPHABET,
                                                       **SMALL))
    assert choose_format(arith) == "tags"
    assert choose_format(None) == "tags"
    assert choose_format(_with_template(tok, TOOL_TEMPLATE)) == "hermes"
    assert choose_format(_with_template(tok, PLAIN_TEMPLATE)) == "tags"
    assert Toolset(["calc"], tokenizer=tok).format == "tags"
    assert Toolset(["calc"], tokenizer=_with_template(tok, TOOL_TEMPLATE)).format == "hermes"


def test_hermes_framing_is_the_templates_delta(tok):
    """The observation is exactly what the chat template writes between the assistant's call and
    the next generation prompt: rendering call + observation equals rendering the messages."""
    t = _with_template(tok, TOOL_TEMPLATE)
    assert template_framing(t) == QWEN_FRAMING
    ts = Toolset(["calc"], tokenizer=t)
    call = "I will compute. " + _hermes()
    turn = ts.step(call)
    msgs = [{"role": "user", "content": "What is 12*7?"}, {"role": "assistant", "content": call},
            {"role": "tool", "content": "84"}]
    rendered = t.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    prompt = t.apply_chat_template(msgs[:1], tokenize=False, add_generation_prompt=True)
    assert prompt + call + ts.observation(turn) == rendered
    assert ts.observation(turn) == ("<|im_end|>\n<|im_start|>user\n<tool_response>\n84\n"
                                    "</tool_response><|im_end|>\n<|im_start|>assistant\n")


def test_hermes_without_a_tool_template_uses_the_qwen_framing(tok):
    ts = Toolset(["calc"], fmt="hermes", tokenizer=tok)
    turn = ts.step(_hermes())
    assert ts.observation(turn) == f"{QWEN_FRAMING[0]}84{QWEN_FRAMING[1]}"
    assert Toolset(["calc"], fmt="hermes").observation(turn) == ts.observation(turn)


def test_tags_observation():
    ts = Toolset(["calc", "python"], fmt="tags")
    turn = ts.step("First: <calc>2**10</calc>")
    assert ts.observation(turn) == "\n<result>\n1024\n</result>\n" == "1024".join(TAGS_FRAMING)


# ----------------------------------------------------------------------------- stop strings, text

def test_stop_strings_and_system_text():
    h = Toolset(["calc", "python"], fmt="hermes")
    assert h.stop_strings == ("</tool_call>",) and h.names == ("calc", "python")
    t = Toolset(["python", "calc"], fmt="tags")
    assert t.stop_strings == ("</python>", "</calc>")
    assert "<calc>EXPRESSION</calc>" in t.system_text()
    assert "<python>CODE</python>" in t.system_text()
    text = h.system_text()
    assert "<tool_call>" in text and '"name": "calc"' in text and '"expression"' in text
    schemas = h.schemas()
    assert [s["function"]["name"] for s in schemas] == ["calc", "python"]
    assert schemas[0]["function"]["parameters"]["required"] == ["expression"]


# ----------------------------------------------------------------------------- parsing

def test_no_call_is_none():
    h, t = Toolset(["calc"], fmt="hermes"), Toolset(["calc"], fmt="tags")
    for text in ["", "The answer is 84.", "<tool_call>{\"name\": \"calc\"", "<calc>12*7"]:
        assert h.step(text) is None and t.step(text) is None
    assert t.step("<python>1</python>") is None  # not an enabled tool: no stop string either


@pytest.mark.parametrize("text, message", [
    ("<tool_call>not json</tool_call>", "not JSON"),
    ('<tool_call>{"name": "calc", "arguments": {"expression": NaN}}</tool_call>', "not JSON"),
    ("<tool_call>[1, 2]</tool_call>", '"name"'),
    ("<tool_call>{\"arguments\": {}}</tool_call>", '"name"'),
    ("<tool_call>{\"name\": \"calc\", \"arguments\": [1]}</tool_call>", "JSON object"),
    ("oops </tool_call>", "without <tool_call>"),
    ("<tool_call>" + "[" * 100_000 + "</tool_call>", "over"),
    ("<tool_call>" + "[" * 50_000 + "</tool_call>", "not JSON"),
])
def test_malformed_hermes_calls_are_parse_turns(text, message):
    turn = Toolset(["calc"], fmt="hermes").step(text)
    assert turn.error == "parse" and message in turn.result and turn.call is None
    assert turn.raw.endswith("</tool_call>")
    json.dumps(turn.as_record())


def test_unknown_tool_keeps_the_call():
    turn = Toolset(["calc"], fmt="hermes").step(_hermes("search", {"q": "x"}))
    assert turn.error == "unknown_tool" and turn.call == {"name": "search", "arguments": {"q": "x"}}
    assert "calc" in turn.result and "search" in turn.result


def test_arguments_as_a_json_string_are_accepted():
    body = json.dumps({"name": "calc", "arguments": json.dumps({"expression": "1+1"})})
    assert Toolset(["calc"], fmt="hermes").step(f"<tool_call>{body}</tool_call>").result == "2"


def test_the_last_complete_call_counts():
    h = Toolset(["calc"], fmt="hermes")
    text = _hermes(args={"expression": "1+1"}) + " then " + _hermes(args={"expression": "2+3"})
    turn = h.step(text + " and <tool_call>{\"name\": \"calc\"")
    assert turn.result == "5" and turn.raw == _hermes(args={"expression": "2+3"})
    t = Toolset(["calc", "python"], fmt="tags")
    turn = t.step("<python>print(1)</python> <calc>1+1</calc> <calc>2+3</calc> <python>pri")
    assert turn.result == "5" and turn.raw == "<calc>2+3</calc>"
    assert t.step("<calc>1 <calc>2*3</calc>").result == "6"  # nearest opening tag


def test_malformed_tags_calls():
    t = Toolset(["calc"], fmt="tags")
    turn = t.step("12*7</calc>")
    assert turn.error == "parse" and "without <calc>" in turn.result and turn.raw == "12*7</calc>"
    assert t.step("<calc>\n12 * 7\n</calc>").result == "84"  # newlines around the body


def test_step_never_raises_on_odd_text():
    h, t = Toolset(["calc", "python"], fmt="hermes"), Toolset(["calc"], fmt="tags")
    odd = ["\x00</tool_call>", "<tool_call>\ud800</tool_call>",
           _hermes(args={"expression": "\ud800"}),
           "<tool_call>{\"name\": 1}</tool_call>",
           "<tool_call>{\"name\": \"calc\", \"arguments\": {\"expression\": 1}}</tool_call>",
           "<tool_call>" + "9" * 10_000 + "</tool_call>", "</calc></calc>", "<calc></calc>",
           "<calc>" + "(" * 5000 + "</calc>"]
    for text in odd:
        for ts in (h, t):
            turn = ts.step(text)
            if turn is not None:
                assert turn.error in ERRORS and turn.result
                orjson.dumps(turn.as_record())


# ----------------------------------------------------------------------------- records, config

def test_turn_as_record_is_json_ready():
    turn = Toolset(["calc"], fmt="hermes").step(_hermes())
    rec = turn.as_record()
    assert set(rec) == {"call", "raw", "result", "error", "seconds"}
    assert orjson.loads(orjson.dumps(rec)) == rec
    assert rec["call"] == {"name": "calc", "arguments": {"expression": "12*7"}}
    assert rec["error"] is None
    assert Turn(None, "x", "y", "parse", 0.0).as_record()["call"] is None


@pytest.mark.parametrize("names, fmt, words", [
    (["calc", "nope"], "auto", "unknown tool 'nope'"), ([], "auto", "one or more"),
    (["calc", "calc"], "auto", "twice"), (["calc"], "xml", "unknown tool format 'xml'"),
    (["python:"], "auto", "python:module:function"), (["python:a:b:c"], "auto", "python:module"),
])
def test_bad_configuration_is_a_usage_error(names, fmt, words):
    with pytest.raises(UsageError, match=words):
        Toolset(names, fmt=fmt)


def test_tools_is_a_lower_layer():
    """tcli.tools imports only errors, registry, io, records and itself (never torch at import)."""
    allowed = ("tcli.errors", "tcli.registry", "tcli.io", "tcli.records", "tcli.tools")
    for path in sorted((REPO / "tcli" / "tools").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            mods = ([a.name for a in node.names] if isinstance(node, ast.Import)
                    else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            for m in mods:
                assert not m.startswith("tcli") or m.startswith(allowed), (path.name, m)
                assert m.split(".")[0] not in ("torch", "transformers"), (path.name, m)


def test_toolset_closes_as_a_context_manager():
    with Toolset(["calc"]) as ts:
        assert ts.step("<calc>1+1</calc>").result == "2"
    ts.close()  # twice is fine


def test_tags_take_the_call_closed_last_whatever_the_tool_order():
    """With several tools the call whose closing tag comes last counts, whichever tool is named
    first in the toolset."""
    t = Toolset(["calc", "python"], fmt="tags")
    turn = t.step("<calc>1+1</calc> then <python>print(3)</python>")
    assert turn.call["name"] == "python" and turn.raw == "<python>print(3)</python>"


def test_tags_body_keeps_its_spaces():
    """Only the line breaks that frame a tags call are dropped: spaces in the body reach the tool
    as written (Python indentation, a string argument's padding)."""
    from tcli.tools.formats import FORMATS

    tags = FORMATS.get("tags")()
    got = tags.parse("<python>\n  x = 1  \n</python>", ("python",), {"python": "code"})
    assert got.error is None and got.call == {"name": "python", "arguments": {"code": "  x = 1  "}}


def test_unreadable_calls_are_shown_to_the_model_as_errors():
    """A call that cannot run comes back as ``error: <why>``, the same framing as a failing tool,
    so the model can tell a refused call from a result."""
    turn = Toolset(["calc"], fmt="tags").step("12*7</calc>")
    assert (turn.error, turn.result) == ("parse", "error: </calc> without <calc>")
    turn = Toolset(["calc"], fmt="hermes").step(_hermes("search", {"q": "x"}))
    assert turn.error == "unknown_tool"
    assert turn.result == "error: unknown tool 'search'; tools: calc"
