"""A task that pays to call a tool: multi-digit arithmetic a tiny char-level model cannot do in
its head but can with the ``calc`` tool.

    prompt:          "482*37=?\\n"              (or "482+913+275=?\\n")
    with the tool:   "<calc>482*37</calc>\\n<result>\\n17834\\n</result>\\n#### 17834"
    in the head:     "#### 17291"              (a guess: right 1 time in 100 or 1000)

Two kinds of prompt: a product of a 3-digit and a 2-digit number, and a sum of three or four
3-digit numbers; each kind has one length, so that copying the expression into the call is a
fixed shift a tiny model learns quickly. (With 4-digit factors some warm-start seeds copied the
5-6 digit products into the answer badly even after twice the SFT steps.) The answer is the
exact integer, scored by the ``arith`` verifier.

Warm-start traces: the call text follows the ``tags`` format of :mod:`tcli.tools` (the tag is
read off the toolset's stop string) and the result block is whatever the toolset's own
``observation`` returns for the real ``calc`` call, so the traces match what the loop appends.
Guessed answers keep the leading digits and draw the last ones: what a model that cannot carry
writes, and the habit RL must replace by calling the tool.

Splits are disjoint by construction: an expression belongs to ``test`` when a stable hash of its
text says so, to ``train`` otherwise, whatever seed drew it.
"""

from __future__ import annotations

import hashlib
import random
import re

SOURCE = "tcli-tools-arith"
KINDS = ("mul", "add3", "add4")   # the prompts cycle through these
TEST_SHARE = 8                    # 1 expression in 8 belongs to the test split
TOOL = "calc"
_EXPR = re.compile(r"\d+(?:[*+]\d+)+")


def split_of(expr: str) -> str:
    """'test' or 'train' from a stable hash of the expression text (not of any seed)."""
    h = int.from_bytes(hashlib.blake2b(expr.encode(), digest_size=8).digest(), "little")
    return "test" if h % TEST_SHARE == 0 else "train"


def random_expression(rng: random.Random, kind: str) -> str:
    if kind == "mul":
        return f"{rng.randint(100, 999)}*{rng.randint(11, 99)}"
    terms = 3 if kind == "add3" else 4
    return "+".join(str(rng.randint(100, 999)) for _ in range(terms))


def evaluate(expr: str) -> int:
    """The exact value of a task expression (a product of two numbers or a sum)."""
    if not _EXPR.fullmatch(expr):
        raise ValueError(f"not a task expression: {expr!r}")
    if "*" in expr:
        a, b = expr.split("*")
        return int(a) * int(b)
    return sum(int(t) for t in expr.split("+"))


def prompt_text(expr: str) -> str:
    return f"{expr}=?\n"


def expression_of(prompt: str) -> str:
    """The expression a prompt asks for (its one run of digits joined by ``*`` or ``+``)."""
    found = _EXPR.findall(prompt)
    if len(found) != 1:
        raise ValueError(f"not a tools-arith prompt: {prompt!r}")
    return found[0]


def make_prompts(n: int, seed: int, split: str = "train") -> list[dict]:
    """``n`` distinct prompt records of ``split`` (train|test), deterministic for ``seed``; the
    kinds take turns (mul, add3, add4, mul, ...)."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', not {split!r}")
    rng = random.Random(f"{SOURCE}:{split}:{seed}")
    seen: set[str] = set()
    out: list[dict] = []
    while len(out) < n:
        kind = KINDS[len(out) % len(KINDS)]
        expr = random_expression(rng, kind)
        if expr in seen or split_of(expr) != split:
            continue
        seen.add(expr)
        out.append({"id": f"tools-{split}-{len(out):06d}", "prompt": prompt_text(expr),
                    "answer": str(evaluate(expr)),
                    "meta": {"source": SOURCE, "split": split, "kind": kind, "seed": seed}})
    return out


def guess(value: int, rng: random.Random, keep: int = 2) -> int:
    """A head-arithmetic guess: the ``keep`` leading digits of ``value`` kept, the others drawn
    at random (so right by chance only)."""
    s = str(value)
    if len(s) <= keep:
        return value
    return int(s[:keep] + "".join(rng.choice("0123456789") for _ in s[keep:]))


def call_text(toolset, expr: str) -> str:
    """``<calc>expr</calc>``: the tags-format call, its closing tag taken from the toolset."""
    close = next(s for s in toolset.stop_strings if s.strip("</>") == TOOL)
    return close.replace("</", "<", 1) + expr + close


def protocol_tokens(toolset) -> list[str]:
    """What the demo's char-level tokenizer holds as one token each: the tool instructions that
    the sampler puts in front of every prompt (a few hundred characters the tiny model never
    needs to read letter by letter), the call's tags and the result's framing, all as the
    toolset writes them."""
    call = call_text(toolset, "1+1")
    turn = toolset.step(call)
    before, _, after = toolset.observation(turn).partition(turn.result)
    close = call[call.index("</"):]
    return [t for t in (toolset.system_text(), call[:call.index(">") + 1], close, before, after)
            if t]


def policy_prompt(toolset, record: dict) -> str:
    """The prompt text the sampler gives the policy under ``--tools`` (plain template, no chat
    template): the toolset's instructions in front of the record's prompt."""
    from tcli.prompts import prompt_messages, resolve_template
    from tcli.stages.sample import with_tool_text

    return with_tool_text(prompt_messages(record, resolve_template("plain")),
                          toolset.system_text(), False)[0]["content"]


def tool_trace(toolset, record: dict) -> str:
    """The response that calls the tool: the call, the toolset's observation of it, the answer.
    Raises if the real tool disagrees with the record's answer (the data would be wrong)."""
    call = call_text(toolset, expression_of(record["prompt"]))
    turn = toolset.step(call)
    if turn is None or turn.error is not None or turn.result.strip() != record["answer"]:
        raise ValueError(f"{record['id']}: calc gave {getattr(turn, 'result', None)!r} for "
                         f"{call!r}, expected {record['answer']}")
    obs = toolset.observation(turn)
    sep = "" if obs.endswith("\n") else "\n"
    return f"{call}{obs}{sep}#### {turn.result.strip()}"


def head_trace(record: dict, rng: random.Random, keep: int = 2) -> str:
    """The response that answers without the tool: a guess (``keep`` leading digits right)."""
    return f"#### {guess(int(record['answer']), rng, keep)}"
