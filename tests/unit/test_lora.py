"""LoRA via peft (tcli.train.lora) on a real tiny Qwen3: only the adapter trains and is saved,
the base stays bit-identical, the adapter moves log-probs in the advantage's direction, adapter
checkpoints round-trip (optimizer included), load merged for sampling, and export merged."""

from __future__ import annotations

import os

import orjson
import pytest
import torch

from tcli.errors import DataError, UsageError

from conftest import TINY  # noqa: E402

GOOD = ([5, 6, 7], [10, 11, 12, 13])   # advantage +1
BAD = ([5, 6, 7], [20, 21, 22, 23])    # advantage -1


@pytest.fixture(scope="module")
def base(tiny_model):
    """The base model the adapters train on (the shared tiny model: never written)."""
    return tiny_model


def _logp(model, rows):
    """Sum of response log-probs of each (prompt, response) row, through tcli's log-prob code."""
    from tcli.models.logprobs import batch_logprobs, make_batch

    batch = make_batch([p for p, _ in rows], [r for _, r in rows], torch.device("cpu"), 0)
    lp, _ = batch_logprobs(model, batch)
    return lp.sum(-1)


def _step(model, opt, rows=(GOOD, BAD), adv=(1.0, -1.0)):
    """One clipped policy-gradient step (old log-probs = current: ratio 1)."""
    from tcli.models.logprobs import batch_logprobs, make_batch
    from tcli.train.loss import policy_loss

    batch = make_batch([p for p, _ in rows], [r for _, r in rows], torch.device("cpu"), 0)
    logp, _ = batch_logprobs(model, batch)
    A = torch.tensor(adv)[:, None].expand_as(logp)
    pl = policy_loss(logp, logp.detach(), A, batch.mask)
    (pl.loss.masked_fill(~batch.mask, 0).sum() / batch.mask.sum()).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def _trained(base, steps=3, lr=1e-2):
    from tcli.train import lora

    pm = lora.load_trainable(base, 4, 8, "all-linear")
    opt = torch.optim.AdamW(lora.trainable_parameters(pm), lr=lr)
    model = pm.get_base_model()
    for _ in range(steps):
        _step(model, opt)
    return pm, opt


def test_only_adapters_train_and_base_is_bit_identical(base):
    from safetensors.torch import load_file

    from tcli.train import lora

    pm = lora.load_trainable(base, 4, 8, "all-linear")
    model = pm.get_base_model()
    with torch.no_grad():
        before = _logp(model, [GOOD, BAD])
    params = lora.trainable_parameters(pm)
    names = [n for n, p in pm.named_parameters() if p.requires_grad]
    assert names and all("lora_A" in n or "lora_B" in n for n in names)
    # 2 layers x 7 projections (all-linear: never the LM head) x (A, B)
    assert len(params) == 2 * 7 * 2
    opt = torch.optim.AdamW(params, lr=1e-2)
    for _ in range(3):
        _step(model, opt)
    assert sum(len(g["params"]) for g in opt.param_groups) == len(params) == len(opt.state)
    after = _logp(model, [GOOD, BAD])
    assert after[0] > before[0] + 1e-3 and after[1] < before[1] - 1e-3  # the advantage's way
    saved = load_file(os.path.join(base, "model.safetensors"))
    now = lora.base_state(pm)
    assert set(saved) <= set(now)
    for k, v in saved.items():
        assert torch.equal(now[k], v), k  # bit-identical, not just close


def test_adapter_starts_as_identity(base):
    from tcli.models.load import load_model
    from tcli.train import lora

    plain = load_model(base)
    pm = lora.load_trainable(base, 4, 8, "q_proj,v_proj")
    with torch.no_grad():
        assert torch.equal(_logp(plain, [GOOD, BAD]), _logp(pm.get_base_model(), [GOOD, BAD]))
    assert {n.split(".")[-4] for n, p in pm.named_parameters() if p.requires_grad} == \
        {"q_proj", "v_proj"}


# ----------------------------------------------------------------------------- checkpoints

