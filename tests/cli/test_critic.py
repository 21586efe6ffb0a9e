"""The PPO critic: init-critic, values, train-critic (learning, clipping, checkpoints, torchrun,
bad input)."""

from __future__ import annotations

import os

import numpy as np
import orjson
import pytest

from conftest import (UPDATE_REL, assert_same_update, jsonl as _jsonl, rollouts, run_tcli,
                      run_torchrun)


@pytest.fixture(scope="module")
def critic(tmp_path_factory, tiny_model):
    """A tiny policy and a critic made from it by the CLI."""
    d = tmp_path_factory.mktemp("critic")
    policy = tiny_model
    r = run_tcli(["init-critic", "--from", policy, str(d / "critic"), "-q"])
    assert r.returncode == 0, r.stderr.decode()
    return policy, str(d / "critic")


def _records(n_prompts: int = 8, per: int = 4, seed: int = 0) -> list[dict]:
    """Rollouts whose reward depends on the prompt only: prompts starting with an even token
    always succeed, odd ones always fail. A critic that reads the prompt can explain it all."""
    rng = np.random.default_rng(seed)
    out = []
    for p in range(n_prompts):
        prompt = [4 + (p % 2)] + rng.integers(4, 40, size=5).tolist()
        for i in range(per):
            toks = rng.integers(4, 40, size=int(rng.integers(3, 9))).tolist()
            out.append({"schema": "tcli.rollout/1", "prompt_id": f"p{p}", "sample_id": i,
                        "prompt_token_ids": prompt, "token_ids": toks,
                        "logprobs": [-1.0] * len(toks), "reward": float(p % 2 == 0)})
    return out


def test_init_critic_values_are_zero_and_shaped(critic):
    policy, crit = critic
    st = orjson.loads(open(os.path.join(crit, "tcli_state.json"), "rb").read())
    assert st["made_by"] == "init-critic" and st["kind"] == "critic"
    recs = _records(2, 2)
    r = run_tcli(["values", "--critic", crit, "-q"], input=_jsonl(recs))
    assert r.returncode == 0, r.stderr.decode()
    out = [orjson.loads(x) for x in r.stdout.splitlines()]
    assert [len(o["critic_values"]) for o in out] == [len(x["token_ids"]) + 1 for x in recs]
    assert all(v == 0.0 for o in out for v in o["critic_values"])  # zero-initialised head
    r = run_tcli(["values", "--critic", policy], input=_jsonl(recs))
    assert r.returncode == 2 and b"is not a critic" in r.stderr and b"init-critic" in r.stderr
    assert f"--from {policy} NEW_CRITIC_DIR".encode() in r.stderr  # never over the policy


def test_a_critic_is_never_made_over_its_policy_nor_used_as_one(critic, tmp_path):
    import shutil

    policy, crit = critic
    copy = str(tmp_path / "policy")
    shutil.copytree(policy, copy)
    before = open(os.path.join(copy, "config.json"), "rb").read()
    r = run_tcli(["init-critic", "--from", copy, copy + "/"])
    assert r.returncode == 2 and b"would replace it" in r.stderr, r.stderr.decode()
    assert open(os.path.join(copy, "config.json"), "rb").read() == before
    prompts = tmp_path / "p.jsonl"
    prompts.write_bytes(_jsonl([{"id": "a", "prompt": "1+1=", "answer": "2"}]))
    for args in (["eval", "-m", crit, "-d", str(prompts), "--max-new-tokens", "2"],
                 ["sample-tree", str(prompts), "-m", crit, "-n", "2", "--max-new-tokens", "2"]):
        r = run_tcli(args)
        err = r.stderr.decode()
        assert r.returncode == 2 and "is a critic or classifier" in err and not r.stdout, err
        assert len(err.strip().splitlines()) == 1, err
    (tmp_path / "roll.jsonl").write_bytes(_jsonl(rollouts()))
    r = run_tcli(["train-step", str(tmp_path / "roll.jsonl"), "-m", policy, "-o",
                  str(tmp_path / "out"), "--ref-model", crit, "--kl-coef", "0.1"])
    err = r.stderr.decode()
    assert r.returncode == 2 and "a policy checkpoint goes here" in err, err
    assert "--model" not in err  # the critic was given as --ref-model, not --model
    r = run_tcli(["init-critic", "--from", crit, str(tmp_path / "again")])
    assert r.returncode == 2 and b"--from " + crit.encode() + b" is a critic" in r.stderr
    assert not (tmp_path / "again").exists()


