"""Edges of typed record access (tcli.records): every refusal is a DataError naming the field,
every accepted value comes back with the type and length the stages rely on."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tcli.errors import DataError
from tcli.records import (REWARD_DERIVED, as_float32, at_record, check_aligned,
                          drop_reward_derived, entropies, float_array, in_group, int_list,
                          loss_mask, require, reward, token_array)


def refused(fn, *args, field: str, match: str | None = None) -> DataError:
    with pytest.raises(DataError, match=match) as e:
        fn(*args)
    assert e.value.field == field
    return e.value


def test_require_names_the_missing_field_even_when_falsy_values_exist():
    assert require({"a": 0}, "a") == 0 and require({"a": None}, "a") is None
    refused(require, {"a": 1}, "b", field="b", match="missing required field")


@pytest.mark.parametrize("value, kind", [(5, "int"), (None, "NoneType"), ({"a": 1}, "dict"),
                                         ("12", "str")])
def test_token_ids_that_are_not_a_list_say_what_they_are(value, kind):
    refused(token_array, {"token_ids": value}, field="token_ids",
            match=f"must be a list of integers, got {kind}$")


def test_token_ids_edges():
    empty = token_array({"token_ids": []})
    assert empty.dtype == np.int64 and empty.shape == (0,)
    assert token_array({"token_ids": [0, 3]}).tolist() == [0, 3]   # token 0 is a token
    assert token_array({"token_ids": [np.int32(4), 2]}).tolist() == [4, 2]
    refused(token_array, {"token_ids": [1, -1]}, field="token_ids", match="non-negative, got -1")
    refused(token_array, {"token_ids": [1, True]}, field="token_ids", match="booleans")
    refused(token_array, {"token_ids": [2**63]}, field="token_ids", match="below 2\\*\\*63")
    refused(token_array, {"ids": [1.0]}, "ids", field="ids", match="floats")


def test_float_array_types_lengths_and_values():
    assert float_array({"x": [1, 0.5, np.float32(0.25)]}, "x").tolist() == [1.0, 0.5, 0.25]
    assert float_array({"x": []}, "x", 0).shape == (0,)
    a = float_array({"x": [0.1]}, "x")
    assert a.dtype == np.float64 and a[0] == 0.1   # no float32 rounding on the way
    refused(float_array, {"x": [1.0, True]}, "x", field="x", match="booleans")
    refused(float_array, {"x": ["0.5"]}, "x", field="x", match="strings")
    refused(float_array, {"x": [[1.0]]}, "x", field="x", match="nested lists")
    refused(float_array, {"x": 1.0}, "x", field="x", match="got float")
    refused(float_array, {"x": [1.0]}, "x", 0, field="x", match="has 1 entries, expected 0")
    refused(float_array, {"x": [1.0]}, "x", 2, field="x", match="has 1 entries, expected 2")
    refused(float_array, {"x": [1.0, math.inf]}, "x", field="x", match="NaN or infinity")
    refused(float_array, {"x": [math.nan, 1.0]}, "x", field="x", match="NaN or infinity")
    refused(float_array, {"x": [10**400]}, "x", field="x", match="too large for a float")


def test_float_array_of_a_numpy_array_value_is_refused():
    """A 2-D numpy array (in-process callers) is not a list: refused by type, not reshaped."""
    refused(float_array, {"x": np.zeros((2, 2))}, "x", field="x", match="got ndarray")


def test_as_float32_refuses_what_float32_cannot_hold():
    assert as_float32(np.array([3e38, -1.0]), "v").dtype == np.float32
    refused(as_float32, np.array([1.0, 1e39]), "v", field="v", match="float32 range")


def test_entropies_optional_exact_length_non_negative():
    assert entropies({}, 3) is None and entropies({"entropies": None}, 3) is None
    assert entropies({"entropies": []}, 0).shape == (0,)
    refused(entropies, {"entropies": []}, 2, field="entropies", match="has 0 entries")
    assert entropies({"entropies": [0.0, 1.5]}, 2).tolist() == [0.0, 1.5]  # 0 is an entropy
    refused(entropies, {"entropies": [0.5, -0.25]}, 2, field="entropies", match=">= 0, got -0.25")


def test_loss_mask_optional_exact_length_zero_or_one():
    assert loss_mask({}, 2) is None
    m = loss_mask({"loss_mask": [1, 0, np.int64(1)]}, 3)
    assert m.dtype == bool and m.tolist() == [True, False, True]
    assert loss_mask({"loss_mask": []}, 0).shape == (0,)
    refused(loss_mask, {"loss_mask": []}, 2, field="loss_mask", match="has 0 entries, expected 2")
    refused(loss_mask, {"loss_mask": [1]}, 2, field="loss_mask", match="has 1 entries, expected 2")
    refused(loss_mask, {"loss_mask": [1, 0, 1]}, 2, field="loss_mask", match="has 3 entries")
    refused(loss_mask, {"loss_mask": [1, -1]}, 2, field="loss_mask", match="got -1")
    refused(loss_mask, {"loss_mask": [2, 1]}, 2, field="loss_mask", match="got 2")
    refused(loss_mask, {"loss_mask": [1, True]}, 2, field="loss_mask", match="booleans")
    refused(loss_mask, {"loss_mask": [1.0, 0]}, 2, field="loss_mask", match="floats")
    refused(loss_mask, {"loss_mask": "10"}, 2, field="loss_mask", match="got str")


def test_check_aligned_compares_lengths_both_ways():
    check_aligned({}, 3)
    check_aligned({"logprobs": [0.0, 0.0]}, 2)
    refused(check_aligned, {"logprobs": []}, 2, field="logprobs", match="has 0 entries")
    refused(check_aligned, {"logprobs": [0.0]}, 2, field="logprobs", match="has 1 entries")
    refused(check_aligned, {"values": [0.0] * 3}, 2, "values", field="values", match="has 3")
    refused(check_aligned, {"logprobs": 0.5}, 1, field="logprobs", match="got float")


def test_drop_reward_derived_removes_every_derived_field_and_says_which():
    rec = {f: 1 for f in REWARD_DERIVED} | {"branch": [0], "critic_values": [0.0], "reward": 1}
    assert drop_reward_derived(rec) == list(REWARD_DERIVED)
    assert rec == {"branch": [0], "critic_values": [0.0], "reward": 1}
    assert set(REWARD_DERIVED) == {"values", "advantages", "estimator", "overlong_penalty",
                                   "returns"}
    assert drop_reward_derived({"advantages": [1.0], "x": 1}) == ["advantages"]


def test_reward_is_a_finite_number_not_a_boolean():
    assert reward({"reward": 1}) == 1.0 and type(reward({"reward": 1})) is float
    refused(reward, {"reward": True}, field="reward", match="got bool")
    refused(reward, {"reward": "1"}, field="reward", match="got str")
    refused(reward, {"reward": math.inf}, field="reward", match="finite")
    refused(reward, {"reward": math.nan}, field="reward", match="finite")
    refused(reward, {"reward": 10**400}, field="reward", match="bits is beyond")


def test_int_list_refuses_booleans_and_floats():
    assert int_list({"b": [0, 2]}, "b") == [0, 2]
    refused(int_list, {"b": [0, True]}, "b", field="b")
    refused(int_list, {"b": [0, 1.0]}, "b", field="b")


def test_errors_are_tagged_with_the_innermost_record_index():
    def bad(rec):
        raise DataError("no", field="x")

    with pytest.raises(DataError) as e:
        in_group(bad, [{"a": 1}])
    assert e.value.index == 0
    with pytest.raises(DataError) as e:
        in_group(lambda r: r["ok"] or bad(r), [{"ok": 1}, {"ok": 1}, {"ok": 0}])
    assert e.value.index == 2
    with pytest.raises(DataError) as e:
        with at_record(7):
            with at_record(3):
                bad({})
    assert e.value.index == 3   # the record that was bad, not the group around it
