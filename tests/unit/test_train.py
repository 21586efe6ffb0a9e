"""train-step: loss maths on hand-computed numbers, learning direction on a real tiny model,
checkpoint round-trip and safety, torchrun 2-process == 1-process, and the CLI through pipes."""

from __future__ import annotations

import math
import os
import pickle
import shutil

import numpy as np
import orjson
import pytest
import torch

from conftest import (SUM_REL, UPDATE_REL, assert_close_state, assert_same_update,
                      run_torchrun)
from tcli.errors import DataError, TcliError, UsageError
from tcli.models.logprobs import pack_micro_batches, sequence_logprobs
from tcli.train.loss import (KL_ESTIMATORS, LOSS_AGGREGATIONS, aggregate, kl_penalty,
                             policy_loss)


# ----------------------------------------------------------------------------- pure loss maths

def _ratios(rhos, adv):
    old = torch.zeros(1, len(rhos))
    logp = torch.log(torch.tensor([rhos], dtype=torch.float32)).requires_grad_(True)
    A = torch.full((1, len(rhos)), float(adv))
    return logp, old, A, torch.ones(1, len(rhos), dtype=torch.bool)


def test_policy_loss_clip_positive_advantage():
    logp, old, A, mask = _ratios([0.5, 1.0, 1.5, 5.0], +1.0)
    out = policy_loss(logp, old, A, mask, clip_low=0.2, clip_high=0.28, dual_clip=3.0)
    # -min(rho*A, clip(rho, 0.8, 1.28)*A)
    assert torch.allclose(out.loss, torch.tensor([[-0.5, -1.0, -1.28, -1.28]]), atol=1e-6)
    assert out.clipped.tolist() == [[False, False, True, True]]
    assert not out.dual_clipped.any()
    out.loss.sum().backward()
    # clipped tokens carry no gradient; unclipped: d(-rho)/dlogp = -rho
    assert torch.allclose(logp.grad, torch.tensor([[-0.5, -1.0, 0.0, 0.0]]), atol=1e-6)


def test_policy_loss_clip_and_dual_clip_negative_advantage():
    logp, old, A, mask = _ratios([0.5, 1.0, 1.5, 5.0], -1.0)
    out = policy_loss(logp, old, A, mask, clip_low=0.2, clip_high=0.28, dual_clip=3.0)
    # max(rho, clip(rho)) for A=-1, then min(., c*|A|) = 3 for the runaway ratio 5
    assert torch.allclose(out.loss, torch.tensor([[0.8, 1.0, 1.5, 3.0]]), atol=1e-6)
    assert out.clipped.tolist() == [[True, False, False, False]]
    assert out.dual_clipped.tolist() == [[False, False, False, True]]
    out.loss.sum().backward()
    assert torch.allclose(logp.grad, torch.tensor([[0.0, 1.0, 1.5, 0.0]]), atol=1e-6)
    # without dual clip the ratio-5 token costs 5
    out2 = policy_loss(logp.detach(), old, A, mask, dual_clip=0)
    assert out2.loss[0, 3].item() == pytest.approx(5.0, rel=1e-6)


def test_policy_loss_masks_padding():
    logp, old, A, _ = _ratios([2.0, 2.0], -1.0)
    mask = torch.tensor([[True, False]])
    out = policy_loss(logp, old, A, mask)
    assert out.loss[0, 1].item() == 0.0 and not out.clipped[0, 1] and not out.dual_clipped[0, 1]


