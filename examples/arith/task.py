"""A synthetic verifiable task with multi-step reasoning: chained single-digit additions and
subtractions, solved one step per line.

    prompt:   "7+5-3+9=?\n"
    solution: "7+5=12\n12-3=9\n9+9=18\n#### 18"

Each step line carries the running total into the next one, so a wrong early step dooms the final
answer even when every later step is computed correctly from it: the setting where per-step (tree)
credit assignment matters. Responses are short (about 15-40 characters), which keeps RL on a CPU
cheap with a char-level tokenizer.

Splits are disjoint by construction: an expression belongs to ``test`` when a stable hash of its
text says so, and to ``train`` otherwise, whatever seed drew it.
"""

from __future__ import annotations

import hashlib
import random
import re

SOURCE = "tcli-arith"
ALPHABET = "0123456789+-=?# \n"   # every character a prompt or a response can hold
MIN_STEPS, MAX_STEPS = 2, 4        # difficulty = number of step lines (operands - 1)
MAX_TOTAL = 40                     # running totals stay in [0, MAX_TOTAL]
TEST_SHARE = 8                     # 1 expression in 8 belongs to the test split

_TERM = re.compile(r"([+-])(\d+)")


def split_of(expr: str) -> str:
    """'test' or 'train' from a stable hash of the expression text (not of any seed)."""
    h = int.from_bytes(hashlib.blake2b(expr.encode(), digest_size=8).digest(), "little")
    return "test" if h % TEST_SHARE == 0 else "train"


def random_expression(rng: random.Random, steps: int) -> str:
    """Operands 1..9; each operator is drawn among those that keep the total in range."""
    total = rng.randint(1, 9)
    parts = [str(total)]
    for _ in range(steps):
        b = rng.randint(1, 9)
        ops = [op for op, v in (("+", total + b), ("-", total - b)) if 0 <= v <= MAX_TOTAL]
        op = rng.choice(ops)          # never empty: b <= 9 < MAX_TOTAL keeps one of them valid
        total = total + b if op == "+" else total - b
        parts.append(f"{op}{b}")
    return "".join(parts)


def prompt_text(expr: str) -> str:
    return f"{expr}=?\n"


def parse_prompt(prompt: str) -> tuple[int, list[tuple[str, int]]]:
    """(first operand, [(op, operand), ...]) of a prompt made by :func:`prompt_text`."""
    expr = prompt.strip()
    if expr.endswith("=?"):
        expr = expr[:-2]
    m = re.match(r"\d+", expr)
    if not m:
        raise ValueError(f"not an arith prompt: {prompt!r}")
    terms = [(op, int(v)) for op, v in _TERM.findall(expr[m.end():])]
    if "".join(f"{op}{v}" for op, v in terms) != expr[m.end():]:
        raise ValueError(f"not an arith prompt: {prompt!r}")
    return int(m.group()), terms


def evaluate(expr_or_prompt: str) -> int:
    total, terms = parse_prompt(expr_or_prompt)
    for op, v in terms:
        total = total + v if op == "+" else total - v
    return total


def make_prompts(n: int, seed: int, split: str = "train") -> list[dict]:
    """``n`` distinct prompt records of ``split`` (train|test), deterministic for ``seed``.
    Difficulty (the number of steps) cycles evenly through MIN_STEPS..MAX_STEPS."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', not {split!r}")
    rng = random.Random(f"{SOURCE}:{split}:{seed}")
    seen: set[str] = set()
    out: list[dict] = []
    levels = list(range(MIN_STEPS, MAX_STEPS + 1))
    misses = 0
    while len(out) < n:
        steps = levels[len(out) % len(levels)]
        expr = random_expression(rng, steps)
        if expr in seen or split_of(expr) != split:
            misses += 1
            if misses > 20000:  # the level's expressions are (nearly) all drawn already
                raise ValueError(f"cannot draw {n} distinct {split} prompts (about "
                                 f"{len(out)} exist with difficulties cycling evenly)")
            continue
        misses = 0
        seen.add(expr)
        out.append({"id": f"arith-{split}-{len(out):06d}", "prompt": prompt_text(expr),
                    "answer": str(evaluate(expr)),
                    "meta": {"source": SOURCE, "split": split, "difficulty": steps,
                             "seed": seed}})
    return out


def crosses_ten(total: int, op: str, v: int) -> bool:
    """Whether ``total op v`` needs a carry (addition) or a borrow (subtraction) in the tens."""
    if op == "+":
        return total >= 0 and total % 10 + v >= 10
    return total >= 10 and total % 10 < v


def _steps_text(first: int, terms: list[tuple[str, int]], rng: random.Random | None,
                error_rate: float = 0.0, carry_error_rate: float = 0.0) -> str:
    total = first
    lines = []
    for op, v in terms:
        result = total + v if op == "+" else total - v
        if rng is not None:
            if crosses_ten(total, op, v) and rng.random() < carry_error_rate:
                result += -10 if op == "+" else 10      # forgot the carry / the borrow
            elif rng.random() < error_rate:
                result += rng.choice((-2, -1, 1, 2))    # a slip
        lines.append(f"{total}{op}{v}={result}")
        total = result
    lines.append(f"#### {total}")
    return "\n".join(lines)


def solution(record: dict) -> str:
    """The gold step-by-step response of a prompt record (no trailing newline or EOS)."""
    first, terms = parse_prompt(record["prompt"])
    return _steps_text(first, terms, None)


def noisy_solution(record: dict, rng: random.Random, error_rate: float = 0.0,
                   carry_error_rate: float = 0.0) -> str:
    """A response in the gold format with human-like mistakes, to warm-start a model that is
    only partly right: a step that crosses a ten forgets the carry/borrow (8+5=3, 13-5=18) with
    probability ``carry_error_rate``; any other step slips by 1 or 2 with probability
    ``error_rate``. Later steps continue correctly from the wrong value, so one mistake dooms
    the answer."""
    first, terms = parse_prompt(record["prompt"])
    return _steps_text(first, terms, rng, error_rate, carry_error_rate)


def check_steps(text: str) -> bool:
    """Every ``a op b = c`` line is arithmetically right and chains from the previous result,
    and the ``####`` line repeats the last result."""
    prev = None
    lines = text.strip().split("\n")
    for line in lines[:-1]:
        m = re.fullmatch(r"(\d+)([+-])(\d+)=(\d+)", line)
        if not m:
            return False
        a, op, b, c = int(m[1]), m[2], int(m[3]), int(m[4])
        if (a + b if op == "+" else a - b) != c or (prev is not None and a != prev):
            return False
        prev = c
    m = re.fullmatch(r"#### (\d+)", lines[-1])
    return bool(m) and prev is not None and int(m[1]) == prev