def test_values_equal_a_single_sequence_forward(critic, tmp_path):
    """Batching (padding) does not change a response's values: each equals its own forward."""
    import torch

    from tcli.config.stages import CriticOptions
    from tcli.models.critic import critic_values, load_critic
    from tcli.train.critic import CriticTrainer

    _, crit = critic
    moved = str(tmp_path / "moved")
    t = CriticTrainer(crit, CriticOptions(), seed=0)
    with torch.no_grad():
        for p in t.model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    t.save(moved)
    model = load_critic(moved)
    recs = _records(3, 3)
    P = [np.array(r["prompt_token_ids"]) for r in recs]
    R = [np.array(r["token_ids"]) for r in recs]
    batched = critic_values(model, P, R, micro_batch_tokens=10_000)
    for p, r, v in zip(P, R, batched):
        with torch.no_grad():
            ids = torch.from_numpy(np.concatenate([p, r]))[None]
            full = model(input_ids=ids).logits[0, :, 0].double().numpy()
        np.testing.assert_allclose(v, full[len(p) - 1:], rtol=1e-5, atol=1e-6)
    assert np.abs(np.concatenate(batched)).max() > 1e-3  # not the zero head any more


def test_critic_learns_the_prompt_value(critic, tmp_path):
    """Returns = the reward (gamma = lam = 1): after 25 updates the critic explains the variance of
    the returns from the prompt (measured: value loss 0.001x the first, explained variance 0.997
    and a good-bad gap of 1.0 at 20-25 updates; 5 updates give 0.36x, 0.28)."""
    from tcli.algos.gae import gae
    from tcli.config.stages import CriticOptions
    from tcli.models.critic import critic_values
    from tcli.train.critic import CriticTrainer

    _, crit = critic
    recs = _records(8, 4)
    t = CriticTrainer(crit, CriticOptions(lr=3e-3, value_clip=0.0), seed=0)
    P = [np.array(r["prompt_token_ids"]) for r in recs]
    R = [np.array(r["token_ids"]) for r in recs]
    first = last = None
    for step in range(25):
        with __import__("torch").no_grad():
            vals = critic_values(t.model, P, R)
        for rec, v in zip(recs, vals):
            adv, ret = gae(rec["reward"], v, 1.0, 1.0)
            rec["critic_values"], rec["returns"] = v.tolist(), ret.tolist()
        m = t.step(recs)
        first = first or m
        last = m
    assert last["value_loss"] < 0.05 * first["value_loss"], (first, last)
    assert last["explained_variance"] > 0.8, last
    t.model.eval()
    v = critic_values(t.model, P, R)
    good = np.mean([x[0] for x, r in zip(v, recs) if r["reward"] == 1.0])
    bad = np.mean([x[0] for x, r in zip(v, recs) if r["reward"] == 0.0])
    assert good - bad > 0.7, (good, bad)


def test_value_loss_clipping():
    import torch

    from tcli.train.critic import value_loss

    v = torch.tensor([[1.0, 0.0, 0.5]], requires_grad=True)
    old = torch.tensor([[0.0, 0.0, 0.4]])
    ret = torch.tensor([[1.0, 1.0, 0.0]])
    loss, clipped = value_loss(v, old, ret, 0.2)
    # token 0: V moved 1.0 > 0.2 away from V_old; clipped V = 0.2, (0.2 - 1)^2 = 0.64 > 0
    # token 1: unmoved, (0 - 1)^2 = 1 both ways; token 2: moved 0.1 (inside), 0.25
    assert torch.allclose(loss, torch.tensor([[0.32, 0.5, 0.125]]))
    assert clipped.tolist() == [[True, False, False]]
    loss.sum().backward()
    assert v.grad.tolist()[0][0] == 0.0  # the clipped branch carries no gradient