@pytest.fixture(scope="module")
def saved(base, tmp_path_factory):
    """3 steps of training, saved as an adapter checkpoint; the live model and optimizer too."""
    from tcli.models.load import load_tokenizer
    from tcli.train import lora

    pm, opt = _trained(base)
    out = str(tmp_path_factory.mktemp("ck") / "step_3")
    lora.save_adapter(out, pm, load_tokenizer(base), base=base, state={"step": 3},
                      optimizer=opt)
    return out, pm, opt


def test_adapter_checkpoint_holds_adapter_only(saved, base):
    from safetensors.torch import load_file

    out, pm, opt = saved
    files = set(os.listdir(out))
    assert {"adapter_config.json", "adapter_model.safetensors", "optimizer.pt",
            "tcli_state.json", "tokenizer.json"} <= files
    assert "model.safetensors" not in files and "config.json" not in files
    cfg = orjson.loads(open(os.path.join(out, "adapter_config.json"), "rb").read())
    assert cfg["base_model_name_or_path"] == os.path.abspath(base)
    assert (cfg["r"], cfg["lora_alpha"]) == (4, 8)
    w = load_file(os.path.join(out, "adapter_model.safetensors"))
    assert len(w) == 28 and all("lora_" in k for k in w)
    o = torch.load(os.path.join(out, "optimizer.pt"), weights_only=True)
    assert len(o["state"]) == 28  # AdamW moments of the adapter, nothing of the base


def test_adapter_round_trip_and_resume(saved, base):
    """Reloaded for training: same log-probs, and one more step with the reloaded optimizer
    lands exactly where one more step of the live model does."""
    from tcli.models.checkpoint import load_optimizer_state
    from tcli.train import lora

    out, pm, opt = saved
    pm2 = lora.load_trainable(out, 4, 8, "all-linear")
    opt2 = torch.optim.AdamW(lora.trainable_parameters(pm2), lr=1e-2)
    opt2.load_state_dict(load_optimizer_state(os.path.join(out, "optimizer.pt"), "cpu"))
    m1, m2 = pm.get_base_model(), pm2.get_base_model()
    with torch.no_grad():
        assert torch.equal(_logp(m1, [GOOD, BAD]), _logp(m2, [GOOD, BAD]))
    import copy

    live, live_opt = copy.deepcopy(pm), None
    live_opt = torch.optim.AdamW(lora.trainable_parameters(live), lr=1e-2)
    live_opt.load_state_dict(opt.state_dict())
    _step(live.get_base_model(), live_opt)
    _step(m2, opt2)
    a = dict(live.named_parameters())
    for n, p in pm2.named_parameters():
        assert torch.allclose(p, a[n], rtol=0, atol=1e-7), n
    with pytest.raises(UsageError, match="rank 4"):
        lora.load_trainable(out, 8, 8, "all-linear")


def test_merged_load_for_sampling(saved, base):
    from tcli.models.load import check_model_dir, load_config, load_model, model_vocab_size
    from tcli.train import lora

    out, pm, _ = saved
    check_model_dir(out)
    assert model_vocab_size(out) == model_vocab_size(base)
    assert load_config(out).hidden_size == TINY["hidden"]
    merged = load_model(out)
    assert not any("lora_" in n for n, _ in merged.named_parameters())
    with torch.no_grad():
        want = _logp(pm.get_base_model(), [GOOD, BAD])
        assert torch.allclose(_logp(merged, [GOOD, BAD]), want, atol=1e-5)
        assert not torch.allclose(_logp(load_model(base), [GOOD, BAD]), want, atol=1e-3)
    assert lora.adapter_base(out) == os.path.abspath(base)


def test_merge_export_is_a_plain_checkpoint(saved, tmp_path):
    from transformers import AutoModelForCausalLM

    from tcli.train import lora

    out, pm, _ = saved
    full = lora.export_merged(out, str(tmp_path / "merged"))
    files = set(os.listdir(full))
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= files
    assert "adapter_config.json" not in files
    m = AutoModelForCausalLM.from_pretrained(full)  # no peft involved
    with torch.no_grad():
        assert torch.allclose(_logp(m, [GOOD, BAD]), _logp(pm.get_base_model(), [GOOD, BAD]),
                              atol=1e-5)


