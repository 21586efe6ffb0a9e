"""train-step against a sampler that is not the trainer (docs/design.md §4.15, §4.16): truncated
importance sampling with its mismatch metrics, and responses cut at the length cap left out of
the loss. Hand-computed numbers on tensors, then the real trainer on a tiny model whose records'
log-probs are shifted by known amounts."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch

from tcli.errors import UsageError
from tcli.train.loss import mismatch_sums, tis_weights

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# two rows: Δ = log pi_train_old - log pi_sampler = 0.1, -0.5, 0 | 0.8 (one padding slot)
TRAIN_OLD = torch.tensor([[-1.0, -2.0, -0.5], [-1.2, 0.0, 0.0]])
SAMPLER = torch.tensor([[-1.1, -1.5, -0.5], [-2.0, -9.0, -9.0]])
MASK = torch.tensor([[True, True, True], [True, False, False]])


def test_tis_weights_hand_computed():
    """min(exp(Δ), C) with C = 2: 1.105171, 0.606531, 1 | min(2.225541, 2) = 2; 0 on padding."""
    w = tis_weights(TRAIN_OLD, SAMPLER, MASK, 2.0)
    want = torch.tensor([[1.105171, 0.606531, 1.0], [2.0, 0.0, 0.0]])
    assert torch.allclose(w, want, atol=1e-6)


def test_mismatch_sums_hand_computed():
    """sum |Δ| = 0.1 + 0.5 + 0 + 0.8 = 1.4 over 4 tokens, largest Δ 0.8, one ratio above 2."""
    abs_sum, top, capped, n = mismatch_sums(TRAIN_OLD, SAMPLER, MASK, 2.0)
    assert (abs_sum, top, capped, n) == pytest.approx((1.4, 0.8, 1.0, 4.0), abs=1e-6)
    assert mismatch_sums(TRAIN_OLD, SAMPLER, MASK)[2] == 0.0  # no cap: nothing capped
    assert mismatch_sums(TRAIN_OLD, SAMPLER, MASK & False) == (0.0, float("-inf"), 0.0, 0.0)


def test_tis_cap_setting():
    from tcli.config.stages import TrainOptions

    assert TrainOptions().tis_cap == 0.0 and not TrainOptions().mask_truncated
    with pytest.raises(UsageError, match=r"--tis-cap \(train.tis_cap\) must be >= 1"):
        TrainOptions(tis_cap=0.5)


# ----------------------------------------------------------------------------- the trainer

@pytest.fixture(scope="module")
def policy(tiny):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny).eval()


PAIRS = [([5, 6, 7], [20, 21, 22, 23]), ([8, 9], [30, 31, 32]), ([5, 6, 7], [20, 24, 25, 26, 27])]
SHIFT = (0.3, -0.2)  # Δ of even and odd response positions: the sampler is off by a known amount


def _records(policy, shift=(0.0, 0.0), adv=lambda i, t: 1.0 + 0.1 * t - 0.5 * i):
    """On-policy records of PAIRS whose logprobs are lowered by shift[t % 2] (so that
    log pi_train_old - log pi_sampler = shift[t % 2])."""
    from tcli.models.logprobs import sequence_logprobs

    lps = sequence_logprobs(policy, [p for p, _ in PAIRS], [r for _, r in PAIRS])
    return [{"prompt_token_ids": p, "token_ids": r, "finish_reason": "stop",
             "logprobs": [float(x) - shift[t % 2] for t, x in enumerate(lp.tolist())],
             "advantages": [adv(i, t) for t in range(len(r))]}
            for i, ((p, r), lp) in enumerate(zip(PAIRS, lps))]


def _step(tiny, recs, **opts):
    from tcli.config.stages import TrainOptions
    from tcli.train.trainer import Trainer

    return Trainer(tiny, TrainOptions(**opts), seed=0).step(recs)


def _positions():
    return [t for _, r in PAIRS for t in range(len(r))]


def test_tis_reports_the_known_shift_and_weights_each_token_by_the_capped_ratio(tiny, policy):
    """Δ = 0.3 on even positions, -0.2 on odd ones: mean |Δlogp| = (0.3 n_even + 0.2 n_odd) / n,
    largest ratio exp(0.3) = 1.349859; with C = 1.2 the even tokens are capped (weight 1.2), the odd
    ones keep exp(-0.2) = 0.818731. The first forward is pi_train_old itself (ratio 1, nothing
    clipped), so the policy loss is -sum_t w_t A_t / n (token-mean)."""
    recs = _records(policy, SHIFT)
    m = _step(tiny, recs, tis_cap=1.2)
    pos = _positions()
    even = sum(t % 2 == 0 for t in pos)
    assert m["mismatch_abs_logp"] == pytest.approx((0.3 * even + 0.2 * (len(pos) - even))
                                                   / len(pos), abs=1e-5)
    assert m["mismatch_ratio_max"] == pytest.approx(math.exp(0.3), rel=1e-5)
    assert m["tis_capped_frac"] == pytest.approx(even / len(pos))
    w = {0: 1.2, 1: math.exp(-0.2)}
    want = -sum(w[t % 2] * a for r in recs for t, a in enumerate(r["advantages"])) / len(pos)
    assert m["pg_loss"] == pytest.approx(want, rel=1e-5)
    assert m["clip_frac"] == 0.0 and m["approx_kl"] < 1e-9  # the ratio is against pi_train_old


def test_without_tis_the_mismatch_is_still_reported_and_the_ratio_uses_the_sampler(tiny, policy):
    """The same records without TIS: the first forward measures the same shift; the ratio is
    pi_theta / pi_sampler = exp(Δ): 1.349859 clipped to 1.28 where A > 0, 0.818731 unclipped."""
    recs = _records(policy, SHIFT)
    m = _step(tiny, recs)
    pos = _positions()
    even = sum(t % 2 == 0 for t in pos)
    assert m["mismatch_abs_logp"] == pytest.approx((0.3 * even + 0.2 * (len(pos) - even))
                                                   / len(pos), abs=1e-5)
    assert "tis_capped_frac" not in m

    def loss(t, a):
        rho = math.exp(SHIFT[t % 2])
        return -min(rho * a, min(max(rho, 0.8), 1.28) * a)
    want = sum(loss(t, a) for r in recs for t, a in enumerate(r["advantages"])) / len(pos)
    assert m["pg_loss"] == pytest.approx(want, rel=1e-5)


def test_approx_kl_is_kl_of_the_sampler_from_the_policy(tiny, policy):
    """approx_kl estimates KL(pi_old || pi_theta) from pi_old's samples: k3 with
    r = pi_theta / pi_old, i.e. e^Δ - Δ - 1 with Δ = log pi_theta - log pi_old = SHIFT[t % 2]
    at the first forward (0.049859 for 0.3, 0.018731 for -0.2), averaged over the tokens."""
    m = _step(tiny, _records(policy, SHIFT))
    pos = _positions()
    k3 = {t: math.exp(SHIFT[t]) - SHIFT[t] - 1 for t in (0, 1)}
    want = sum(k3[t % 2] for t in pos) / len(pos)
    # the records' log-probs are float32 near -5 (half an ulp: 2.4e-7), so Δ is off by < 1e-6;
    # |d k3 / dΔ| = |e^Δ - 1| <= 0.35, so the mean is off by < 4e-7
    assert m["approx_kl"] == pytest.approx(want, abs=1e-6)


def test_tis_on_an_exact_sampler_changes_nothing(tiny, policy):
    """Records of the trainer's own numerics: weights 1, the same update as without TIS."""
    recs = _records(policy)
    a, b = _step(tiny, recs, lr=1e-3), _step(tiny, recs, lr=1e-3, tis_cap=2.0)
    assert b["mismatch_abs_logp"] < 1e-5 and b["tis_capped_frac"] == 0.0
    assert b["pg_loss"] == pytest.approx(a["pg_loss"], rel=1e-5)
    assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)


