"""The vllm engine against the real vLLM (CPU build) and a teacher-forced transformers forward pass.

Runs only where vLLM is importable (`make test-vllm` builds that environment); skipped elsewhere.
One engine serves the whole module: vLLM starts in ~3-6 s on CPU and holds process-wide state.
"""

from __future__ import annotations

import os

import pytest

pytest.importorskip("vllm", reason="optional vllm extra not installed (make test-vllm)")

import numpy as np  # noqa: E402
import orjson  # noqa: E402
import torch  # noqa: E402

from tcli.config.stages import SampleOptions  # noqa: E402
from tcli.engines.base import Completion, SamplingConfig  # noqa: E402
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


# ----------------------------------------------------------------------------- LoRA adapters

@pytest.fixture(scope="module")
def adapters(models, tmp_path_factory):
    """Two LoRA adapter directories on the tiny base, written as train-step --lora-rank writes
    them (rank 4, vLLM's slot 8; B drawn at random so that they move the logits), and each one's
    merged model (what the hf engine samples)."""
    from tcli.models.load import load_model, load_tokenizer
    from tcli.train import lora

    root = tmp_path_factory.mktemp("lora")
    out = {}
    for name, seed in (("a", 1), ("b", 2)):
        torch.manual_seed(seed)
        pm = lora.wrap(load_model(models["base"], train=True), 4, 8.0)
        with torch.no_grad():
            for n, p in pm.named_parameters():
                if "lora_B" in n:
                    p.normal_(0.0, 0.3)
        out[name] = lora.save_adapter(str(root / name), pm, load_tokenizer(models["base"]),
                                      base=models["base"], state={"policy_version": 5})
        out[name + "_merged"] = load_model(out[name])
    return out


@pytest.fixture(scope="module")
def lora_engine(adapters):
    """A second engine, on adapter a. Module-scoped: closing a vLLM engine resets vLLM's
    process-wide parallel state, which the module's other engine still needs."""
    from tcli.engines.vllm_engine import VLLMEngine

    return VLLMEngine(adapters["a"], seed=0, kv_cache_memory_bytes=64 << 20)


def test_lora_adapter_through_vllm_matches_hf_merged(engine, lora_engine, models, adapters,
                                                     tmp_path):
    """vLLM serves a base + adapter directory with its own LoRA support (not merged): greedy
    tokens equal the hf engine's on the merged model, log-probs equal the merged model's
    teacher-forced ones; switching adapter (from a directory deleted right after, as ``follow``
    does) serves the new one; full checkpoints and adapters do not replace each other."""
    import shutil

    from tcli.engines.hf import HFEngine
    from tcli.errors import UsageError

    long_prompt = [3 + (i * 7) % 20 for i in range(LONG)]
    prompts = PROMPTS + [long_prompt]
    cfg = SamplingConfig(temperature=0.0, max_new_tokens=16)
    eng = lora_engine
    assert eng.lora is not None and eng.max_lora_rank == 8 and eng.policy_version == 5
    assert eng.base_path == os.path.abspath(models["base"])
    toks = lambda outs: [[c.token_ids for c in cs] for cs in outs]  # noqa: E731
    for name in ("a", "b"):
        if name == "b":
            copy = str(tmp_path / "b-copy")
            shutil.copytree(adapters["b"], copy)
            eng.load_weights(copy, 6)
            shutil.rmtree(copy)
            assert eng.policy_version == 6 and eng.lora.lora_int_id == 2
        v = eng.generate(prompts, 2, cfg)
        assert toks(v) == toks(HFEngine(adapters[name]).generate(prompts, 2, cfg)), name
        err = max_logprob_error(adapters[name + "_merged"], prompts, v)
        print(f"adapter {name}: max |logprob vllm lora - hf merged| = {err:.3g}")
        assert err < TOL
        assert max_logprob_error(models["model"], prompts, v) > 1e-2  # the adapter is applied
    with pytest.raises(UsageError, match="serves LoRA adapters"):
        eng.load_weights(models["base"], 7)
    with pytest.raises(UsageError, match="serves full checkpoints"):
        engine.load_weights(adapters["a"], 7)
    assert engine.lora is None and engine.policy_version == 3


