"""Countdown chains: a synthetic verifiable task whose outcome is decided by one early choice.

    prompt:   "3 7 5 -> 26\n"
    solution: "7*3=21\n21+5=26\n#### 26"

Reach the target from the given numbers (1-9) with + - *, each number used exactly once, one
operation per line. The first line combines two of the numbers; every later line combines the
previous result (always on the left) with one unused number; no result is negative. The ``####``
line repeats the last result, which must be the target.

Why credit assignment should matter here. The generator keeps only targets that a minority of
the first moves can reach (at most a third of them), so the response is decided by its first
three characters ("7*3": which pair, which operation). With three numbers everything after them
is mechanical: multiply out, then pick the one operation that lands on the target (or, after a
bad first move, the closest one: the answer is then arithmetically right and still wrong). With
four numbers the second line is a second, smaller choice. A wrong first move dooms the response
however well the ~20 following tokens are computed, and a right one succeeds almost surely. So
the reward's whole variance sits on ~3 decisive tokens out of ~22; a sequence-level advantage
spreads it evenly over all of them, while a tree that branches after the first line (or where
the policy hesitates) compares siblings that differ exactly in the decision. If tree credit
assignment (TEMPO, TreeRPO) helps anywhere, it should help here.

The warm start (``warmstart.py``) learns the format and the arithmetic from solutions whose first
move is a good one only part of the time, so RL has to learn the choice, not the arithmetic.

Splits are disjoint by construction: an instance (its sorted numbers and its target, so
reorderings of the same numbers are the same instance) belongs to ``test`` when a stable hash
says so, whatever seed drew it.
"""

from __future__ import annotations

import hashlib
import itertools
import random
import re

SOURCE = "tcli-countdown"
ALPHABET = "0123456789+-*=#> \n"   # every character a prompt or a response can hold
SIZES = (3, 4)                     # numbers per instance (difficulty); cycled evenly
MIN_TARGET, MAX_TARGET = 10, 99    # two-digit targets
MAX_GOOD_SHARE = 1 / 3             # at most this share of first moves can reach the target
TEST_SHARE = 5                     # 1 instance in 5 belongs to the test split
OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}

_PROMPT = re.compile(r"((?:[1-9] ){2,5})-> (\d{1,3})\n?")

Move = tuple[int, str, int]        # (left, op, right): one written line "left op right"


def split_of(numbers: list[int], target: int) -> str:
    """'test' or 'train' from a stable hash of the instance (sorted numbers + target)."""
    key = " ".join(map(str, sorted(numbers))) + f" -> {target}"
    h = int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little")
    return "test" if h % TEST_SHARE == 0 else "train"


def prompt_text(numbers: list[int], target: int) -> str:
    return " ".join(map(str, numbers)) + f" -> {target}\n"


def parse_prompt(prompt: str) -> tuple[list[int], int]:
    """(numbers, target) of a prompt made by :func:`prompt_text` (ValueError otherwise)."""
    m = _PROMPT.fullmatch(prompt.strip(" ") if prompt else "")
    if not m:
        raise ValueError(f"not a countdown prompt: {str(prompt)[:60]!r}")
    return [int(x) for x in m.group(1).split()], int(m.group(2))


def apply(a: int, op: str, b: int) -> int | None:
    """``a op b``, or None when the rules forbid it (a negative result)."""
    r = OPS[op](a, b)
    return r if r >= 0 else None


def first_moves(numbers: list[int]) -> list[tuple[Move, list[int]]]:
    """Every distinct first line (larger operand first) and the numbers it leaves unused."""
    out, seen = [], set()
    for i, j in itertools.combinations(range(len(numbers)), 2):
        a, b = max(numbers[i], numbers[j]), min(numbers[i], numbers[j])
        rest = [x for k, x in enumerate(numbers) if k not in (i, j)]
        for op in OPS:
            if (a, op, b) not in seen:
                seen.add((a, op, b))
                out.append(((a, op, b), rest))
    return out


def tails(value: int, rest: list[int]):
    """Every way to finish a chain from ``value`` with the numbers ``rest``: (lines, result)."""
    if not rest:
        yield [], value
        return
    for k, c in enumerate(rest):
        if c in rest[:k]:
            continue  # the same number twice: same tails
        for op in OPS:
            r = apply(value, op, c)
            if r is not None:
                for lines, end in tails(r, rest[:k] + rest[k + 1:]):
                    yield [(value, op, c), *lines], end