def test_mask_truncated_drops_responses_from_the_loss_and_its_normalisation(tiny, policy):
    """Response 0 (4 tokens, A = +1) hit the cap; response 1 (3 tokens, A = -0.5) and response 2
    (5 tokens, A = -0.5) did not. On-policy (ratio 1), token-mean: with the mask the loss is
    -(-0.5 * 8) / 8 = 0.5 over 8 tokens; without it (-4 + 4) / 12 = 0."""
    recs = _records(policy, adv=lambda i, t: 1.0 if i == 0 else -0.5)
    recs[0]["finish_reason"] = "length"
    masked = _step(tiny, recs, mask_truncated=True)
    assert masked["pg_loss"] == pytest.approx(0.5, rel=1e-5)
    assert (masked["num_sequences"], masked["num_tokens"]) == (2, 8)
    assert masked["truncated_share"] == pytest.approx(1 / 3)
    kept = _step(tiny, recs)
    assert kept["pg_loss"] == pytest.approx(0.0, abs=1e-6)
    assert (kept["num_sequences"], kept["num_tokens"]) == (3, 12)
    # seq-mean-token-mean counts responses: the dropped one is not in the denominator either
    seq = _step(tiny, recs, mask_truncated=True, loss_agg="seq-mean-token-mean")
    assert seq["pg_loss"] == pytest.approx(0.5, rel=1e-5)


def test_everything_truncated_is_an_empty_step(tiny, policy):
    recs = _records(policy)
    for r in recs:
        r["finish_reason"] = "length"
    m = _step(tiny, recs, mask_truncated=True, tis_cap=2.0)
    assert m["optimizer_steps"] == 0 and m["num_tokens"] == 0 and m["truncated_share"] == 1.0
    assert np.isfinite(m["mismatch_abs_logp"])


def test_tis_under_torchrun_fsdp_equals_one_process(tiny, policy, tmp_path):
    """pi_train_old is computed in each rank's share of micro-batches (FSDP: collective forwards)
    and gathered; the mismatch is reduced over the ranks (its maximum too)."""
    import subprocess
    import sys

    import orjson

    from conftest import run_tcli

    recs = _records(policy, SHIFT)
    recs[1]["finish_reason"] = "length"
    path = tmp_path / "roll.jsonl"
    path.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in recs))
    args = ["train-step", str(path), "-m", tiny, "--lr", "1e-3", "--micro-batch-tokens", "16",
            "--mini-batches", "2", "--tis-cap", "1.2", "--mask-truncated", "--seed", "1"]
    one = run_tcli([*args, "-o", str(tmp_path / "c1")])
    assert one.returncode == 0, one.stderr.decode()
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                        "--nproc-per-node", "2", "-m", "tcli", *args, "-o", str(tmp_path / "c2"),
                        "--parallel", "fsdp"], capture_output=True, timeout=300, cwd=REPO,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr.decode()[-3000:]
    m1, m2 = orjson.loads(one.stdout), orjson.loads(r.stdout)
    assert m2["world_size"] == 2 and m2["num_sequences"] == 2
    for k in ("pg_loss", "clip_frac", "grad_norm", "mismatch_abs_logp", "mismatch_ratio_max",
              "tis_capped_frac", "truncated_share"):
        assert m2[k] == pytest.approx(m1[k], rel=1e-4, abs=1e-6), k