def test_gspo_sequence_ratio_hand_computed():
    """GSPO (docs/design.md §4.13): s_i = exp(mean_t log ratio) over row i's real tokens, the same
    clipped ratio on every token of the row; the gradient reaches each token through the mean."""
    logp = torch.tensor([[0.1, -0.2, 0.4], [0.3, 0.3, 9.0], [1e-4, 1e-4, 1e-4]],
                        requires_grad=True)
    old = torch.zeros(3, 3)
    mask = torch.tensor([[True, True, True], [True, True, False], [True, True, True]])
    A = torch.tensor([[1.0, 1.0, 1.0], [-1.0, -1.0, 0.0], [1.0, 2.0, 3.0]])
    out = policy_loss(logp, old, A, mask, clip_low=3e-4, clip_high=4e-4, dual_clip=3.0,
                      ratio_level="sequence")
    s0, s1, s2 = math.exp(0.1), math.exp(0.3), math.exp(1e-4)  # row 1's padding is not counted
    assert torch.allclose(out.ratio[:, 0], torch.tensor([s0, s1, s2]), rtol=1e-6)
    assert torch.allclose(out.ratio[0], torch.full((3,), s0), rtol=1e-6)
    # row 0: A > 0 and s0 > 1.0004: clipped to 1.0004 on every token, no gradient
    # row 1: A < 0: max(s1, clip(s1)) = s1 = 1.34986 (under the dual bound 3), not clipped
    # row 2: 1 - 3e-4 < s2 = 1.0001 < 1.0004: unclipped, loss -s2 * A_t
    want = torch.tensor([[-1.0004] * 3, [s1, s1, 0.0], [-s2, -2 * s2, -3 * s2]])
    assert torch.allclose(out.loss, want, rtol=1e-6)
    assert out.clipped.tolist() == [[True] * 3, [False] * 3, [False] * 3]
    out.loss.sum().backward()
    # d/dlogp_k of sum_t -s A_t = -s * sum_t A_t / n for every real token k of the row
    # (row 1: 2 s1 / 2 on its two real tokens, none on the padding; row 2: -6 s2 / 3)
    grad = torch.tensor([[0.0, 0.0, 0.0], [s1, s1, 0.0], [-2 * s2] * 3])
    assert torch.allclose(logp.grad, grad, rtol=1e-6)


def test_token_ratio_level_is_the_ppo_ratio_bit_for_bit():
    g = torch.Generator().manual_seed(1)
    logp, old = -torch.rand(4, 6, generator=g) * 3, -torch.rand(4, 6, generator=g) * 3
    A = torch.randn(4, 6, generator=g)
    mask = torch.rand(4, 6, generator=g) > 0.2
    out = policy_loss(logp, old, A, mask)
    ratio = torch.exp((logp - old).clamp(-20.0, 20.0))
    loss = torch.maximum(-A * ratio, -A * ratio.clamp(0.8, 1.28))
    loss = torch.where((A < 0) & (loss > -A * 3.0), -A * 3.0, loss).masked_fill(~mask, 0.0)
    assert torch.equal(out.ratio, ratio) and torch.equal(out.loss, loss)


def test_clip_defaults_follow_the_ratio_level():
    from tcli.config.stages import TrainOptions

    assert TrainOptions().clip_range() == (0.2, 0.28)
    assert TrainOptions(ratio_level="sequence").clip_range() == (3e-4, 4e-4)
    assert TrainOptions(ratio_level="sequence", clip_high=1e-3).clip_range() == (3e-4, 1e-3)
    assert TrainOptions(clip_low=0.1).clip_range() == (0.1, 0.28)
    with pytest.raises(UsageError, match=r"--ratio-level \(train.ratio_level\).*sequence, token"):
        TrainOptions(ratio_level="seq")


def test_aggregations_hand_computed():
    v = torch.tensor([[1.0, 2.0, 3.0], [4.0, 99.0, 99.0]])
    mask = torch.tensor([[True, True, True], [True, False, False]])
    assert aggregate(v, mask, "token-mean").item() == pytest.approx(10 / 4)
    assert aggregate(v, mask, "seq-mean-token-mean").item() == pytest.approx((2 + 4) / 2)
    assert aggregate(v, mask, "seq-mean-token-sum").item() == pytest.approx((6 + 4) / 2)
    assert set(LOSS_AGGREGATIONS.names()) == {"token-mean", "seq-mean-token-mean",
                                              "seq-mean-token-sum"}
    with pytest.raises(UsageError, match="token-mean"):
        LOSS_AGGREGATIONS.get("mean")


def test_sequence_aggregations_do_not_count_an_empty_row():
    """A row with no real token (every token masked out) is not a sequence of the mean."""
    v = torch.tensor([[1.0, 2.0, 3.0], [4.0, 99.0, 99.0], [7.0, 7.0, 7.0]])
    mask = torch.tensor([[True, True, True], [True, False, False], [False, False, False]])
    # row sums 6 and 4 over 3 and 1 tokens; the empty row adds nothing and counts for nothing
    assert aggregate(v, mask, "seq-mean-token-sum").item() == pytest.approx((6 + 4) / 2)
    assert aggregate(v, mask, "seq-mean-token-mean").item() == pytest.approx((6 / 3 + 4 / 1) / 2)
    assert aggregate(v, mask, "token-mean").item() == pytest.approx((6 + 4) / 4)
    assert LOSS_AGGREGATIONS.get("seq-mean-token-sum").denominator(mask) == 2.0


