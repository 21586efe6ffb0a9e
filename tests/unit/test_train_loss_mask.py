"""Environment tokens (``loss_mask`` 0) in train-step and train-critic: no gradient reaches them,
the loss is that of the policy tokens alone, and an all-ones mask changes nothing
(docs/design.md §3.6)."""

from __future__ import annotations

import numpy as np
import orjson
import pytest
import torch

from conftest import failed, run_tcli
from tcli.train.batching import MicroBatch

PROMPT = [21, 15, 21, 33]
# three responses of one prompt that share their first tokens (the packed trie shares them);
# the 0s of each mask are a tool's output: spans inside, at a branch and at the very end
TOKENS = [[30, 41, 42, 43, 50, 51, 52, 1], [30, 41, 42, 43, 60, 61, 1], [30, 41, 70, 71, 72, 1]]
MASKS = [[1, 0, 0, 0, 1, 1, 1, 1], [1, 0, 0, 0, 1, 0, 1], [1, 1, 1, 0, 0, 1]]
# response 2's tokens 1-2 are the policy's, the same tokens are a tool's in responses 0 and 1


def records(masks=MASKS, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    out = []
    for i, (toks, m) in enumerate(zip(TOKENS, masks)):
        rec = {"schema": "tcli.rollout/1", "prompt_id": "p", "sample_id": i,
               "prompt_token_ids": PROMPT, "token_ids": toks,
               "logprobs": (-4.6 + 0.3 * rng.standard_normal(len(toks))).round(4).tolist(),
               "advantages": rng.standard_normal(len(toks)).round(4).tolist(),
               "finish_reason": "stop"}
        if m is not None:
            rec["loss_mask"] = list(m)
            # what a writer puts there: 0.0 log-probs and 0 advantages on the tool's tokens
            rec["logprobs"] = [x if k else 0.0 for x, k in zip(rec["logprobs"], m)]
        out.append(rec)
    return out


def on_policy(recs: list[dict], model_dir) -> list[dict]:
    """The records with the model's own log-probs at the policy tokens (ratio 1: nothing is
    clipped, so every policy token has a gradient, even at GSPO's narrow clip range)."""
    from tcli.models.load import load_model

    model = load_model(model_dir)
    for rec in recs:
        ids = torch.tensor([rec["prompt_token_ids"] + rec["token_ids"]])
        P = len(rec["prompt_token_ids"])
        with torch.no_grad():
            lp = torch.log_softmax(model(input_ids=ids).logits[0, P - 1 : -1].float(), -1)
        lp = lp.gather(1, torch.tensor(rec["token_ids"])[:, None])[:, 0].tolist()
        rec["logprobs"] = lp
    return recs


def raw_samples(recs: list[dict]) -> list:
    """TrainSamples that keep non-zero advantages at environment positions: only the trainer's
    mask can keep those tokens out of the loss."""
    from tcli.train.samples import TrainSample

    f32 = lambda x: np.asarray(x, dtype=np.float32)  # noqa: E731
    return [TrainSample(np.array(r["prompt_token_ids"]), np.array(r["token_ids"]),
                        f32(r["logprobs"]), f32(r["advantages"]) + 0.5, line=i + 1,
                        loss_mask=np.array(r["loss_mask"], dtype=bool))
            for i, r in enumerate(recs)]


def trainer(model_dir, **kw):
    from tcli.config.stages import TrainOptions
    from tcli.train.trainer import Trainer

    return Trainer(model_dir, TrainOptions(**{"lr": 1e-3, "max_grad_norm": 0.0, **kw}))


def step_grads(tr, recs) -> tuple[dict, dict]:
    """One step's metrics and the gradient of its (single) optimizer step."""
    grads: dict = {}
    tr.optimizer.register_step_pre_hook(
        lambda *_: grads.update({n: p.grad.clone() for n, p in tr.model.named_parameters()}))
    return tr.step(recs), grads


CASES = {
    "token-mean": dict(),
    "seq-mean-token-mean": dict(loss_agg="seq-mean-token-mean"),
    "seq-mean-token-sum": dict(loss_agg="seq-mean-token-sum"),
    "gspo": dict(ratio_level="sequence"),
    "tis": dict(tis_cap=2.0),
    "kl": dict(kl_coef=0.1),
}


@pytest.mark.parametrize("share_prefix", [True, False])
@pytest.mark.parametrize("case", sorted(CASES))
def test_no_gradient_reaches_environment_tokens(tiny, tiny_model_seed1, monkeypatch, case,
                                                share_prefix):
    """The gradient of the training loss w.r.t. every environment token's log-prob is exactly 0
    (though their advantages are not 0 here)
    (its logits feed nothing else), and w.r.t. the final hidden state that scores it (padded
    layout: position P − 1 + t), while every policy token gets one."""
    kw = dict(CASES[case])
    if "kl_coef" in kw:
        kw["ref_model"] = tiny_model_seed1
    tr = trainer(tiny, share_prefix=share_prefix, **kw)
    grids, hidden = [], []
    real = MicroBatch.logprobs

    def spy(self, model, samples, *a, **k):
        logp, ent, mask = real(self, model, samples, *a, **k)
        if logp.requires_grad:
            logp.retain_grad()
            grids.append((list(self.idxs), logp))
        return logp, ent, mask

    monkeypatch.setattr(MicroBatch, "logprobs", spy)

    def keep_hidden(_mod, _inp, out):
        if out.requires_grad:
            out.retain_grad()
            hidden.append(out)

    tr.model.model.norm.register_forward_hook(keep_hidden)
    tr.step(raw_samples(on_policy(records(), tiny)))
    assert grids
    for idxs, logp in grids:
        for row, i in enumerate(idxs):
            m = np.array(MASKS[i], dtype=bool)
            g = logp.grad[row, :len(m)].numpy()
            assert (g[~m] == 0.0).all(), (i, g)
            assert (g[m] != 0.0).all(), (i, g)
    if not share_prefix:  # one padded micro-batch, rows in the order of its idxs
        (idxs, _), (h,) = grids[0], hidden
        for row, i in enumerate(idxs):
            m = np.array(MASKS[i], dtype=bool)
            g = h.grad[row, len(PROMPT) - 1 : len(PROMPT) - 1 + len(m)].abs().sum(-1).numpy()
            assert (g[~m] == 0.0).all() and (g[m] > 0.0).all(), (i, g)


def excluded_loss(model_dir, recs, kl_ref=None, kl_coef=0.0, loss_agg="token-mean"):
    """The loss of the records with their environment positions simply left out: each
    response's log-probs in its full context, the clipped policy loss (+ KL) over its policy
    positions only, every position a real token; and its gradient."""
    from tcli.algos.losses import LOSS_AGGREGATIONS, kl_k3
    from tcli.models.load import load_model
    from tcli.train.loss import policy_loss

    model = load_model(model_dir, train=True)
    ref = load_model(kl_ref) if kl_ref else None
    agg = LOSS_AGGREGATIONS.get(loss_agg)
    nums, n_tok, ent, mis, kl, akl = [], 0, 0.0, 0.0, 0.0, 0.0
    for rec in recs:
        keep = torch.tensor(rec["loss_mask"], dtype=torch.bool)
        ids = torch.tensor([rec["prompt_token_ids"] + rec["token_ids"]])
        P, tok = len(rec["prompt_token_ids"]), torch.tensor(rec["token_ids"])

        def scored(m):
            logits = m(input_ids=ids, use_cache=False).logits[0, P - 1 : -1].float()
            full = torch.log_softmax(logits, -1)[keep]
            return full.gather(1, tok[keep][:, None])[:, 0][None], full

        logp, full = scored(model)
        ent += float(-(full.exp() * full).sum().detach())
        ones = torch.ones_like(logp, dtype=torch.bool)
        old = torch.tensor(rec["logprobs"])[keep][None]
        mis += float((logp.detach() - old).abs().sum())
        akl += float(kl_k3(old, logp.detach()).sum())
        adv = torch.tensor(rec["advantages"], dtype=torch.float32)[keep][None]
        per = policy_loss(logp, old, adv, ones).loss
        if ref is not None:
            with torch.no_grad():
                ref_lp = scored(ref)[0]
            kl += float(kl_k3(logp, ref_lp).sum().detach())
            per = per + kl_coef * kl_k3(logp, ref_lp)
        nums.append(agg.numerator(per, ones))
        n_tok += int(keep.sum())
    loss = sum(nums) / (n_tok if agg.by_tokens else len(recs))
    loss.backward()
    want = {"loss": float(loss.detach()), "entropy": ent / n_tok, "mismatch_abs_logp": mis / n_tok,
            "approx_kl": akl / n_tok, **({"kl": kl / n_tok} if ref is not None else {})}
    return (want,
            {n: p.grad for n, p in model.named_parameters()})


@pytest.mark.parametrize("case", ["token-mean", "seq-mean-token-mean", "kl-packed", "padded"])
def test_loss_equals_the_loss_without_environment_positions(tiny, tiny_model_seed1, case):
    """train-step on records with environment tokens reports the loss, and takes the gradient,
    of the same records with those positions left out of the loss (float32 sums in another
    order: 1e-5 relative); entropy, the mismatch, both KLs and num_tokens count policy
    tokens."""
    kw = {"token-mean": {}, "seq-mean-token-mean": {"loss_agg": "seq-mean-token-mean"},
          "kl-packed": {"kl_coef": 0.1, "ref_model": tiny_model_seed1},
          "padded": {"share_prefix": False}}[case]
    recs = records()
    metrics, grads = step_grads(trainer(tiny, **kw), recs)
    want, want_g = excluded_loss(tiny, recs, kw.get("ref_model"), kw.get("kl_coef", 0.0),
                                 kw.get("loss_agg", "token-mean"))
    for k, v in want.items():  # entropy, the mismatch and the KLs are over policy tokens too
        assert metrics[k] == pytest.approx(v, rel=1e-5), k
    assert metrics["num_tokens"] == sum(map(sum, MASKS))
    for k, g in want_g.items():
        assert (grads[k] - g).norm() <= 1e-5 * g.norm() + 1e-9, k


@pytest.mark.parametrize("share_prefix", [True, False])
def test_all_ones_mask_trains_bit_identically(tiny, share_prefix):
    ones = records([[1] * len(t) for t in TOKENS])
    plain = records([None] * len(TOKENS))
    for a, b in zip(ones, plain):
        assert a["logprobs"] == b["logprobs"] and a["advantages"] == b["advantages"]
    kw = dict(share_prefix=share_prefix, tis_cap=2.0, mini_batches=2, epochs=2)
    ta, tb = trainer(tiny, **kw), trainer(tiny, **kw)
    ma, mb = ta.step(ones), tb.step(plain)
    for k in ma:
        if k not in ("time_s", "tokens_per_s", "elapsed_s"):
            assert ma[k] == mb[k], k
    wa, wb = ta.model.state_dict(), tb.model.state_dict()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_environment_log_probs_and_advantages_are_ignored(tiny):
    """Whatever finite numbers sit at environment positions, the update is the same."""
    recs, other = records(), records()
    for r in other:
        r["logprobs"] = [x if k else 0.5 for x, k in zip(r["logprobs"], r["loss_mask"])]
        r["advantages"] = [x if k else 1e6 for x, k in zip(r["advantages"], r["loss_mask"])]
    ta, tb = trainer(tiny), trainer(tiny)
    ta.step(recs), tb.step(other)
    wa, wb = ta.model.state_dict(), tb.model.state_dict()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_response_of_only_environment_tokens_is_left_out(tiny):
    from tcli.train.samples import as_samples

    recs = records()
    recs[2]["loss_mask"] = [0] * len(TOKENS[2])
    assert [s.line for s in as_samples(recs, 1000)] == [1, 2]


@pytest.mark.parametrize("value, words", [
    ([1, 1], "has 2 entries, expected 8"),
    ([1, 0, 0, 0, 1, 1, 1, -1], "got -1"),
    ([1, 0, 0, 0, 1, 1, 1, None], "got nulls"),
])
def test_train_step_bad_loss_mask_exit_65(tiny, tmp_path, value, words):
    recs = records()
    recs[0]["loss_mask"] = value
    path = tmp_path / "r.jsonl"
    path.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in recs))
    r = run_tcli(["train-step", str(path), "--model", tiny, "-o", str(tmp_path / "out"), "-q"])
    failed(r, 65, f"{path}:1:", "field 'loss_mask'", words)
    assert not (tmp_path / "out").exists()