def test_broken_adapter_directory_is_bad_data(saved, tmp_path):
    import shutil

    from tcli.models.load import check_model_dir

    out, _, _ = saved
    bad = tmp_path / "bad"
    shutil.copytree(out, bad)
    cfg = orjson.loads((bad / "adapter_config.json").read_bytes())
    cfg["base_model_name_or_path"] = str(tmp_path / "gone")
    (bad / "adapter_config.json").write_bytes(orjson.dumps(cfg))
    with pytest.raises(DataError, match="base_model_name_or_path"):
        check_model_dir(str(bad))


# ----------------------------------------------------------------------------- train-step, loop

def _tcli(args):
    from conftest import run_tcli

    return run_tcli(args, env={"OMP_NUM_THREADS": "1"}, timeout=600)


@pytest.fixture(scope="module")
def rollout_file(base, tmp_path_factory):
    """On-policy rollouts of GOOD (advantage +1) and BAD (-1), twice each."""
    from tcli.models.load import load_model

    with torch.no_grad():
        lp = [x for x in _per_token(load_model(base), [GOOD, BAD])]
    recs = []
    for i, ((p, r), a) in enumerate([(GOOD, 1.0), (BAD, -1.0)] * 2):
        recs.append({"schema": "tcli.rollout/1", "prompt_id": 0, "sample_id": i,
                     "prompt_token_ids": p, "token_ids": r, "logprobs": lp[i % 2],
                     "advantages": [a] * len(r)})
    path = tmp_path_factory.mktemp("roll") / "roll.jsonl"
    path.write_bytes(b"".join(orjson.dumps(x) + b"\n" for x in recs))
    return str(path)


def _per_token(model, rows):
    from tcli.models.logprobs import batch_logprobs, make_batch

    batch = make_batch([p for p, _ in rows], [r for _, r in rows], torch.device("cpu"), 0)
    lp, _ = batch_logprobs(model, batch)
    return [lp[i, :len(r)].tolist() for i, (_, r) in enumerate(rows)]


LORA_ARGS = ["--lora-rank", "4", "--lora-alpha", "8", "--lr", "1e-2", "--seed", "1"]


def test_train_step_with_lora(base, rollout_file, tmp_path):
    """train-step --lora-rank: an adapter checkpoint, the base untouched, log-probs moved the
    advantage's way; the next train-step continues the adapter; without --lora-rank an adapter
    directory is a usage error; sample-tree samples from base + adapter."""
    from safetensors.torch import load_file

    from tcli.models.load import load_model

    before = load_file(os.path.join(base, "model.safetensors"))
    one, two = tmp_path / "s1", tmp_path / "s2"
    r = _tcli(["train-step", rollout_file, "-m", base, "-o", one, *LORA_ARGS])
    assert r.returncode == 0, r.stderr.decode()[-3000:]
    assert r.stderr == b""  # no peft/transformers warnings on a CLI's stderr
    assert (one / "adapter_model.safetensors").exists() and not (one / "model.safetensors").exists()
    after = load_file(os.path.join(base, "model.safetensors"))
    assert all(torch.equal(before[k], after[k]) for k in before)
    with torch.no_grad():
        b, t = _logp(load_model(base), [GOOD, BAD]), _logp(load_model(str(one)), [GOOD, BAD])
    assert t[0] > b[0] and t[1] < b[1]
    r = _tcli(["train-step", rollout_file, "-m", one, "-o", two, *LORA_ARGS])
    assert r.returncode == 0, r.stderr.decode()[-3000:]
    cfg = orjson.loads((two / "adapter_config.json").read_bytes())
    assert cfg["base_model_name_or_path"] == os.path.abspath(base)  # not the previous step
    state = orjson.loads((two / "tcli_state.json").read_bytes())
    assert (state["step"], state["optimizer_steps"]) == (2, 2)
    r = _tcli(["train-step", rollout_file, "-m", one, "-o", tmp_path / "x", "--seed", "1"])
    assert r.returncode == 2 and b"--lora-rank" in r.stderr and b"Traceback" not in r.stderr
    prompts = tmp_path / "p.jsonl"
    prompts.write_bytes(orjson.dumps({"id": "a", "prompt": "ab"}) + b"\n")
    r = _tcli(["sample-tree", prompts, "-m", two, "-n", "2", "--max-new-tokens", "4",
               "--prompt-template", "plain"])
    assert r.returncode == 0, r.stderr.decode()[-3000:]
    assert len(r.stdout.splitlines()) == 2