def test_aggregation_split_equals_whole():
    """Numerators over micro-batches / one global denominator == aggregate of the whole batch."""
    g = torch.Generator().manual_seed(0)
    v = torch.randn(6, 5, generator=g)
    mask = torch.rand(6, 5, generator=g) > 0.3
    mask[:, 0] = True
    for name in LOSS_AGGREGATIONS.names():
        agg = LOSS_AGGREGATIONS.get(name)
        whole = aggregate(v, mask, name)
        d = agg.denominator(mask)
        parts = sum(agg.numerator(v[s], mask[s]) for s in (slice(0, 2), slice(2, 3), slice(3, 6)))
        assert (parts / d).item() == pytest.approx(whole.item(), rel=1e-6)


def test_kl_estimators_hand_computed():
    logp = torch.tensor([math.log(0.5)])
    ref = torch.tensor([math.log(0.25)])
    assert kl_penalty(logp, ref, "k1").item() == pytest.approx(math.log(2), rel=1e-6)
    assert kl_penalty(logp, ref, "k2").item() == pytest.approx(0.5 * math.log(2) ** 2, rel=1e-6)
    # k3 = r - 1 - log r, r = pi_ref/pi = 0.5
    assert kl_penalty(logp, ref, "k3").item() == pytest.approx(0.5 - 1 + math.log(2), rel=1e-6)
    assert kl_penalty(ref, ref, "k3").item() == 0.0
    assert KL_ESTIMATORS.names() == ["k1", "k2", "k3"]
    with pytest.raises(UsageError, match="k1, k2, k3"):
        KL_ESTIMATORS.get("k4")


def test_log_ratios_are_clamped_only_beyond_20():
    """The ±20 clamp on log ratios (exp(20) ~ 5e8) guards against inf; a log ratio of 5 is a
    real, far off-policy token and passes unchanged, in k3 and in the PPO ratio alike."""
    ref = torch.zeros(4)
    logp = torch.tensor([5.0, -5.0, 30.0, -30.0])  # d = log pi_ref - log pi = -logp
    k3 = kl_penalty(logp, ref, "k3")
    # e^d - d - 1 with d = -5, 5, then d = -30 and 30 clamped to -20 and 20
    want = [math.exp(-5) + 5 - 1, math.exp(5) - 5 - 1,
            math.exp(-20) + 20 - 1, math.exp(20) - 20 - 1]
    assert k3.tolist() == pytest.approx(want, rel=1e-6)  # float32 exp: ~1e-7 relative
    mask = torch.ones(1, 4, dtype=torch.bool)
    out = policy_loss(logp[None], ref[None], torch.ones(1, 4), mask)
    want = [math.exp(5), math.exp(-5), math.exp(20), math.exp(-20)]
    assert out.ratio[0].tolist() == pytest.approx(want, rel=1e-6)


def test_pack_micro_batches_budget():
    lengths = [10, 3, 7, 7, 2, 30]
    batches = pack_micro_batches(lengths, 20)
    assert sorted(i for b in batches for i in b) == list(range(6))
    for b in batches:
        assert len(b) == 1 or len(b) * max(lengths[i] for i in b) <= 20
    assert [5] in batches  # too long for the budget: alone, not an error


# ----------------------------------------------------------------------------- tiny model fixtures

@pytest.fixture(scope="module")
def policy(tiny):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny).eval()


