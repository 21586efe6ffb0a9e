"""sample-tree: independent and tree sampling on real tiny models (hf engine), CLI through pipes."""

from __future__ import annotations

import orjson
import pytest

torch = pytest.importorskip("torch")

from conftest import DATA, run_tcli  # noqa: E402
from tcli.engines.base import SamplingConfig  # noqa: E402
from tcli.stages.sample import sample_records  # noqa: E402

GSM8K = str(DATA / "gsm8k_test.jsonl")

PROMPTS = [
    {"id": "p0", "prompt": "What is 2+3?", "answer": "5", "meta": {"k": 1}},
    {"id": "p1", "prompt": "Pick one: x or y", "answer": "B", "choices": {"A": "x", "B": "y"}},
    {"id": 7, "prompt": "A much longer prompt, so the batch needs left padding.", "answer": "1"},
]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _init_model(out_dir: str, **kw) -> str:
    """Build a tiny model with the `init-model` command function (CLI parsing is tested below)."""
    from tcli.commands.init_model import init_model

    init_model(out_dir, hidden=32, layers=2, heads=2, quiet=True, **kw)
    return out_dir


@pytest.fixture(scope="module")
def text_engine(tmp_path_factory):
    """Default alphabet plus the characters of GSM8K; EOS is rare (random weights, ~100 tokens)."""
    from tcli.engines.hf import HFEngine

    d = _init_model(str(tmp_path_factory.mktemp("m") / "text"), text_file=GSM8K, seed=3)
    return HFEngine(d)


@pytest.fixture(scope="module")
def ab_engine(tmp_path_factory):
    """Vocabulary pad/eos/unk/a/b: EOS has probability ~1/5 per token, so branches end early."""
    from tcli.engines.hf import HFEngine

    d = _init_model(str(tmp_path_factory.mktemp("m") / "ab"), alphabet="ab", seed=1)
    return HFEngine(d, batch_tokens=256)


def _run(engine, prompts=PROMPTS, cfg=None, template="auto", chunk_size=16, native=True, **kw):
    """sample_records with SampleOptions built from the engine-call config and keyword settings."""
    from tcli.config.stages import SampleOptions

    cfg = cfg or SamplingConfig()
    opts = SampleOptions(temperature=cfg.temperature, top_p=cfg.top_p,
                         max_new_tokens=cfg.max_new_tokens, min_new_tokens=cfg.min_new_tokens,
                         prompt_template=template, prompts_per_batch=chunk_size, **kw)
    return list(sample_records(engine, prompts, opts, seed=cfg.seed, native=native))


def _teacher_forced(engine, rec, temperature=1.0):
    """log_softmax(logits / T) and logits of the response tokens from one full forward pass (no
    cache, no batch)."""
    p, t = rec["prompt_token_ids"], rec["token_ids"]
    with torch.inference_mode():
        logits = engine.model(input_ids=torch.tensor([p + t])).logits[0].float()
    lp = torch.log_softmax(logits / temperature, -1)
    rows = torch.arange(len(p) - 1, len(p) - 1 + len(t))
    return lp[rows, torch.tensor(t)], logits[rows]


