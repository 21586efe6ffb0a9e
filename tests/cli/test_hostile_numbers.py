"""Hostile numbers: PPO's critic values and returns, extreme rewards through every advantage
estimator, and values that do not fit the float32 training computes in.

Each case runs the real command (``run_tcli``) and checks what a user sees (DESIGN §2.5, §3.5,
§8.1): exit 65 with one line naming the file, the record and the field, or exit 0 with finite
advantages and nothing on stderr (no NumPy warnings), and no output or checkpoint after a failure.
"""

from __future__ import annotations

import json
import math

import orjson
import pytest

from conftest import failed, run_tcli

ESTIMATORS = ("grpo", "dr_grpo", "rloo", "tempo", "treerpo", "gae")


def jsonl(recs) -> bytes:
    """JSON lines by the standard library, which writes integers of any size."""
    return "".join(json.dumps(r) + "\n" for r in recs).encode()


def write(path, recs) -> str:
    """JSONL, or Arrow (tcli's writer) for a path ending in .arrow: only Arrow carries NaN."""
    from tcli.io import RecordWriter

    if str(path).endswith(".arrow"):
        with RecordWriter(str(path)) as w:
            w.write_all(recs)
    else:
        path.write_bytes(jsonl(recs))
    return str(path)


@pytest.fixture(scope="module")
def critic(tiny, tmp_path_factory):
    from tcli.models.critic import init_critic

    return init_critic(tiny, str(tmp_path_factory.mktemp("critic") / "c"))


# ----------------------------------------------------------------------------- PPO

def ppo_records() -> list[dict]:
    """Two groups of two responses with critic values (T + 1) and returns (T)."""
    return [{"schema": "tcli.rollout/1", "prompt_id": f"p{g}", "sample_id": s,
             "prompt_token_ids": [21, 15, 21], "token_ids": [30 + s, 40, 1], "reward": float(s),
             "logprobs": [-1.0] * 3, "critic_values": [0.1, 0.2, 0.3, 0.4],
             "returns": [0.5, 0.5, 0.5]} for g in range(2) for s in range(2)]


BOTH = ("gae", "train-critic")
PPO_CASES = {  # name: (field, value (None: drop it), commands, words, file suffix)
    "values missing": ("critic_values", None, BOTH, "missing", ".jsonl"),
    "values one short": ("critic_values", [0.1, 0.2, 0.3], BOTH, "expected 4", ".jsonl"),
    "values one long": ("critic_values", [0.1] * 5, BOTH, "expected 4", ".jsonl"),
    "a null value": ("critic_values", [0.1, None, 0.3, 0.4], BOTH, "nulls", ".jsonl"),
    "string values": ("critic_values", ["0.1", "0.2", "0.3", "0.4"], BOTH, "strings", ".jsonl"),
    "boolean values": ("critic_values", [True, False, True, False], BOTH, "booleans", ".jsonl"),
    "a NaN value": ("critic_values", [0.1, math.nan, 0.3, 0.4], BOTH, "NaN", ".arrow"),
    "an inf value": ("critic_values", [0.1, 0.2, -math.inf, 0.4], BOTH, "infinity", ".arrow"),
    "values near 1e308 (gae)": ("critic_values", [0.1, 1e308, -1e308, 0.4], ("gae",),
                                "overflow", ".jsonl"),
    "values near 1e308 (critic)": ("critic_values", [0.1, 1e308, -1e308, 0.4],
                                   ("train-critic",), "float32", ".jsonl"),
    "returns missing": ("returns", None, ("train-critic",), "missing", ".jsonl"),
    "returns one short": ("returns", [0.5, 0.5], ("train-critic",), "expected 3", ".jsonl"),
    "a NaN return": ("returns", [0.5, math.nan, 0.5], ("train-critic",), "NaN", ".arrow"),
    "an inf return": ("returns", [math.inf, 0.5, 0.5], ("train-critic",), "infinity", ".arrow"),
    "a return of 1e39": ("returns", [1e39, 0.5, 0.5], ("train-critic",), "float32", ".jsonl"),
}