def _random_pairs(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    P, R = [], []
    for _ in range(n):
        P.append(torch.randint(3, 90, (int(torch.randint(2, 9, (1,), generator=g)),), generator=g).tolist())
        R.append(torch.randint(3, 90, (int(torch.randint(1, 16, (1,), generator=g)),), generator=g).tolist())
    return P, R


@pytest.fixture(scope="module")
def rollouts(tmp_path_factory, policy):
    """An advantaged rollout file whose logprobs come from sequence_logprobs (on-policy)."""
    P, R = _random_pairs(12)
    lps = sequence_logprobs(policy, P, R, micro_batch_tokens=64)
    recs = []
    for i, (p, r, lp) in enumerate(zip(P, R, lps)):
        sign = 1.0 if i % 2 == 0 else -1.0
        recs.append({"schema": "tcli.rollout/1", "prompt_id": i // 4, "sample_id": i % 4,
                     "prompt_token_ids": p, "token_ids": r, "logprobs": lp.tolist(),
                     "advantages": [sign * (1 + 0.1 * t) for t in range(len(r))]})
    path = tmp_path_factory.mktemp("roll") / "roll.jsonl"
    path.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in recs))
    return str(path), recs


def test_sequence_logprobs_matches_one_at_a_time(policy):
    P, R = _random_pairs(6, seed=1)
    lps, ents = sequence_logprobs(policy, P, R, micro_batch_tokens=40, with_entropy=True)
    for p, r, lp, ent in zip(P, R, lps, ents):
        with torch.no_grad():
            full = policy(torch.tensor([p + r])).logits[0].float().log_softmax(-1)
        want = torch.stack([full[len(p) - 1 + t, tok] for t, tok in enumerate(r)])
        assert lp.shape == (len(r),)
        assert torch.allclose(lp, want, atol=1e-5)
        rows = full[len(p) - 1: len(p) - 1 + len(r)]
        assert torch.allclose(ent, -(rows.exp() * rows).sum(-1), atol=1e-4)


def _seq_logp(model_or_dir, p, r):
    from transformers import AutoModelForCausalLM

    m = model_or_dir
    if isinstance(m, str):
        m = AutoModelForCausalLM.from_pretrained(m).eval()
    return float(sequence_logprobs(m, [p], [r])[0].sum())


@pytest.mark.parametrize("sign, level", [(1.0, "token"), (-1.0, "token"), (1.0, "sequence")])
def test_advantage_sign_moves_logprob(tiny, policy, sign, level):
    from tcli.config.stages import TrainOptions
    from tcli.train.trainer import Trainer

    p, r = [5, 6, 7, 8], [20, 21, 22, 23, 24, 25]
    lp = sequence_logprobs(policy, [p], [r])[0]
    before = float(lp.sum())
    rec = {"prompt_token_ids": p, "token_ids": r, "logprobs": lp.tolist(),
           "advantages": [sign] * len(r)}
    tr = Trainer(tiny, TrainOptions(lr=1e-3, ratio_level=level), seed=0)
    m = tr.step([rec])
    after = _seq_logp(tr.model.eval(), p, r)
    assert m["optimizer_steps"] == 1 and m["num_tokens"] == len(r) and m["num_sequences"] == 1
    assert m["approx_kl"] < 1e-6 and m["clip_frac"] == 0.0  # on-policy: ratio 1 everywhere
    assert m["policy_version"] == 1 and m["step"] == 1
    assert (after - before) * sign > 0.01, (before, after)


def test_each_epoch_has_its_own_mini_batch_order(tiny):
    """Epoch e of step s visits the rollouts in default_rng([seed, s, e]).permutation(n) order,
    split into the mini-batches: every epoch is a fresh shuffle, reproducible from the seed."""
    from tcli.config.stages import TrainOptions
    from tcli.train.trainer import Trainer

    recs = [{"prompt_token_ids": [5, 6], "token_ids": [20 + i], "logprobs": [-4.0],
             "advantages": [1.0]} for i in range(8)]
    tr = Trainer(tiny, TrainOptions(epochs=2, mini_batches=2), seed=3)
    seen = []
    tr._mini_batch = lambda samples, mb, stats, ref_cache: seen.append(mb)  # order only
    tr.step(recs)
    tr.step(recs)
    want = [np.array_split(np.random.default_rng([3, step, epoch]).permutation(8), 2)
            for step in (0, 1) for epoch in (0, 1)]
    assert seen == [mb.tolist() for split in want for mb in split]
    assert seen[0] + seen[1] != seen[2] + seen[3]  # the two epochs of step 0 differ
    assert sorted(seen[0] + seen[1]) == list(range(8))