def _check_tree(group, width, depth, seg, max_new, eos_ids):
    """The leaves form exactly the requested tree; children share their parent's tokens."""
    paths = [tuple(r["node_path"]) for r in group]
    assert paths == sorted(paths) and len(set(paths)) == len(paths)
    assert [r["sample_id"] for r in group] == list(range(len(group)))
    by_path = {tuple(r["node_path"]): r for r in group}
    internal = {p[:k] for p in paths for k in range(len(p))}
    assert not internal & set(paths), "a leaf is also an internal node"
    for node in internal:  # every expanded node has exactly `width` children
        kids = {p[len(node)] for p in paths if p[: len(node)] == node and len(p) > len(node)}
        assert kids == set(range(width)), (node, kids)
    for p, r in by_path.items():
        ends, toks = r["segment_ends"], r["token_ids"]
        assert 1 <= len(p) <= depth and len(ends) == len(p)
        assert ends[-1] == len(toks) == len(r["logprobs"]) and ends == sorted(set(ends))
        assert all(e == seg * (k + 1) for k, e in enumerate(ends[:-1])), ends  # full inner segments
        assert len(toks) <= max_new
        if r["finish_reason"] == "stop":
            assert toks[-1] in eos_ids and not set(toks[:-1]) & set(eos_ids)
        else:
            assert len(p) == depth and len(toks) == max_new and not set(toks) & set(eos_ids)
        if len(p) < depth:
            assert r["finish_reason"] == "stop"  # only EOS ends a branch early (max_new is large)
    for a in group:  # shared prefixes are identical token for token (and log-prob for log-prob)
        for b in group:
            pa, pb = a["node_path"], b["node_path"]
            k = 0
            while k < min(len(pa), len(pb)) and pa[k] == pb[k]:
                k += 1
            if k:
                n = a["segment_ends"][k - 1]
                assert a["token_ids"][:n] == b["token_ids"][:n]
                assert a["logprobs"][:n] == b["logprobs"][:n]
                assert a["token_ids"][n:n + 1] != b["token_ids"][n:n + 1] or pa == pb or True


# ----------------------------------------------------------------------------- independent