def best_tail(value: int, rest: list[int], target: int) -> list[Move]:
    """The mechanical rest of a solution: the first tail (in a fixed order) that reaches the
    target, else the one whose result is closest to it."""
    best, gap = [], None
    for lines, end in tails(value, rest):
        if end == target:
            return lines
        if gap is None or abs(end - target) < gap:
            best, gap = lines, abs(end - target)
    return best


def good_moves(numbers: list[int], target: int) -> list[Move]:
    """The first moves from which some tail reaches ``target``."""
    return [m for m, rest in first_moves(numbers)
            if any(end == target for _, end in tails(apply(*m), rest))]


def reachable_targets(numbers: list[int]) -> dict[int, int]:
    """target -> how many first moves reach it, for two-digit targets."""
    count: dict[int, int] = {}
    for m, rest in first_moves(numbers):
        ends = {end for _, end in tails(apply(*m), rest)}
        for t in ends:
            if MIN_TARGET <= t <= MAX_TARGET:
                count[t] = count.get(t, 0) + 1
    return count


def random_instance(rng: random.Random, size: int) -> tuple[list[int], int] | None:
    """Numbers 1..9 and a target that 1 to MAX_GOOD_SHARE of the first moves reach (None when
    these numbers have no such target: draw again)."""
    numbers = [rng.randint(1, 9) for _ in range(size)]
    limit = max(1, int(len(first_moves(numbers)) * MAX_GOOD_SHARE))
    ok = sorted(t for t, c in reachable_targets(numbers).items() if c <= limit)
    return (numbers, rng.choice(ok)) if ok else None


def make_prompts(n: int, seed: int, split: str = "train", sizes: tuple[int, ...] = SIZES
                 ) -> list[dict]:
    """``n`` distinct prompt records of ``split`` (train|test), deterministic for ``seed``; the
    instance size cycles through ``sizes``. The first ``n`` of a longer draw are these ``n``."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', not {split!r}")
    rng = random.Random(f"{SOURCE}:{split}:{seed}")
    seen: set[tuple] = set()
    out: list[dict] = []
    misses = 0
    while len(out) < n:
        size = sizes[len(out) % len(sizes)]
        inst = random_instance(rng, size)
        key = inst and (tuple(sorted(inst[0])), inst[1])
        if inst is None or key in seen or split_of(*inst) != split:
            misses += 1
            if misses > 20000:
                raise ValueError(f"cannot draw {n} distinct {split} instances "
                                 f"(about {len(out)} exist with sizes {sizes})")
            continue
        misses = 0
        seen.add(key)
        numbers, target = inst
        out.append({"id": f"countdown-{split}-{len(out):06d}",
                    "prompt": prompt_text(numbers, target), "answer": str(target),
                    "meta": {"source": SOURCE, "split": split, "difficulty": size,
                             "good_first_moves": len(good_moves(numbers, target)),
                             "first_moves": len(first_moves(numbers)), "seed": seed}})
    return out


def write_lines(first: Move, tail: list[Move]) -> str:
    """The response text of a chain: one line per move, then ``#### result``."""
    lines, value = [], None
    for a, op, b in [first, *tail]:
        value = apply(a, op, b)
        lines.append(f"{a}{op}{b}={value}")
    return "\n".join(lines + [f"#### {value}"])


def solution(record: dict) -> str:
    """A gold response of a prompt record (the first good first move, its mechanical rest)."""
    numbers, target = parse_prompt(record["prompt"])
    return attempt(numbers, target, good_moves(numbers, target)[0])


def attempt(numbers: list[int], target: int, first: Move) -> str:
    """The response that opens with ``first`` and finishes mechanically (:func:`best_tail`)."""
    rest = list(numbers)
    rest.remove(first[0])
    rest.remove(first[2])
    return write_lines(first, best_tail(apply(*first), rest, target))


def sft_response(record: dict, rng: random.Random, good_rate: float) -> str:
    """A warm-start response: with probability ``good_rate`` a good first move, otherwise any
    first move (uniformly, good or bad); the rest is always the mechanical one."""
    numbers, target = parse_prompt(record["prompt"])
    pool = (good_moves(numbers, target) if rng.random() < good_rate
            else [m for m, _ in first_moves(numbers)])
    return attempt(numbers, target, rng.choice(pool))