def test_checkpoint_round_trip(tiny, rollouts, tmp_path):
    from safetensors.torch import load_file

    from tcli.models.checkpoint import read_state
    from tcli.config.stages import TrainOptions
    from tcli.train.trainer import Trainer

    _, recs = rollouts
    cfg = TrainOptions(lr=1e-3, mini_batches=2, micro_batch_tokens=64)
    tr = Trainer(tiny, cfg, seed=3)
    m1 = tr.step(recs)
    assert m1["optimizer_steps"] == 2
    out = str(tmp_path / "ck1")
    tr.save(out, extra_state={"note": "x"})
    st = read_state(out)
    assert (st["step"], st["policy_version"], st["optimizer_steps"], st["seed"]) == (1, 1, 2, 3)
    assert st["config"]["mini_batches"] == 2 and st["note"] == "x"
    assert sorted(os.listdir(tmp_path)) == ["ck1"]  # no temp dirs left behind

    tr2 = Trainer(out, cfg, seed=3)
    sd_saved = load_file(os.path.join(out, "model.safetensors"))
    for k, v in tr.model.state_dict().items():
        if k in sd_saved:
            assert torch.equal(sd_saved[k], v), k
    for k, v in tr2.model.state_dict().items():
        assert torch.equal(v, tr.model.state_dict()[k]), k
    s1, s2 = tr.optimizer.state_dict()["state"], tr2.optimizer.state_dict()["state"]
    assert s1.keys() == s2.keys() and len(s1) > 0
    for i in s1:
        for name in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(s1[i][name], s2[i][name]), (i, name)
    m2 = tr2.step(recs)
    assert (m2["step"], m2["policy_version"]) == (2, 2)
    # resumed == continued: the same second step from the live trainer gives the same weights
    tr.step(recs)
    for k, v in tr2.model.state_dict().items():
        assert torch.allclose(v, tr.model.state_dict()[k], atol=1e-6), k


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_optimizer_state_refused(tiny, tmp_path):
    from tcli.config.stages import TrainOptions
    from tcli.train.trainer import Trainer

    ck = tmp_path / "evil"
    shutil.copytree(tiny, ck)
    marker = tmp_path / "pwned"
    torch.save({"state": {}, "param_groups": [], "x": _Payload(str(marker))}, ck / "optimizer.pt")
    with pytest.raises(TcliError, match="refusing to load optimizer state"):
        Trainer(str(ck), TrainOptions())
    # plain pickle (not torch's zip format) is refused too
    (ck / "optimizer.pt").write_bytes(pickle.dumps(_Payload(str(marker)), protocol=2))
    with pytest.raises(TcliError, match="optimizer"):
        Trainer(str(ck), TrainOptions())
    assert not marker.exists()


def test_checkpoint_without_weights_is_a_clear_error(tiny, tmp_path):
    from tcli.config.stages import TrainOptions
    from tcli.train.trainer import Trainer

    ck = tmp_path / "noweights"
    shutil.copytree(tiny, ck)
    os.unlink(ck / "model.safetensors")
    with pytest.raises(DataError, match=str(ck)):
        Trainer(str(ck), TrainOptions())