@pytest.fixture(scope="module")
def base_lora_engine(models):
    """A third engine: the base with LoRA enabled for adapters to come (what the loop opens for a
    LoRA trainer). Module-scoped for the same reason as ``lora_engine``."""
    from tcli.engines.vllm_engine import VLLMEngine

    return VLLMEngine(models["base"], seed=0, kv_cache_memory_bytes=64 << 20, lora_rank=4)


def test_base_engine_with_lora_takes_adapters_later(engine, base_lora_engine, models, adapters):
    """Opened on the base with lora_rank: samples the base until load_weights hands it an adapter
    (as the loop's follow does after a LoRA train step), then the adapter's merged model."""
    eng = base_lora_engine
    assert eng.lora is None and eng.max_lora_rank == 8
    greedy = SamplingConfig(temperature=0.0, max_new_tokens=16)
    before = eng.generate(PROMPTS, 1, greedy)
    assert [cs[0].token_ids for cs in before] == \
        [cs[0].token_ids for cs in engine.generate(PROMPTS, 1, greedy)]
    assert max_logprob_error(models["model"], PROMPTS, before) < TOL
    eng.load_weights(adapters["a"], 5)
    after = eng.generate(PROMPTS, 1, greedy)
    assert max_logprob_error(adapters["a_merged"], PROMPTS, after) < TOL
    assert max_logprob_error(models["model"], PROMPTS, after) > 1e-2


# ----------------------------------------------------------------------------- entropies

def test_generate_entropy_is_topk_entropy_of_hf_distribution(engine, models):
    """generate_entropy (engines/base.py contract): the same samples as generate, and per token
    the topk_entropy of the k largest log_softmax(logits) values of a teacher-forced pass."""
    from tcli.engines.base import topk_entropy
    from tcli.errors import UsageError

    cfg = SamplingConfig(temperature=1.0, max_new_tokens=12, seed=7)
    outs = engine.generate_entropy(PROMPTS, 3, cfg, top_k=5)
    plain = engine.generate(PROMPTS, 3, cfg)
    err, gap = 0.0, 0.0
    for p, comps, ref in zip(PROMPTS, outs, plain):
        for c, r in zip(comps, ref):
            assert c.token_ids == r.token_ids and c.logprobs == r.logprobs
            assert len(c.entropies) == len(c.token_ids)
            ids = torch.tensor([list(p) + c.token_ids])
            with torch.no_grad():
                lp = torch.log_softmax(models["model"](ids).logits[0].float(), -1)
            lp = lp[len(p) - 1:-1]
            want = topk_entropy(lp.topk(5, -1).values.double().numpy())
            exact = -(lp.exp() * lp).sum(-1).double().numpy()
            got = np.asarray(c.entropies)
            err = max(err, float(abs(want - got).max()))
            gap = max(gap, float((exact - got).max()))
            assert (got <= exact + 1e-5).all()  # a lower bound of the exact entropy
    print(f"max |entropy vllm - hf top-5| = {err:.3g}, largest exact - top-5 estimate {gap:.3g}")
    assert err < TOL and gap > 1e-3
    a, b = engine.generate_entropy([PROMPTS[0]] * 2, 3, cfg, top_k=5, seeds=[1, 2])
    assert [c.token_ids for c in a] != [c.token_ids for c in b]  # seeds split identical prompts
    same = engine.generate_entropy([PROMPTS[0]], 3, cfg, top_k=5, seeds=[cfg.seed])
    assert [c.token_ids for c in same[0]] == [c.token_ids for c in outs[0]]
    greedy = engine.generate_entropy(PROMPTS, 2, SamplingConfig(temperature=0.0,
                                                                max_new_tokens=8), top_k=3)
    assert all(cs[0].entropies == cs[1].entropies and len(cs[0].entropies) for cs in greedy)
    for k in (None, 0, 21):
        with pytest.raises(UsageError, match="max_logprobs"):
            engine.generate_entropy(PROMPTS, 1, cfg, top_k=k)


