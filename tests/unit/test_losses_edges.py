"""Ratio levels, KL estimators and aggregations (docs/design.md §4.9, §4.10, §4.13) at their
edges: rows with no real token, an empty batch, the default estimator."""

from __future__ import annotations

import math

import pytest
import torch

from tcli.algos.losses import aggregate, kl_penalty, sequence_log_ratio


def test_sequence_log_ratio_of_a_row_without_tokens_is_zero_and_has_finite_gradient():
    logp = torch.tensor([[-1.0, -2.0], [-3.0, -4.0]], requires_grad=True)
    old = torch.tensor([[-1.5, -1.0], [-1.0, -1.0]])
    mask = torch.tensor([[True, True], [False, False]])
    out = sequence_log_ratio(logp, old, mask)
    # row 0: mean(0.5, -1.0) = -0.25 on both tokens; row 1 has no token: 0, never NaN
    assert out.tolist() == [[-0.25, -0.25], [0.0, 0.0]]
    out.sum().backward()
    assert torch.isfinite(logp.grad).all()
    assert logp.grad.tolist() == [[1.0, 1.0], [0.0, 0.0]]  # d(2 · mean)/d logp_t = 2 / 2


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"])
def test_aggregate_of_an_empty_batch_is_zero(mode):
    v = torch.tensor([[1.0, 2.0]])
    assert aggregate(v, torch.zeros(1, 2, dtype=torch.bool), mode).item() == 0.0


def test_kl_penalty_defaults_to_k3():
    logp = torch.tensor([math.log(0.5)])
    ref = torch.tensor([math.log(0.25)])
    # r = pi_ref / pi = 0.5: k3 = r − 1 − log r; k1 would be log 2
    assert kl_penalty(logp, ref).item() == pytest.approx(0.5 - 1 + math.log(2), rel=1e-6)


def test_aggregate_defaults_to_token_mean():
    v = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]])
    mask = torch.tensor([[True, True, True], [True, False, False]])
    assert aggregate(v, mask).item() == 10 / 4  # seq-mean-token-mean would give (2 + 4) / 2