def test_independent_records(text_engine):
    cfg = SamplingConfig(max_new_tokens=12, seed=1)
    recs = _run(text_engine, n=3, cfg=cfg, template="plain")
    assert len(recs) == 9
    assert [r["prompt_id"] for r in recs] == ["p0"] * 3 + ["p1"] * 3 + [7] * 3
    tok = text_engine.tokenizer
    for i, r in enumerate(recs):
        src = PROMPTS[i // 3]
        assert r["schema"] == "tcli.rollout/1" and r["sample_id"] == i % 3
        assert r["prompt"] == src["prompt"] and r["answer"] == src["answer"]
        assert r.get("choices") == src.get("choices") and r.get("meta") == src.get("meta")
        assert "id" not in r
        assert r["prompt_token_ids"] == tok(src["prompt"])["input_ids"]
        assert 1 <= len(r["token_ids"]) <= 12 and len(r["logprobs"]) == len(r["token_ids"])
        assert r["text"] == tok.decode(r["token_ids"], skip_special_tokens=True)
        assert r["node_path"] == [] and r["segment_ends"] == []
        assert r["finish_reason"] == ("stop" if r["token_ids"][-1] == tok.eos_token_id else "length")
        assert tok.pad_token_id not in r["token_ids"]
        assert r["policy_version"] == 0 and r["model"] == text_engine.model_path
        assert r["prompt_template"] == "plain"  # what verify --task auto reads
    assert len({tuple(r["token_ids"]) for r in recs}) == 9  # samples differ


def test_templates(text_engine):
    from tcli.errors import DataError, UsageError
    from tcli.prompts import render_prompt, resolve_template

    rec = {"id": 1, "prompt": "Q?", "choices": {"A": "yes", "B": "no"}}
    assert render_prompt(dict(rec, choices=None), resolve_template("boxed")) == (
        "Q?\nLet's think step by step and output the final answer within \\boxed{}.")
    for hides in ("boxed", "plain", "<{prompt}>"):  # the model would answer without the options
        with pytest.raises(UsageError, match=r"prompt 1 has choices.*--prompt-template choice"):
            render_prompt(rec, resolve_template(hides))
    inline = dict(rec, prompt="Q? A) yes B) no")  # options written into the prompt itself
    assert render_prompt(inline, resolve_template("plain")) == "Q? A) yes B) no"
    with pytest.raises(UsageError):  # one option missing from the text is still hidden
        render_prompt(dict(rec, prompt="Q? A) yes"), resolve_template("plain"))
    choice = render_prompt(rec, resolve_template("auto"))
    assert "A. yes\nB. no" in choice and "<answer>X</answer>" in choice
    assert render_prompt(rec, resolve_template("<{prompt}|{choices}>")) == "<Q?|A. yes\nB. no>"
    with pytest.raises(DataError) as e:
        render_prompt({"id": 1, "prompt": "Q?"}, resolve_template("choice"))
    assert e.value.field == "choices"


# ----------------------------------------------------------------------------- tree

@pytest.mark.parametrize("native", [True, False])
def test_tree_shape(ab_engine, native):
    width, depth, seg, max_new = 2, 3, 3, 40
    cfg = SamplingConfig(max_new_tokens=max_new, seed=5)
    recs = _run(ab_engine, mode="tree", width=width, depth=depth, segment_tokens=seg, cfg=cfg,
                template="plain", native=native)
    groups = {}
    for r in recs:
        groups.setdefault(r["prompt_id"], []).append(r)
    assert list(groups) == ["p0", "p1", 7]  # consecutive, in input order
    early = 0
    for g in groups.values():
        _check_tree(g, width, depth, seg, max_new, ab_engine.eos_token_ids)
        early += sum(len(r["node_path"]) < depth for r in g)
    assert early > 0  # the test exercises branches that end early
    assert len({tuple(r["token_ids"]) for r in recs}) > len(recs) // 2  # siblings differ
    if native:
        # nothing ended early for a full tree: width**depth leaves
        full = _run(ab_engine, prompts=PROMPTS[:1], mode="tree", width=2, depth=2, segment_tokens=2,
                    cfg=SamplingConfig(max_new_tokens=6, min_new_tokens=6, seed=0), template="plain")
        assert [r["node_path"] for r in full] == [[0, 0], [0, 1], [1, 0], [1, 1]]
        assert all(r["segment_ends"] == [2, 6] and r["finish_reason"] == "length" for r in full)
        assert all(r["max_new_tokens"] == 6 for r in full)  # the cap a length finish reached


# ----------------------------------------------------------------------------- log-probs

@pytest.mark.parametrize("mode", ["independent", "tree"])
@pytest.mark.parametrize("which", ["text", "ab"])
def test_logprobs_match_teacher_forcing(request, mode, which):
    engine = request.getfixturevalue(f"{which}_engine")
    cfg = SamplingConfig(max_new_tokens=14, temperature=0.8, top_p=0.9, seed=2)
    recs = _run(engine, mode=mode, n=3, width=2, depth=2, segment_tokens=4, cfg=cfg,
                template="plain", chunk_size=3)
    for r in recs:
        assert r["temperature"] == 0.8 and r["top_p"] == 0.9
        ref, _ = _teacher_forced(engine, r, 0.8)
        got = torch.tensor(r["logprobs"])
        assert torch.allclose(got, ref, atol=1e-4, rtol=0), (r["node_path"], (got - ref).abs().max())


def test_left_pad_trim_keeps_logprobs(ab_engine, monkeypatch):
    """When the long prompt's rows all end, its pad columns are cut from the cache; still exact."""
    from tcli.engines.hf import HFEngine

    orig, trimmed = HFEngine._trim_left, []

    def spy(st):
        before = st.mask.shape[1]
        orig(st)
        trimmed.append(before - st.mask.shape[1])

    monkeypatch.setattr(HFEngine, "_trim_left", staticmethod(spy))
    prompts = [{"id": 1, "prompt": "a"}, {"id": 2, "prompt": "ab" * 10}]
    for seed in range(10):
        recs = _run(ab_engine, prompts=prompts, mode="tree", width=2, depth=3, segment_tokens=2,
                    cfg=SamplingConfig(max_new_tokens=30, seed=seed), template="plain")
        for r in recs:
            ref, _ = _teacher_forced(ab_engine, r)
            assert torch.allclose(torch.tensor(r["logprobs"]), ref, atol=1e-4, rtol=0)
        if any(trimmed):
            break
    assert any(trimmed)


def test_greedy_is_argmax_and_tiny_top_p_is_greedy(text_engine):
    cfg = SamplingConfig(max_new_tokens=10, temperature=0.0, seed=0)
    greedy = _run(text_engine, n=2, cfg=cfg, template="plain")
    for r in greedy:
        _, logits = _teacher_forced(text_engine, r)
        assert r["token_ids"] == logits.argmax(-1).tolist()
    assert greedy[0]["token_ids"] == greedy[1]["token_ids"]
    nucleus = _run(text_engine, n=2, cfg=SamplingConfig(max_new_tokens=10, top_p=1e-6, seed=9),
                   template="plain")
    assert [r["token_ids"] for r in nucleus] == [r["token_ids"] for r in greedy]


def test_min_new_tokens(ab_engine):
    free = _run(ab_engine, n=6, cfg=SamplingConfig(max_new_tokens=20, seed=3), template="plain")
    assert min(len(r["token_ids"]) for r in free) < 6  # EOS comes early without the bound
    held = _run(ab_engine, n=6, cfg=SamplingConfig(max_new_tokens=20, min_new_tokens=6, seed=3),
                template="plain")
    assert min(len(r["token_ids"]) for r in held) >= 6
    eos = set(ab_engine.eos_token_ids)
    assert all(not eos & set(r["token_ids"][:6]) for r in held)
    tree = _run(ab_engine, mode="tree", width=2, depth=3, segment_tokens=2,
                cfg=SamplingConfig(max_new_tokens=20, min_new_tokens=5, seed=3), template="plain")
    assert all(len(r["token_ids"]) >= 5 and len(r["node_path"]) == 3 for r in tree)


def test_generic_tree_spreads_min_new_tokens_over_its_levels():
    """min_new_tokens counts from the response's start: a level gets only what the tokens
    before it have not yet covered. 20 tokens, at least 5, segments of 2, depth 3: level 1
    gets min(5, 2) = 2, level 2 min(5 - 2, 2) = 2, level 3 (the rest, 16) min(5 - 4, 16) = 1."""
    from tcli.engines.base import sample_tree_generic
    from tcli.engines.sampling import Completion

    class Spy:
        def __init__(self):
            self.calls = []

        def generate(self, prompts, n, cfg):
            self.calls.append((cfg.max_new_tokens, cfg.min_new_tokens))
            k = cfg.max_new_tokens
            return [[Completion([3] * k, [-1.0] * k, "length") for _ in range(n)] for _ in prompts]

    spy = Spy()
    cfg = SamplingConfig(max_new_tokens=20, min_new_tokens=5, seed=1)
    (leaves,) = sample_tree_generic(spy, [[5, 6]], width=2, depth=3, segment_tokens=2, cfg=cfg)
    assert spy.calls == [(2, 2), (2, 2), (16, 1)]
    assert len(leaves) == 8 and all(len(lf.token_ids) == 20 for lf in leaves)


# ----------------------------------------------------------------------------- determinism

def test_seed_determinism_and_batching_independence(ab_engine):
    kw = dict(mode="tree", width=2, depth=3, segment_tokens=3, template="plain")
    a = _run(ab_engine, cfg=SamplingConfig(max_new_tokens=16, seed=11), **kw)
    b = _run(ab_engine, cfg=SamplingConfig(max_new_tokens=16, seed=11), **kw)
    c = _run(ab_engine, cfg=SamplingConfig(max_new_tokens=16, seed=12), **kw)
    assert a == b
    assert [r["token_ids"] for r in a] != [r["token_ids"] for r in c]
    # one prompt per call and a tiny memory bound: other batches, same samples
    old = ab_engine.batch_tokens
    ab_engine.batch_tokens = 40
    try:
        d = _run(ab_engine, cfg=SamplingConfig(max_new_tokens=16, seed=11), chunk_size=1, **kw)
    finally:
        ab_engine.batch_tokens = old
    assert [(r["node_path"], r["token_ids"]) for r in d] == [(r["node_path"], r["token_ids"]) for r in a]
    # a prompt's samples do not depend on its neighbours
    e = _run(ab_engine, prompts=PROMPTS[2:], cfg=SamplingConfig(max_new_tokens=16, seed=11), **kw)
    assert [r["token_ids"] for r in e] == [r["token_ids"] for r in a if r["prompt_id"] == 7]


def test_load_weights_sets_policy_version(ab_engine, tmp_path):
    from tcli.models.checkpoint import save_pretrained_atomic

    ckpt = save_pretrained_atomic(str(tmp_path / "ckpt"), ab_engine.model, ab_engine.tokenizer,
                                  state={"policy_version": 4})
    old_path, old_version = ab_engine.model_path, ab_engine.policy_version
    try:
        ab_engine.load_weights(ckpt, 4)
        recs = _run(ab_engine, prompts=PROMPTS[:1], n=1, cfg=SamplingConfig(max_new_tokens=3))
        assert recs[0]["policy_version"] == 4 and recs[0]["model"] == ckpt
    finally:
        ab_engine.load_weights(old_path, old_version)
    from tcli.engines.hf import HFEngine

    assert HFEngine(ckpt).policy_version == 4  # read from tcli_state.json


# ----------------------------------------------------------------------------- CLI

def _cli(args, stdin=None, input=None):
    """``tcli *args`` (in this process, see conftest.run_tcli); ``stdin``: a file to read from."""
    return run_tcli(args, input=stdin.read() if stdin is not None else input,
                    env={"OMP_NUM_THREADS": "1"})


def test_cli_tree_through_pipes(text_engine):
    model = text_engine.model_path
    with open(GSM8K, "rb") as f:
        p = _cli(["sample-tree", "-m", model, "--mode", "tree", "--width", "2", "--depth", "2",
                  "--segment-tokens", "3", "--max-new-tokens", "8", "--limit", "2", "--seed", "4"],
                 stdin=f)
    assert p.returncode == 0, p.stderr.decode()
    assert p.stderr == b""  # not a terminal: no progress bar
    recs = [orjson.loads(x) for x in p.stdout.splitlines()]
    assert [r["prompt_id"] for r in recs] == ["gsm8k-test-0000"] * 4 + ["gsm8k-test-0001"] * 4
    with open(GSM8K, "rb") as f:
        first = orjson.loads(f.readline())
    assert recs[0]["prompt"] == first["prompt"] and recs[0]["meta"] == first["meta"]
    boxed = first["prompt"] + "\nLet's think step by step and output the final answer within \\boxed{}."
    assert recs[0]["prompt_token_ids"] == text_engine.tokenizer(boxed)["input_ids"]
    for g in (recs[:4], recs[4:]):
        _check_tree(g, 2, 2, 3, 8, text_engine.eos_token_ids)
    # the library gives the same records for the same seed
    lib = _run(text_engine, prompts=[first], mode="tree", width=2, depth=2, segment_tokens=3,
               cfg=SamplingConfig(max_new_tokens=8, seed=4))
    assert [r["token_ids"] for r in lib] == [r["token_ids"] for r in recs[:4]]
    # show-tree decodes with the sampling model's tokenizer (the records' `model`) by default
    scored = b"".join(orjson.dumps({**r, "reward": float(i % 2)}) + b"\n" for i, r in enumerate(recs))
    show = _cli(["show-tree"], input=scored)
    assert show.returncode == 0, show.stderr.decode()
    out = show.stdout.decode()
    assert out.startswith("prompt: ") and first["prompt"][:20] in out
    piece = text_engine.tokenizer.decode(recs[0]["token_ids"][:3])
    assert repr(piece)[1:-1][:3] in out
    ids = _cli(["show-tree", "--bytes"], input=scored)  # explicit decoding still wins
    assert ids.returncode == 0


def test_cli_missing_prompt_is_data_error(text_engine, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"id": "a", "prompt": "ok"}\n{"id": "b", "answer": "1"}\n')
    out = tmp_path / "out.jsonl"
    p = _cli(["sample-tree", str(bad), "-m", text_engine.model_path, "-n", "1",
              "--max-new-tokens", "2", "--prompts-per-batch", "1", "-o", str(out)])
    assert p.returncode == 65, p.stderr.decode()
    err = p.stderr.decode()
    assert f"{bad}:2" in err and "'prompt'" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()  # no half-written output


def test_cli_init_model(tmp_path):
    out = tmp_path / "tiny"
    p = _cli(["init-model", str(out), "--hidden", "16", "--layers", "1", "--heads", "2",
              "--alphabet", "xyz", "--seed", "2"])
    assert p.returncode == 0, p.stderr.decode()
    assert p.stdout.decode().strip() == str(out)
    from transformers import AutoConfig, AutoTokenizer

    cfg = AutoConfig.from_pretrained(out)
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads) == (16, 1, 2)
    assert len(AutoTokenizer.from_pretrained(out)) == 6  # pad, eos, unk + x, y, z
    from tcli.commands.init_model import init_model
    from tcli.errors import UsageError

    with pytest.raises(UsageError, match="--heads 3 must divide --hidden 10"):
        init_model(str(tmp_path / "bad"), hidden=10, heads=3)
    assert not (tmp_path / "bad").exists()