def test_sample_tree_branch_entropy_through_vllm(engine, models):
    """sample-tree --branch entropy --record-entropy on the vllm engine (the generic probe path
    through generate_entropy, top-20 estimate): same records for the same seed, splits happen,
    and every recorded entropy equals the top-20 estimate of a teacher-forced hf pass."""
    from tcli.engines.base import ENTROPY_TOP_K, topk_entropy
    from tcli.stages.sample import sample_records

    opts = SampleOptions(mode="tree", branch="entropy", width=2, depth=2, branch_entropy=2.0,
                         segment_tokens=4, record_entropy=True, prompt_template="plain",
                         temperature=1.0, max_new_tokens=10)
    recs = list(sample_records(engine, RECORDS, opts, seed=3))
    assert recs == list(sample_records(engine, RECORDS, opts, seed=3))
    assert any(len(r["node_path"]) > 1 for r in recs)  # some path split
    err = 0.0
    for r in recs:
        assert len(r["entropies"]) == len(r["token_ids"]) == len(r["logprobs"])
        p = r["prompt_token_ids"]
        ids = torch.tensor([p + r["token_ids"]])
        with torch.no_grad():
            lp = torch.log_softmax(models["model"](ids).logits[0].float(), -1)[len(p) - 1:-1]
        want = topk_entropy(lp.topk(ENTROPY_TOP_K, -1).values.double().numpy())
        err = max(err, float(abs(want - np.asarray(r["entropies"])).max()))
    print(f"branch entropy records: {len(recs)} leaves, max |entropy - hf top-20| = {err:.3g}")
    assert err < TOL


def test_loop_with_lora_samples_through_vllm_adapter(tmp_path):
    """`tcli loop --engine vllm --lora-rank 4` (own process: it opens and closes its own vLLM):
    after every LoRA train step ``follow`` hands the new adapter to vLLM, so step k's recorded
    log-probs are those of step k-1's adapter (merged, teacher-forced), not of the base (step 1
    has no reward variance and leaves the adapter at zero; step 2 moves it)."""
    import subprocess
    import sys

    from examples.arith.task import ALPHABET
    from tcli.io import RecordReader
    from tcli.models.load import load_model
    from tcli.models.tiny import init_tiny_model

    base = init_tiny_model(str(tmp_path / "model"), seed=0, alphabet=ALPHABET, hidden=64,
                           layers=1, heads=2, kv_heads=1, intermediate=64)  # vLLM CPU: head_dim 32
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_bytes(b"".join(orjson.dumps({"id": f"p{i}", "prompt": f"{i}+{i}=?",
                                               "answer": str(2 * i)}) + b"\n" for i in range(4)))
    run = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "tcli", "loop", "--model", base, "--train-data",
                        str(prompts), "--run-dir", str(run), "--steps", "3", "--prompts-per-step",
                        "4", "--n", "8", "--engine", "vllm", "--task", "arith", "--workers", "0",
                        "--prompt-template", "plain", "--max-new-tokens", "6", "--lr", "0.05",
                        "--lora-rank", "4", "--lora-alpha", "8", "--estimator", "grpo",
                        "--eval-every", "0", "--keep-last", "3", "--temperature", "1",
                        "--seed", "1"], capture_output=True, timeout=900,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr.decode()[-3000:]
    moved = 0.0
    for step in (2, 3):
        ckpt = str(run / "checkpoints" / f"step_{step - 1}")
        assert os.path.isfile(os.path.join(ckpt, "adapter_config.json"))
        recs = [rec for _, rec in RecordReader(str(run / "rollouts" / f"step_{step}.arrow"))]
        assert recs and all(rec["policy_version"] == step - 1 for rec in recs)
        ids = [rec["prompt_token_ids"] for rec in recs]
        outs = [[Completion(rec["token_ids"], rec["logprobs"], "stop")] for rec in recs]
        err = max_logprob_error(load_model(ckpt), ids, outs)
        moved = max(moved, max_logprob_error(load_model(base), ids, outs))
        print(f"loop step {step} through vLLM's LoRA: |logprob - step_{step - 1} merged| "
              f"{err:.3g}, vs the base {moved:.3g}")
        assert err < TOL
    assert moved > 1e-3