def test_critic_has_no_value_target_on_environment_tokens(tiny, tmp_path):
    """train-critic's update does not depend on the returns at environment positions."""
    from tcli.config.stages import CriticOptions
    from tcli.train.critic import CriticTrainer

    r = run_tcli(["init-critic", "--from", tiny, str(tmp_path / "critic"), "-q"])
    assert r.returncode == 0, r.stderr.decode()
    rng = np.random.default_rng(1)
    recs = []
    for rec in records():
        n = len(rec["token_ids"])
        recs.append(dict(rec, critic_values=rng.normal(0, 0.3, n + 1).tolist(),
                         returns=rng.normal(0.5, 0.3, n).tolist()))
    other = [dict(r, returns=[x if k else 50.0 for x, k in zip(r["returns"], r["loss_mask"])])
             for r in recs]
    out = []
    for rs in (recs, other):
        ct = CriticTrainer(str(tmp_path / "critic"), CriticOptions(lr=1e-3))
        m = ct.step(rs)
        out.append((m, ct.model.state_dict()))
    assert out[0][0]["num_tokens"] == sum(map(sum, MASKS))
    assert out[0][0]["value_loss"] == out[1][0]["value_loss"]
    assert all(torch.equal(out[0][1][k], out[1][1][k]) for k in out[0][1])


def test_policy_mask_when_only_some_samples_have_a_loss_mask():
    """A micro-batch that mixes tool episodes (with ``loss_mask``) and plain responses (without)
    still leaves the episodes' environment tokens out; the plain rows keep every real token."""
    from types import SimpleNamespace

    from tcli.train.batching import policy_mask

    samples = [SimpleNamespace(loss_mask=None),
               SimpleNamespace(loss_mask=np.array([True, False, False, True]))]
    # grid rows in idxs order [1, 0]: sample 1 (4 tokens), sample 0 (3 tokens, 1 past its end)
    real = torch.tensor([[True, True, True, True], [True, True, True, False]])
    got, changed = policy_mask(real, samples, [1, 0])
    assert changed
    assert got.tolist() == [[True, False, False, True], [True, True, True, False]]