def even_length(text, answer, record):
    """A verifier for the loop test: 1 for an even-length response, so that the rewards of a
    random tiny model's samples differ within a group and the policy gradient is not zero."""
    return float(len(text) % 2 == 0), {"task": "even_length", "correct": len(text) % 2 == 0}


def test_loop_resume_with_lora(tmp_path_factory, tmp_path):
    """loop --lora-rank: adapter checkpoints every step; 2 steps + --resume to 3 gives the
    adapter of an uninterrupted 3-step run, bit for bit; the base model is never rewritten."""
    from safetensors.torch import load_file

    from conftest import arith_run_dir
    from examples.arith.task import make_prompts

    d, model = arith_run_dir(tmp_path_factory, "lora_loop", {
        "train.jsonl": make_prompts(24, seed=1, split="train")}, **TINY)
    before = load_file(os.path.join(model, "model.safetensors"))

    def loop(run, steps, *extra):
        args = {"model": model, "train-data": d / "train.jsonl", "run-dir": run, "steps": steps,
                "prompts-per-step": 2, "n": 4, "max-new-tokens": 8, "min-new-tokens": 2,
                "lr": 1e-2, "eval-every": 0, "task": "python:tests.unit.test_lora:even_length",
                "workers": 0, "prompt-template": "plain",
                "seed": 3, "lora-rank": 4, "lora-alpha": 8, "keep-last": 5}
        r = _tcli(["loop", *[x for k, v in args.items() for x in (f"--{k}", v)], *extra])
        assert r.returncode == 0, r.stderr.decode()[-3000:]

    ref, run = tmp_path / "ref", tmp_path / "run"
    loop(ref, 3)
    loop(run, 2)
    r = _tcli(["loop", "--resume", run, "--steps", "3"])
    assert r.returncode == 0, r.stderr.decode()[-3000:]
    for s in (1, 2, 3):
        assert (ref / "checkpoints" / f"step_{s}" / "adapter_model.safetensors").exists()
    a = load_file(str(ref / "checkpoints" / "step_3" / "adapter_model.safetensors"))
    b = load_file(str(run / "checkpoints" / "step_3" / "adapter_model.safetensors"))
    a1 = load_file(str(ref / "checkpoints" / "step_1" / "adapter_model.safetensors"))
    assert set(a) == set(b) and any(not torch.equal(a[k], a1[k]) for k in a)  # it trained
    for k in a:
        assert torch.equal(a[k], b[k]), k
    after = load_file(os.path.join(model, "model.safetensors"))
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_merge_lora_command(saved, base, tmp_path):
    """tcli merge-lora ADAPTER OUT: a full checkpoint equal to the merged model; a directory
    without an adapter is a usage error."""
    from safetensors.torch import load_file

    out, pm, _ = saved
    r = _tcli(["merge-lora", out, tmp_path / "m"])
    assert r.returncode == 0, r.stderr.decode()[-3000:]
    assert r.stdout.decode().strip() == str(tmp_path / "m")
    w = load_file(str(tmp_path / "m" / "model.safetensors"))
    ref = lora_merged_state(pm)
    assert set(w) <= set(ref)
    for k in w:
        assert torch.allclose(w[k], ref[k], atol=1e-6), k
    r = _tcli(["merge-lora", base, tmp_path / "x"])
    assert r.returncode == 2 and b"not a LoRA adapter" in r.stderr


def lora_merged_state(pm) -> dict:
    """The merged weights of a live PeftModel (on a copy: the live one keeps its adapter)."""
    import copy

    return copy.deepcopy(pm).merge_and_unload().state_dict()