def _advantaged(crit, recs, tmp_path) -> str:
    r = run_tcli(["values", "--critic", crit, "-q"], input=_jsonl(recs))
    assert r.returncode == 0, r.stderr.decode()
    r = run_tcli(["advantages", "-e", "gae", "-q"], input=r.stdout)
    assert r.returncode == 0, r.stderr.decode()
    path = tmp_path / "adv.jsonl"
    path.write_bytes(r.stdout)
    return str(path)


@pytest.fixture(scope="module")
def small_advantaged(critic, tmp_path_factory) -> list[dict]:
    """Two records through the real values | advantages -e gae pipeline (once per module; each
    bad-input case mutates its own copy)."""
    path = _advantaged(critic[1], _records(1, 2), tmp_path_factory.mktemp("adv"))
    return [orjson.loads(x) for x in open(path, "rb")]


ARGS = ["--lr", "1e-3", "--micro-batch-tokens", "40", "--mini-batches", "2", "--seed", "3"]


def test_train_critic_cli_and_torchrun_equal(critic, tmp_path):
    """The command writes a checkpoint + one metrics line; 2 torchrun processes give the same
    weights as 1 (global token denominator, DDP)."""
    from safetensors.torch import load_file

    _, crit = critic
    adv = _advantaged(crit, _records(4, 3), tmp_path)
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    r = run_tcli(["train-critic", adv, "--critic", crit, "-o", one, *ARGS])
    assert r.returncode == 0, r.stderr.decode()
    m = orjson.loads(r.stdout)
    assert m["kind"] == "train-critic" and m["optimizer_steps"] == 2 and m["value_loss"] > 0
    assert os.path.isfile(os.path.join(one, "optimizer.pt"))
    r = run_torchrun(["-m", "tcli", "train-critic", adv, "--critic", crit, "-o", two, *ARGS],
                     timeout=300)
    assert r.returncode == 0, r.stderr.decode()[-3000:]
    # 2 optimizer steps: the second sees weights apart by up to UPDATE_REL of an update (conftest)
    assert orjson.loads(r.stdout)["value_loss"] == pytest.approx(m["value_loss"], rel=UPDATE_REL)
    w0 = load_file(os.path.join(crit, "model.safetensors"))
    w1 = load_file(os.path.join(one, "model.safetensors"))
    w2 = load_file(os.path.join(two, "model.safetensors"))
    assert max((w1[k] - w0[k]).abs().max().item() for k in w0) > 1e-4
    assert_same_update(w0, w1, w2)


@pytest.mark.parametrize("mutate, field, code", [
    (lambda r: r.pop("returns"), "returns", 65),
    (lambda r: r.update(returns=[1.0]), "returns", 65),
    (lambda r: r.update(critic_values=[0.0]), "critic_values", 65),
    (lambda r: r.update(token_ids=[10 ** 6] * len(r["token_ids"])), "token_ids", 65),
    (lambda r: r.update(prompt_token_ids=[]), "prompt_token_ids", 65),
])
def test_train_critic_bad_input(critic, small_advantaged, tmp_path, mutate, field, code):
    _, crit = critic
    recs = [dict(r) for r in small_advantaged]
    mutate(recs[1])
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(_jsonl(recs))
    out = tmp_path / "out"
    r = run_tcli(["train-critic", str(bad), "--critic", crit, "-o", str(out)])
    assert r.returncode == code, r.stderr.decode()
    assert f"bad.jsonl:2: field '{field}'" in r.stderr.decode(), r.stderr.decode()
    assert not out.exists()


def test_train_critic_never_writes_over_the_critic_it_starts_from(critic, small_advantaged,
                                                                   tmp_path):
    """-o naming the --critic directory (by another spelling too) would lose the start for good:
    exit 2 before anything is read, the critic unchanged."""
    import shutil

    crit = tmp_path / "crit"
    shutil.copytree(critic[1], crit)
    files = lambda: {p.name: p.read_bytes() for p in crit.iterdir()}  # noqa: E731
    before = files()
    src = tmp_path / "in.jsonl"
    src.write_bytes(_jsonl([dict(r) for r in small_advantaged]))
    r = run_tcli(["train-critic", str(src), "--critic", str(crit), "-o", str(crit / ".." / "crit")])
    assert r.returncode == 2 and "is the input checkpoint --critic" in r.stderr.decode(), r.stderr
    assert files() == before