@pytest.mark.parametrize("case, cmd", [(c, cmd) for c, v in PPO_CASES.items() for cmd in v[2]])
def test_bad_critic_values_and_returns(case, cmd, critic, tmp_path):
    """Before: string and boolean values were parsed by NumPy as numbers, values near 1e308 were
    blamed on the reward with NumPy warnings on stderr (gae) or became inf in float32 and a
    skipped step that still wrote a checkpoint (train-critic)."""
    field, value, _, words, suffix = PPO_CASES[case]
    recs = ppo_records()
    if value is None:
        del recs[1][field]
    else:
        recs[1][field] = value
    src = write(tmp_path / f"in{suffix}", recs)
    out = tmp_path / "out"
    argv = (["advantages", "-e", "gae", src, "-o", out] if cmd == "gae" else
            ["train-critic", src, "--critic", critic, "-o", out])
    failed(run_tcli(argv), 65, f"{src}:2: field '{field}'", words)
    assert not out.exists()


def test_good_critic_values_pass(critic, tmp_path):
    src = write(tmp_path / "in.jsonl", ppo_records())
    r = run_tcli(["advantages", "-e", "ppo", src, "-o", tmp_path / "adv.jsonl"])
    assert r.returncode == 0 and r.stderr == b"", r.stderr.decode()
    r = run_tcli(["train-critic", tmp_path / "adv.jsonl", "--critic", critic, "-o", tmp_path / "c"])
    assert r.returncode == 0, r.stderr.decode()


# ----------------------------------------------------------------------------- rewards

@pytest.fixture(scope="module")
def tree_records(tiny, tmp_path_factory):
    """One prompt sampled as a tree by the tiny model (so treerpo applies too), with zero critic
    values (so gae applies too); each case puts its own rewards in."""
    d = tmp_path_factory.mktemp("tree")
    src = d / "p.jsonl"
    src.write_bytes(jsonl([{"id": "a", "prompt": "1+1="}]))
    r = run_tcli(["sample-tree", src, "-m", tiny, "--mode", "tree", "--width", "2", "--depth",
                  "2", "--segment-tokens", "2", "--max-new-tokens", "6", "-o", d / "t.jsonl"])
    assert r.returncode == 0, r.stderr.decode()
    recs = [orjson.loads(x) for x in (d / "t.jsonl").read_bytes().splitlines()]
    assert len(recs) >= 3 and any(len(x["node_path"]) > 1 for x in recs)
    for rec in recs:
        rec["critic_values"] = [0.0] * (len(rec["token_ids"]) + 1)
    return recs


def with_rewards(recs: list[dict], literals: list[str]) -> bytes:
    """The records with the JSON literals as rewards (text, so integers stay exact), cycling."""
    lines = []
    for i, rec in enumerate(recs):
        raw = orjson.dumps({**rec, "reward": "@R@"})
        lines.append(raw.replace(b'"@R@"', literals[i % len(literals)].encode()) + b"\n")
    return b"".join(lines)


def advantages(path, estimator: str, *extra) -> tuple:
    """(result, advantages of every record or None)."""
    out = path.parent / f"adv-{estimator}.jsonl"
    r = run_tcli(["advantages", "-e", estimator, path, "-o", out, *extra])
    if r.returncode:
        assert not out.exists()
        return r, None
    return r, [orjson.loads(x)["advantages"] for x in out.read_bytes().splitlines()]


REWARDS = {  # name: (reward literals, estimators that must give exactly 0 everywhere)
    "±1e308": (["1e308", "-1e308", "1e308"], ()),
    "subnormal 1e-320": (["1e-320", "0", "1e-320"], ()),
    "-0.0": (["-0.0", "-0.0", "0.0"], ESTIMATORS[:-1]),
    "integers beyond 2^53": (["9007199254740993", "9007199254740992", "1"], ()),
    "integers beyond 2^64": (["18446744073709551617", "18446744073709551616", "0"], ()),
    "all equal": (["0.5"], ESTIMATORS[:-1]),
}
OVERFLOW = {("±1e308", "rloo")}  # r_i - mean(others) = -2e308: exit 65 naming the reward