def test_prefill_positions_skip_left_padding(ab_engine):
    """A prompt batched beside a longer one is left-padded, but its tokens keep positions 0..n-1
    and its first response token sits at position n, as when it is sampled alone: models with
    absolute or length-scaled positions would otherwise see a different sequence."""
    a, b = ab_engine.tokenizer.convert_tokens_to_ids(["a", "b"])
    prompts = [[a, b], [a, b, b, a, b]]
    with torch.inference_mode():
        rows = ab_engine.prefill(prompts, [0, 1], seed=0)
        # 2 real tokens at 0, 1 (next: 2) behind 3 pad columns; 5 real tokens at 0..4 (next: 5)
        assert rows.mask.tolist() == [[0, 0, 0, 1, 1], [1, 1, 1, 1, 1]]
        assert rows.pos.tolist() == [2, 5]
        ab_engine.advance(rows, torch.tensor([a, a]))
        assert rows.pos.tolist() == [3, 6]


def test_eos_is_allowed_from_token_min_new_tokens_on(ab_engine):
    """min_new_tokens=m masks EOS for response tokens 0..m-1 only: token m may already be EOS, so
    the shortest response that stops has m + 1 tokens, not m + 2."""
    import numpy as np

    eos = ab_engine.eos_token_ids
    a = ab_engine.tokenizer.convert_tokens_to_ids("a")
    logits = torch.zeros(2, ab_engine.model.config.vocab_size)
    logits[:, eos] = 10.0   # greedy picks EOS unless it is masked ...
    logits[:, a] = 1.0      # ... and then "a", the next largest
    keys = np.zeros(2, dtype=np.uint64)
    cfg = SamplingConfig(temperature=0.0, max_new_tokens=10, min_new_tokens=3)
    for step, want in ((2, a), (3, eos[0])):  # step 2 < 3: masked; step 3: allowed
        tok, _ = ab_engine._sample(logits, keys, step, cfg)
        assert tok.tolist() == [want, want], step
    tok, _ = ab_engine._sample(logits, keys, np.array([2, 3]), cfg)  # one step per row (turns)
    assert tok.tolist() == [a, eos[0]]



@pytest.mark.parametrize("native", [True, False])
def test_siblings_that_drew_the_same_segment_still_diverge(ab_engine, native):
    """Two children of a node that drew the same first segment are different nodes: their own
    children are drawn independently (docs/design.md §4.6), natively and on the generic path
    (which asks ``generate`` for the continuations of identical prefixes)."""
    cfg = SamplingConfig(max_new_tokens=12, min_new_tokens=12, seed=1)
    recs = _run(ab_engine, prompts=PROMPTS[:1], mode="tree", width=4, depth=2, segment_tokens=1,
                cfg=cfg, template="plain", native=native)
    subtree: dict = {}
    for r in recs:  # level-1 node -> (its first token, its leaves' tokens)
        first, rest = subtree.setdefault(r["node_path"][0], (r["token_ids"][0], []))
        rest.append(tuple(r["token_ids"][1:]))
    twins = [(a, b) for a in subtree for b in subtree
             if a < b and subtree[a][0] == subtree[b][0]]
    assert twins  # 4 draws of one token from a, b (EOS masked): some siblings agree
    for a, b in twins:
        assert subtree[a][1] != subtree[b][1], (a, b)
