"""The hf engine's counter-based streams (tcli/engines/rng.py): a position per row gives each row
exactly the number it gets alone, so rows at different positions (tool turns, entropy trees drawn
ahead) sample as they would one by one."""

from __future__ import annotations

import numpy as np

from tcli.engines.rng import (_splitmix_int, _splitmix_np, child_key, prompt_key, uniforms,
                              uniforms_at)


def test_vectorised_finaliser_is_the_integer_one():
    xs = [0, 1, 7, 2**31, 2**63 - 1, 2**64 - 1, 123456789012345]
    got = _splitmix_np(np.array(xs, dtype=np.uint64))
    assert [int(v) for v in got] == [_splitmix_int(x) for x in xs]


def test_a_position_per_row_equals_each_row_alone():
    rng = np.random.default_rng(0)
    keys = np.array([child_key(int(k), 3) for k in rng.integers(0, 2**62, 64)], dtype=np.uint64)
    steps = np.concatenate([np.arange(32), rng.integers(0, 2**40, 32)])
    got = uniforms_at(keys, steps)
    want = [uniforms(keys[i:i + 1], int(steps[i]))[0] for i in range(len(keys))]
    assert got.tolist() == want
    assert uniforms_at(keys, [5] * len(keys)).tolist() == uniforms(keys, 5).tolist()
    assert ((got >= 0) & (got < 1)).all()


def test_any_integer_seed_has_its_own_stream():
    """--seed takes any integer: negative and past-64-bit seeds key their own streams, and the
    same seed and prompt always give the same key."""
    ids = [5, 6, 7]
    keys = [prompt_key(s, ids) for s in (-1, 1, -(2**70), 2**70, 0)]
    assert len(set(keys)) == len(keys) and all(0 <= k < 2**64 for k in keys)
    assert prompt_key(-1, ids) == prompt_key(-1, list(ids))
