"""The vllm engine against the real vLLM (CPU build) and a teacher-forced transformers forward pass.

Runs only where vLLM is importable (`make test-vllm` builds that environment); skipped elsewhere.
One engine serves the whole module: vLLM starts in ~3-6 s on CPU and holds process-wide state.
"""

from __future__ import annotations

import os

import pytest

pytest.importorskip("vllm", reason="optional vllm extra not installed (make test-vllm)")

import orjson  # noqa: E402
import torch  # noqa: E402

from tcli.config.stages import SampleOptions  # noqa: E402
from tcli.engines.base import SamplingConfig  # noqa: E402
from tcli.models.checkpoint import STATE_FILE  # noqa: E402

ALPHABET = "abcdefghij0123456789 "   # ~24 tokens: EOS is likely enough that both finish reasons occur
TOL = 1e-4                           # observed max |Δ log-prob| ≈ 1e-6 in float32
LONG = 300                           # > vLLM's CPU block size (128): long prompts hit the prefix cache


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """The tiny model (with a tcli_state.json) and a perturbed copy of it with policy_version 7."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tcli.models.checkpoint import save_pretrained_atomic
    from tcli.models.tiny import init_tiny_model

    root = tmp_path_factory.mktemp("vllm")
    base = init_tiny_model(str(root / "base"), seed=0, alphabet=ALPHABET)
    with open(os.path.join(base, STATE_FILE), "wb") as f:
        f.write(orjson.dumps({"policy_version": 3, "step": 3}))
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    pert = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in pert.parameters():     # includes the (tied) embedding / output head
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    other = save_pretrained_atomic(str(root / "perturbed"), pert, AutoTokenizer.from_pretrained(base),
                                   state={"policy_version": 7})
    return {"base": base, "model": model, "perturbed": other, "pert_model": pert}


@pytest.fixture(scope="module")
def engine(models):
    from tcli.engines.vllm_engine import VLLMEngine

    torch.manual_seed(1234)
    state = torch.get_rng_state()
    eng = VLLMEngine(models["base"], seed=0, kv_cache_memory_bytes=64 << 20)
    eng.test_rng_kept = torch.equal(torch.get_rng_state(), state)  # vLLM reseeds; we restore
    return eng


def teacher_forced(model, prompt, tokens):
    """log-softmax of the raw logits of each response token, from one full forward pass."""
    ids = torch.tensor([list(prompt) + list(tokens)])
    with torch.no_grad():
        logits = model(ids).logits[0].float()
    lp = torch.log_softmax(logits, dim=-1)[len(prompt) - 1:-1]
    return lp.gather(1, torch.tensor(tokens)[:, None])[:, 0]


def max_logprob_error(model, prompts, outs) -> float:
    err = 0.0
    for p, comps in zip(prompts, outs):
        for c in comps:
            ref = teacher_forced(model, p, c.token_ids)
            err = max(err, (ref - torch.tensor(c.logprobs)).abs().max().item())
    return err


PROMPTS = [[5, 6, 7], [8, 9, 10, 11], [12, 3]]


def test_generate_shapes_and_finish_reasons(engine):
    eos = engine.tokenizer.eos_token_id
    cfg = SamplingConfig(temperature=1.0, max_new_tokens=24, seed=3)
    outs = engine.generate(PROMPTS, 4, cfg)
    assert len(outs) == len(PROMPTS) and all(len(comps) == 4 for comps in outs)
    reasons = set()
    for comps in outs:
        for c in comps:
            assert len(c.logprobs) == len(c.token_ids) >= 1
            assert all(lp <= 0.0 for lp in c.logprobs)
            reasons.add(c.finish_reason)
            if c.finish_reason == "stop":   # the EOS token is kept, once, at the end
                assert c.token_ids[-1] == eos and eos not in c.token_ids[:-1]
            else:
                assert c.finish_reason == "length"
                assert len(c.token_ids) == 24 and eos not in c.token_ids
    assert reasons == {"stop", "length"}
    assert engine.name == "vllm" and engine.model_path.endswith("base")
    assert engine.policy_version == 3                      # read from tcli_state.json
    assert engine.generate([], 2, cfg) == []
    assert engine.test_rng_kept                             # the caller's torch RNG is untouched


def test_min_tokens_and_greedy(engine):
    eos = engine.tokenizer.eos_token_id
    outs = engine.generate(PROMPTS, 4, SamplingConfig(temperature=1.0, max_new_tokens=20,
                                                      min_new_tokens=8, seed=5))
    for comps in outs:
        for c in comps:
            assert len(c.token_ids) >= 8 and eos not in c.token_ids[:8]
    greedy = engine.generate(PROMPTS, 3, SamplingConfig(temperature=0.0, max_new_tokens=12))
    for comps in greedy:
        assert comps[0].token_ids == comps[1].token_ids == comps[2].token_ids


def test_seed_determinism(engine):
    cfg = SamplingConfig(temperature=1.0, max_new_tokens=16, seed=11)
    ids = lambda outs: [[c.token_ids for c in comps] for comps in outs]  # noqa: E731
    a = engine.generate(PROMPTS, 4, cfg)
    b = engine.generate(PROMPTS, 4, cfg)
    assert ids(a) == ids(b)
    assert [[c.logprobs for c in comps] for comps in a] == [[c.logprobs for c in comps] for comps in b]
    # a prompt's samples do not depend on what else is in the batch
    alone = engine.generate([PROMPTS[1]], 4, cfg)
    assert ids(alone)[0] == ids(a)[1]
    # the n samples of one prompt differ, and so do two prompts' random streams / another seed
    assert len({tuple(t) for t in ids(a)[0]}) > 1
    c = engine.generate(PROMPTS, 4, SamplingConfig(temperature=1.0, max_new_tokens=16, seed=12))
    assert ids(c) != ids(a)


@pytest.mark.parametrize("temperature,top_p,min_new", [(1.0, 1.0, 0), (1.0, 0.8, 4), (0.0, 1.0, 0)])
def test_logprobs_match_teacher_forced_hf(engine, models, temperature, top_p, min_new):
    """log_softmax(logits / T) with T = 1 (greedy counts as 1), before top-p / min-tokens masking,
    like train-step. The engine was opened for T = 1 (raw_logprobs): another T is refused."""
    from tcli.errors import UsageError

    with pytest.raises(UsageError, match="temperature 0.7"):
        engine.generate(PROMPTS, 2, SamplingConfig(temperature=0.7, max_new_tokens=4))
    long_prompt = [3 + (i * 7) % 20 for i in range(LONG)]
    prompts = PROMPTS + [long_prompt]
    cfg = SamplingConfig(temperature=temperature, top_p=top_p, max_new_tokens=20,
                         min_new_tokens=min_new, seed=2)
    outs = engine.generate(prompts, 3, cfg)
    err = max_logprob_error(models["model"], prompts, outs)
    print(f"max |logprob vllm - hf| = {err:.3g}")
    assert err < TOL


def test_load_weights_switches_policy_and_resets_prefix_cache(engine, models):
    long_prompt = [3 + (i * 7) % 20 for i in range(LONG)]
    prompts = [long_prompt, PROMPTS[0]]
    cfg = SamplingConfig(temperature=1.0, max_new_tokens=12, seed=4)
    before = engine.generate(prompts, 2, cfg)           # also fills the prefix cache
    try:
        engine.load_weights(models["perturbed"], 7)
        assert engine.policy_version == 7 and engine.model_path == models["perturbed"]
        after = engine.generate(prompts, 2, cfg)
        assert [[c.logprobs for c in cs] for cs in after] != [[c.logprobs for c in cs] for cs in before]
        # every token, including those after the cached long prefix, comes from the new weights
        err = max_logprob_error(models["pert_model"], prompts, after)
        print(f"after reload: max |logprob vllm - hf| = {err:.3g}")
        assert err < TOL
    finally:
        engine.load_weights(models["base"], 3)
    again = engine.generate(prompts, 2, cfg)
    assert [[c.token_ids for c in cs] for cs in again] == [[c.token_ids for c in cs] for cs in before]
    assert max_logprob_error(models["model"], prompts, again) < TOL


RECORDS = [{"id": "p1", "prompt": "abc", "answer": "1", "meta": {"k": 1}},
           {"id": 2, "prompt": "0123 45"}]


def test_sample_records_tree_mode(engine, models):
    sampling = pytest.importorskip("tcli.stages.sample", reason="tcli.stages.sample not written yet")
    cfg = SamplingConfig(temperature=1.0, max_new_tokens=14, seed=1)
    opts = SampleOptions(mode="tree", width=2, depth=3, segment_tokens=4, prompt_template="plain",
                         temperature=cfg.temperature, max_new_tokens=cfg.max_new_tokens)
    recs = list(sampling.sample_records(engine, RECORDS, opts, seed=cfg.seed))
    again = list(sampling.sample_records(engine, RECORDS, opts, seed=cfg.seed))
    assert recs == again                                    # same seed, same records
    tok = engine.tokenizer
    by_prompt: dict = {}
    for r in recs:
        by_prompt.setdefault(r["prompt_id"], []).append(r)
        assert r["policy_version"] == 3 and r["model"] == models["base"]
        assert r["prompt_token_ids"] == tok(r["prompt"])["input_ids"]
        assert len(r["logprobs"]) == len(r["token_ids"]) and r["segment_ends"][-1] == len(r["token_ids"])
        assert len(r["node_path"]) == len(r["segment_ends"]) <= 3
        assert r["finish_reason"] in ("stop", "length")
        assert r["finish_reason"] == "stop" or len(r["token_ids"]) == 14
        ref = teacher_forced(models["model"], r["prompt_token_ids"], r["token_ids"])
        assert (ref - torch.tensor(r["logprobs"])).abs().max().item() < TOL
    assert list(by_prompt) == ["p1", 2]
    for group in by_prompt.values():
        assert [r["sample_id"] for r in group] == list(range(len(group)))
        # records sharing a node path prefix share exactly that node's tokens
        for a in group:
            for b in group:
                k = 0
                while k < min(len(a["node_path"]), len(b["node_path"])) and \
                        a["node_path"][k] == b["node_path"][k]:
                    k += 1
                if k:
                    end = a["segment_ends"][k - 1]
                    assert b["segment_ends"][k - 1] == end
                    assert a["token_ids"][:end] == b["token_ids"][:end]
    # the full tree: with width 2, depth 3 a prompt has at most 8 leaves and at least 2
    assert all(2 <= len(g) <= 8 for g in by_prompt.values())


def test_greedy_records_match_hf_engine(engine, models):
    """Greedy decoding is engine-independent: vllm and hf give the same records (up to round-off)."""
    sampling = pytest.importorskip("tcli.stages.sample", reason="tcli.stages.sample not written yet")
    from tcli.engines.hf import HFEngine

    hf = HFEngine(models["base"])
    cfg = SamplingConfig(temperature=0.0, max_new_tokens=16, seed=0)
    opts = SampleOptions(n=2, prompt_template="plain", temperature=cfg.temperature,
                         max_new_tokens=cfg.max_new_tokens)
    v = list(sampling.sample_records(engine, RECORDS, opts, seed=cfg.seed))
    h = list(sampling.sample_records(hf, RECORDS, opts, seed=cfg.seed))
    assert len(v) == len(h) == 4
    for a, b in zip(v, h):
        assert a["token_ids"] == b["token_ids"] and a["finish_reason"] == b["finish_reason"]
        assert max(abs(x - y) for x, y in zip(a["logprobs"], b["logprobs"])) < TOL
        assert {k: a[k] for k in a if k not in ("logprobs", "model")} == \
            {k: b[k] for k in b if k not in ("logprobs", "model")}