def test_record_validation_names_the_field():
    from tcli.train.samples import samples_from_records

    good = {"prompt_token_ids": [3, 4], "token_ids": [5, 6], "logprobs": [-1.0, -2.0],
            "advantages": [0.5, 0.5]}
    cases = [
        ({"advantages": None}, "advantages"),
        ({"logprobs": [-1.0]}, "logprobs"),
        ({"advantages": [0.5, float("nan")]}, "advantages"),
        ({"advantages": [0.5, float("inf")]}, "advantages"),
        ({"token_ids": [5, 500]}, "token_ids"),
        ({"token_ids": [5, -1]}, "token_ids"),
        ({"prompt_token_ids": []}, "prompt_token_ids"),
        ({"logprobs": [-1.0, 0.5]}, "logprobs"),
    ]
    for change, fld in cases:
        rec = {**good, **change}
        if change.get("advantages", 0) is None:
            del rec["advantages"]
        with pytest.raises(DataError) as ei:
            samples_from_records([good, rec], "f.jsonl", vocab_size=100)
        assert (ei.value.file, ei.value.line, ei.value.field) == ("f.jsonl", 2, fld), change
    with pytest.raises(UsageError, match=r"--kl-coef .*> 0 needs --ref-model"):
        from tcli.config.stages import TrainOptions

        TrainOptions(kl_coef=0.1)


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"])
def test_micro_batching_equals_one_batch(tiny, rollouts, agg):
    """Gradient accumulation over a small token budget == one big micro-batch (same loss,
    same gradient norm, same weights)."""
    from tcli.config.stages import TrainOptions
    from tcli.train.trainer import Trainer

    _, recs = rollouts
    out = []
    for mbt in (10_000, 40):
        tr = Trainer(tiny, TrainOptions(lr=1e-3, loss_agg=agg, micro_batch_tokens=mbt))
        grads = {}
        tr.optimizer.register_step_pre_hook(lambda *a, g=grads, m=tr.model: g.update(
            {n: p.grad.clone() for n, p in m.named_parameters()}))
        out.append((tr.step(recs), grads, tr.model.state_dict()))
    (m1, g1, w1), (m2, g2, w2) = out
    # float32 sums in another order: the loss and norms to SUM_REL, the weights as a fraction of
    # their update (Adam's first step is ~lr*sign(g): conftest.assert_same_update says why)
    assert m1["loss"] == pytest.approx(m2["loss"], rel=SUM_REL)
    assert m1["grad_norm"] == pytest.approx(m2["grad_norm"], rel=SUM_REL)
    assert g1.keys() == g2.keys() and len(g1) > 0
    for k in g1:  # one optimizer step from the same weights: the gradients are reordered sums
        assert (g1[k] - g2[k]).norm() <= SUM_REL * g1[k].norm() + 1e-12, k
    from tcli.models.load import load_model

    assert_same_update(load_model(tiny).state_dict(), w1, w2)


def test_kl_to_reference_model(tiny, rollouts):
    from tcli.config.stages import TrainOptions
    from tcli.train.trainer import Trainer

    _, recs = rollouts
    tr = Trainer(tiny, TrainOptions(lr=1e-3, ref_model=tiny, kl_coef=0.1, kl_estimator="k3",
                                    epochs=2, micro_batch_tokens=64))
    m = tr.step(recs)
    # epoch 1 runs at the reference weights (KL 0), epoch 2 after one update (KL > 0)
    assert m["kl"] > 0 and m["kl"] < 0.5
    assert m["loss"] != m["pg_loss"]


# ----------------------------------------------------------------------------- CLI and torchrun

def _run(args, input: bytes | None = None):
    from conftest import run_tcli

    return run_tcli(args, input=input)


TRAIN_ARGS = ["--lr", "1e-3", "--micro-batch-tokens", "64", "--mini-batches", "2", "--epochs", "2",
              "--seed", "1"]


@pytest.fixture(scope="module")
def one_proc(tiny, rollouts, tmp_path_factory):
    """train-step through real pipes: rollouts on stdin, metrics on stdout."""
    path, _ = rollouts
    out = str(tmp_path_factory.mktemp("cli") / "ck")
    metrics = out + ".metrics.jsonl"
    with open(path, "rb") as f:
        r = _run(["train-step", "-m", tiny, "-o", out, "--metrics", metrics, *TRAIN_ARGS],
                 input=f.read())
    assert r.returncode == 0, r.stderr.decode()
    return out, r, metrics


def test_cli_train_step(one_proc, rollouts):
    from tcli.models.checkpoint import read_state

    out, r, metrics_file = one_proc
    m = orjson.loads(r.stdout)
    assert r.stdout.count(b"\n") == 1
    assert orjson.loads(open(metrics_file, "rb").read()) == m
    for key in ("loss", "clip_frac", "grad_norm", "entropy", "tokens_per_s", "approx_kl",
                "num_tokens", "num_sequences", "lr", "step"):
        assert isinstance(m[key], (int, float)) and math.isfinite(m[key]), key
    _, recs = rollouts
    assert m["num_tokens"] == sum(len(x["token_ids"]) for x in recs)
    assert m["num_sequences"] == len(recs) and m["optimizer_steps"] == 4 and m["lr"] == 1e-3
    assert "kl" not in m
    assert set(os.listdir(out)) >= {"model.safetensors", "optimizer.pt", "tcli_state.json",
                                    "config.json", "tokenizer.json"}
    st = read_state(out)
    assert (st["step"], st["policy_version"], st["seed"]) == (1, 1, 1)
    assert r.stderr == b""  # stderr not a TTY: no progress, no transformers noise


