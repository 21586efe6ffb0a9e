"""GAE (PPO's advantages over a learned critic) against a hand-written per-token oracle."""

from __future__ import annotations

import math

import numpy as np
import orjson
import pytest

from tcli.algos.gae import discounted_suffix_sum, gae
from conftest import jsonl as _jsonl, run_tcli


def oracle(reward, values, gamma, lam):
    """The textbook backward recursion, one token at a time (the reference, not the product)."""
    T = len(values) - 1
    adv, last = [0.0] * T, 0.0
    for t in reversed(range(T)):
        nxt = values[t + 1] if t + 1 < T else 0.0
        r = reward if t == T - 1 else 0.0
        delta = r + gamma * nxt - values[t]
        last = delta + gamma * lam * last
        adv[t] = last
    return np.array(adv), np.array(adv) + np.array(values[:T])


@pytest.mark.parametrize("gamma", [1.0, 0.9])
@pytest.mark.parametrize("lam", [0.0, 0.95, 1.0])
@pytest.mark.parametrize("T", [1, 2, 7, 40])
def test_gae_equals_oracle(gamma, lam, T):
    rng = np.random.default_rng(T)
    values = rng.normal(size=T + 1).tolist()
    a, g = gae(1.0, np.array(values), gamma, lam)
    ra, rg = oracle(1.0, values, gamma, lam)
    np.testing.assert_allclose(a, ra, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(g, rg, rtol=1e-12, atol=1e-12)


def test_hand_computed_values():
    # T = 2, V = [0.5, 0.25, (after) 9], r = 1, gamma = 1, lam = 0:
    # delta_1 = 1 + 0 - 0.25 = 0.75, delta_0 = 0 + 0.25 - 0.5 = -0.25; A = delta
    a, g = gae(1.0, np.array([0.5, 0.25, 9.0]), 1.0, 0.0)
    assert a.tolist() == [-0.25, 0.75] and g.tolist() == [0.25, 1.0]
    # lam = 1, gamma = 1: A_t = r - V_t (Monte Carlo), returns = r everywhere
    a, g = gae(1.0, np.array([0.5, 0.25, 9.0]), 1.0, 1.0)
    assert a.tolist() == [0.5, 0.75] and g.tolist() == [1.0, 1.0]
    # gamma = 0.5, lam = 1: returns_t = 0.5 ** (T - 1 - t) * r
    a, g = gae(2.0, np.zeros(4), 0.5, 1.0)
    assert g.tolist() == [0.5, 1.0, 2.0]


def test_empty_response_has_no_advantages():
    a, g = gae(1.0, np.array([0.3]), 1.0, 0.95)
    assert a.shape == g.shape == (0,)


@pytest.mark.parametrize("c", [0.0, 0.3, 0.5, 0.9, 0.999, 1.0])
def test_discounted_suffix_sum_long_sequences(c):
    """Long sequences with a small c cross the block boundary (c**k would underflow)."""
    x = np.random.default_rng(0).normal(size=3000)
    ref = np.empty_like(x)
    acc = 0.0
    for t in reversed(range(len(x))):
        acc = x[t] + c * acc
        ref[t] = acc
    np.testing.assert_allclose(discounted_suffix_sum(x, c), ref, rtol=1e-9, atol=1e-9)
    assert np.isfinite(discounted_suffix_sum(x, c)).all()


def _rec(pid, i, toks, reward, values):
    return {"schema": "tcli.rollout/1", "prompt_id": pid, "sample_id": i, "prompt_token_ids": [1, 2],
            "token_ids": toks, "logprobs": [-0.5] * len(toks), "reward": reward,
            "critic_values": values}


def test_cli_writes_advantages_and_returns_with_early_eos(tmp_path):
    recs = [_rec("p", 0, [5, 6, 7], 1.0, [0.1, 0.2, 0.3, 0.9]),
            _rec("p", 1, [5], 0.0, [0.1, 0.7]),                       # early EOS: one token
            _rec("q", 0, [9, 9], 1.0, [0.5, 0.5, 0.5])]
    r = run_tcli(["advantages", "-e", "gae", "--gamma", "0.9", "--lam", "0.5"], input=_jsonl(recs))
    assert r.returncode == 0, r.stderr.decode()
    out = [orjson.loads(x) for x in r.stdout.splitlines()]
    for rec, o in zip(recs, out):
        a, g = oracle(rec["reward"], rec["critic_values"], 0.9, 0.5)
        np.testing.assert_allclose(o["advantages"], a, rtol=1e-12)
        np.testing.assert_allclose(o["returns"], g, rtol=1e-12)
        assert o["estimator"] == "gae"


def test_cli_whiten_over_all_tokens(tmp_path):
    recs = [_rec("p", 0, [5, 6, 7], 1.0, [0.1, 0.2, 0.3, 0.9]),
            _rec("q", 0, [5], 0.0, [0.6, 0.7])]
    r = run_tcli(["advantages", "-e", "gae", "--whiten"], input=_jsonl(recs))
    assert r.returncode == 0, r.stderr.decode()
    out = [orjson.loads(x) for x in r.stdout.splitlines()]
    flat = np.concatenate([o["advantages"] for o in out])
    assert abs(flat.mean()) < 1e-9 and math.isclose(flat.std(), 1.0, rel_tol=1e-6)
    _, g = oracle(1.0, recs[0]["critic_values"], 1.0, 0.95)
    np.testing.assert_allclose(out[0]["returns"], g, rtol=1e-12)  # returns are not whitened


@pytest.mark.parametrize("values, words", [
    (None, "critic_values"),
    ([0.1, 0.2], "has 2 entries, expected 4"),
    ([0.1, "x", 0.3, 0.4], "critic_values"),
    ([0.1, float("nan"), 0.3, 0.4], "NaN"),
])
def test_cli_bad_critic_values_exit_65(tmp_path, values, words):
    rec = _rec("p", 0, [5, 6, 7], 1.0, values)
    if values is None:
        del rec["critic_values"]
    data = orjson.dumps(rec, option=orjson.OPT_SERIALIZE_NUMPY) if values is None or not any(
        isinstance(v, float) and math.isnan(v) for v in values) else \
        b'{"schema":"tcli.rollout/1","prompt_id":"p","sample_id":0,"prompt_token_ids":[1,2],' \
        b'"token_ids":[5,6,7],"logprobs":[-0.5,-0.5,-0.5],"reward":1.0,' \
        b'"critic_values":[0.1,NaN,0.3,0.4]}'
    f = tmp_path / "in.jsonl"
    f.write_bytes(data + b"\n")
    r = run_tcli(["advantages", "-e", "gae", str(f)])
    assert r.returncode == 65, r.stderr.decode()
    err = r.stderr.decode()
    assert "in.jsonl:1: field 'critic_values'" in err and words in err, err
    assert r.stdout == b""