def test_nothing_trains_on_what_the_old_rewards_gave(critic, small_advantaged, tmp_path):
    """Records that went through advantages, verified again with other rewards: train-step and
    train-critic refuse them (their advantages and returns were dropped, docs/design.md §3.5)
    until values | advantages run again on the new rewards."""
    policy, crit = critic
    recs = [{**r, "text": "#### 7", "answer": "8"} for r in small_advantaged]  # now reward 0
    assert any(r["reward"] == 1.0 for r in recs) and any(any(r["returns"]) for r in recs)
    r = run_tcli(["verify", "-q", "-j", "0", "-t", "gsm8k"], input=_jsonl(recs))
    assert r.returncode == 0, r.stderr.decode()
    again = tmp_path / "again.jsonl"
    again.write_bytes(r.stdout)
    out = tmp_path / "out"
    r = run_tcli(["train-step", str(again), "-m", policy, "-o", str(out)])
    assert r.returncode == 65 and not out.exists(), r.stderr.decode()
    assert "again.jsonl:1: field 'advantages': is missing: run `tcli advantages`" in r.stderr.decode()
    r = run_tcli(["train-critic", str(again), "--critic", crit, "-o", str(out)])
    assert r.returncode == 65 and not out.exists(), r.stderr.decode()
    assert "again.jsonl:1: field 'returns': is missing: run `tcli advantages -e gae`" in \
        r.stderr.decode()
    verified = [orjson.loads(x) for x in again.read_bytes().splitlines()]
    fresh = [orjson.loads(x) for x in open(_advantaged(crit, verified, tmp_path), "rb")]
    assert all(not any(f["returns"]) for f in fresh)  # reward 0 and a zero critic: returns 0


def test_gae_stats_count_groups_whose_rewards_are_all_equal(critic):
    """zero_variance_share is read from the rewards for gae too (docs/design.md §4.1): two of
    these three groups hold equal rewards, though gae gives them non-zero advantages."""
    _, crit = critic
    recs = _records(3, 3)
    recs[-1]["reward"] = 1.0 - recs[-1]["reward"]  # the third group is mixed
    r = run_tcli(["values", "--critic", crit, "-q"], input=_jsonl(recs))
    assert r.returncode == 0, r.stderr.decode()
    r = run_tcli(["advantages", "-e", "gae", "--stats"], input=r.stdout)
    assert r.returncode == 0, r.stderr.decode()
    assert "│ zero_variance_share │ 0.6667 │" in r.stderr.decode(), r.stderr.decode()
    assert any(a != 0.0 for x in r.stdout.splitlines() for a in orjson.loads(x)["advantages"])


def test_values_bad_input(critic, tmp_path):
    _, crit = critic
    bad = tmp_path / "bad.jsonl"
    recs = _records(1, 2)
    recs[1]["token_ids"] = ["x"]
    bad.write_bytes(_jsonl(recs))
    r = run_tcli(["values", str(bad), "--critic", crit, "-o", str(tmp_path / "o.jsonl")])
    assert r.returncode == 65 and "bad.jsonl:2: field 'token_ids'" in r.stderr.decode()
    assert not (tmp_path / "o.jsonl").exists()


def test_init_critic_bad_input(critic, tmp_path):
    """A missing source, a source that is not a model, and a target tcli did not write: one line,
    exit 2 or 65, nothing written."""
    policy, _ = critic
    r = run_tcli(["init-critic", "--from", str(tmp_path / "nope"), str(tmp_path / "c1")])
    assert r.returncode == 2 and r.stderr.count(b"\n") == 1, r.stderr
    (tmp_path / "notmodel").mkdir()
    (tmp_path / "notmodel" / "config.json").write_text("{not json")
    r = run_tcli(["init-critic", "--from", str(tmp_path / "notmodel"), str(tmp_path / "c2")])
    assert r.returncode in (2, 65) and r.stderr.count(b"\n") == 1, r.stderr
    keep = tmp_path / "mine"
    keep.mkdir()
    (keep / "notes.txt").write_text("user data")
    r = run_tcli(["init-critic", "--from", policy, str(keep)])
    assert r.returncode == 2 and b"refusing to replace" in r.stderr, r.stderr
    assert os.listdir(keep) == ["notes.txt"]
    assert not (tmp_path / "c1").exists() and not (tmp_path / "c2").exists()