def test_torchrun_two_processes_equal_one(tiny, rollouts, one_proc, tmp_path):
    from safetensors.torch import load_file

    path, _ = rollouts
    out2 = str(tmp_path / "ck2")
    r = run_torchrun(["-m", "tcli", "train-step", path, "-m", tiny, "-o", out2, *TRAIN_ARGS],
                     timeout=300)
    assert r.returncode == 0, r.stderr.decode()[-3000:]
    m2 = orjson.loads(r.stdout)  # only rank 0 writes the metrics record
    m1 = orjson.loads(one_proc[1].stdout)
    assert m2["world_size"] == 2 and m1["world_size"] == 1
    # 4 optimizer steps: later ones see weights apart by up to UPDATE_REL of an update (conftest);
    # abs: approx_kl and clip_frac start at 0
    for k in ("loss", "clip_frac", "approx_kl", "entropy", "grad_norm"):
        assert m2[k] == pytest.approx(m1[k], rel=UPDATE_REL, abs=1e-6), k
    assert (m2["num_tokens"], m2["num_sequences"]) == (m1["num_tokens"], m1["num_sequences"])
    w0 = load_file(os.path.join(tiny, "model.safetensors"))
    w1 = load_file(os.path.join(one_proc[0], "model.safetensors"))
    w2 = load_file(os.path.join(out2, "model.safetensors"))
    moved = max((w1[k] - w0[k]).abs().max().item() for k in w0)
    assert moved > 1e-3  # the comparison is not vacuous
    assert_same_update(w0, w1, w2)
    o1 = torch.load(os.path.join(one_proc[0], "optimizer.pt"), weights_only=True)
    o2 = torch.load(os.path.join(out2, "optimizer.pt"), weights_only=True)
    for i in o1["state"]:
        assert_close_state(o1["state"][i]["exp_avg"], o2["state"][i]["exp_avg"], label=i)


def _write_bad(tmp_path, recs, name="bad.jsonl"):
    p = tmp_path / name
    if name.endswith(".arrow"):
        from tcli.io import RecordWriter

        with RecordWriter(str(p)) as w:
            w.write_all(recs)
    else:
        p.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in recs))
    return str(p)


def test_cli_refuses_to_replace_a_non_checkpoint_dir(tiny, rollouts, tmp_path):
    (tmp_path / "precious.txt").write_text("keep me")
    r = _run(["train-step", rollouts[0], "-m", tiny, "-o", str(tmp_path)])
    assert r.returncode == 2 and b"not a checkpoint" in r.stderr
    assert (tmp_path / "precious.txt").read_text() == "keep me"


@pytest.mark.parametrize("case", ["missing_advantages", "length_mismatch", "nan_arrow",
                                  "vocab"])
def test_cli_bad_input_exit_65_no_checkpoint(tiny, rollouts, tmp_path, case):
    _, recs = rollouts
    recs = [dict(r) for r in recs[:3]]
    name, field = "bad.jsonl", None
    if case == "missing_advantages":
        del recs[1]["advantages"]
        field = "advantages"
    elif case == "length_mismatch":
        recs[1]["logprobs"] = recs[1]["logprobs"] + [-1.0]
        field = "logprobs"
    elif case == "nan_arrow":
        recs[1]["advantages"] = [float("nan")] * len(recs[1]["token_ids"])
        name, field = "bad.arrow", "advantages"
    elif case == "vocab":
        recs[1]["token_ids"] = [10_000] + recs[1]["token_ids"][1:]
        field = "token_ids"
    path = _write_bad(tmp_path, recs, name)
    out = tmp_path / "out"
    r = _run(["train-step", path, "-m", tiny, "-o", str(out)])
    assert r.returncode == 65, r.stderr.decode()
    err = r.stderr.decode()
    assert f"{path}:2: field '{field}'" in err, err
    assert err.count("\n") == 1
    assert r.stdout == b""
    assert sorted(os.listdir(tmp_path)) == [name]  # no checkpoint, no temp directory