@pytest.mark.parametrize("case", list(REWARDS) + ["a group of one"])
def test_extreme_rewards_give_finite_advantages(case, tree_records, tmp_path):
    """build-tree, then every estimator: finite advantages (never NaN from a zero std), nothing on
    stderr; a group without spread gets exactly 0. Before: dr_grpo, rloo and gae printed NumPy
    overflow warnings for ±1e308."""
    literals, zero = REWARDS.get(case, (["1.0"], ESTIMATORS[:-1]))
    recs = tree_records[:1] if case == "a group of one" else tree_records
    src = tmp_path / "r.jsonl"
    src.write_bytes(with_rewards(recs, literals))
    r = run_tcli(["build-tree", src, "-o", tmp_path / "bt.jsonl"])
    assert r.returncode == 0 and r.stderr == b"", r.stderr.decode()
    for est in ESTIMATORS:
        if case == "a group of one" and est == "treerpo":
            continue  # a single path is not a tree
        r, adv = advantages(tmp_path / "bt.jsonl", est)
        if (case, est) in OVERFLOW:
            failed(r, 65, "bt.jsonl:", "field 'reward'", "overflow")
            continue
        assert r.returncode == 0 and r.stderr == b"", (est, r.stderr.decode())
        flat = [a for row in adv for a in row]
        assert all(isinstance(a, float) and math.isfinite(a) for a in flat), (est, adv)
        if est in zero:
            assert all(a == 0.0 for a in flat), (est, adv)


@pytest.mark.parametrize("estimator", ["dr_grpo", "gae", "grpo"])
def test_whitening_huge_advantages_stays_finite(estimator, tree_records, tmp_path):
    """--whiten over advantages near 1e308: before, their sum overflowed and every advantage was
    written as null with exit 0."""
    src = tmp_path / "r.jsonl"
    src.write_bytes(with_rewards(tree_records, ["1e308", "-1e308", "1e308"]))
    r, adv = advantages(src, estimator, "--whiten")
    assert r.returncode == 0 and r.stderr == b"", r.stderr.decode()
    flat = [a for row in adv for a in row]
    assert all(isinstance(a, float) and math.isfinite(a) for a in flat), adv
    assert abs(sum(flat) / len(flat)) < 1e-6 and max(map(abs, flat)) > 0.1


@pytest.mark.parametrize("literal, words", [
    ("true", "got bool"), ('"1.0"', "got str"), ("null", "got NoneType"), ("[1.0]", "got list"),
    ("1" + "0" * 400, "beyond the float range")])
@pytest.mark.parametrize("cmd", ["build-tree", "grpo", "gae"])
def test_rewards_that_are_not_numbers(literal, words, cmd, tree_records, tmp_path):
    """Before: an integer beyond 1.8e308 was an OverflowError (exit 1, no file or field)."""
    src = tmp_path / "r.jsonl"
    src.write_bytes(with_rewards(tree_records, ["1.0", literal]))
    out = tmp_path / "out.jsonl"
    argv = ["build-tree", src] if cmd == "build-tree" else ["advantages", "-e", cmd, src]
    failed(run_tcli(argv + ["-o", out]), 65, f"{src}:2: field 'reward'", words)
    assert not out.exists()


# ----------------------------------------------------------------------------- float32 training

@pytest.mark.parametrize("field, value, words", [
    ("advantages", [1e308, 1.0, -1.0], "float32"), ("advantages", [3.5e38, 0.0, 0.0], "float32"),
    ("logprobs", [-1e300, -1.0, -1.0], "float32"), ("advantages", ["0.5", 0.5, 0.5], "strings"),
    ("logprobs", [True, -1.0, -1.0], "booleans"),
    ("advantages", [10 ** 400, 0, 0], "integer too large for a float")])
def test_train_step_refuses_bad_numbers(field, value, words, tiny, tmp_path):
    """Before: 1e308 became inf in float32, the step was skipped with a NumPy warning, and a
    checkpoint was written with exit 0; NumPy read "0.5" and true as numbers; an integer beyond
    1.8e308 was an OverflowError without file or field."""
    recs = [{"prompt_id": "p", "sample_id": s, "prompt_token_ids": [21, 15],
             "token_ids": [30, 31, 1], "logprobs": [-1.0] * 3, "advantages": [0.5] * 3,
             "reward": 1.0} for s in range(2)]
    recs[1][field] = value
    src = write(tmp_path / "in.jsonl", recs)
    out = tmp_path / "ckpt"
    failed(run_tcli(["train-step", src, "-m", tiny, "-o", out]), 65,
           f"{src}:2: field '{field}'", words)
    assert not out.exists()
