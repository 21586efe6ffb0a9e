"""sample-tree --branch entropy: splits exactly where the sampling entropy crosses the threshold
(checked against a separate teacher-forced forward), min segment, budgets, determinism, the hf
KV-forking path against the generic level-by-level path, --record-entropy, show-tree, advantages
on the output, bad settings.

The tiny models are init-model's with the final norm scaled up: random weights give near-uniform
next-token distributions (every entropy ~ ln V), the scaled norm a spread of entropies, so the
thresholds below make real trees.
"""

from __future__ import annotations

import io

import numpy as np
import orjson
import pytest

torch = pytest.importorskip("torch")

from conftest import DATA, run_tcli  # noqa: E402
from tcli.config.stages import SampleOptions  # noqa: E402
from tcli.engines.base import (EntropyRule, SamplingConfig,  # noqa: E402
                               sample_entropy_tree_generic, topk_entropy)
from tcli.stages.sample import sample_records  # noqa: E402

PROMPTS = [
    {"id": "p0", "prompt": "What is 2+3?", "answer": "5"},
    {"id": "p1", "prompt": "Natalia sold clips to 48 of her friends in April.", "answer": "72"},
    {"id": 7, "prompt": "A much longer prompt, so the batch needs left padding here.", "answer": "1"},
]
TAU = 1.2       # text model (norm x 12): entropies 0.2-3.6 nats, about a third above
AB_TAU = 0.3    # ab model (norm x 8): 0.1-0.7 nats


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _sharp_model(out_dir, scale: float, **kw) -> str:
    """init-model's tiny model with its final norm scaled by ``scale`` (sharper distributions)."""
    from tcli.commands.init_model import init_model
    from tcli.models.checkpoint import save_pretrained_atomic
    from tcli.models.load import load_model, load_tokenizer

    init_model(str(out_dir / "base"), hidden=32, layers=2, heads=2, quiet=True, **kw)
    model, tok = load_model(str(out_dir / "base")), load_tokenizer(str(out_dir / "base"), required=True)
    with torch.no_grad():
        model.model.norm.weight.mul_(scale)
    return save_pretrained_atomic(str(out_dir / "sharp"), model, tok, state={})


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    """GSM8K characters; EOS is rare, so paths run to max_new_tokens."""
    from tcli.engines.hf import HFEngine

    d = _sharp_model(tmp_path_factory.mktemp("text"), 12.0,
                     text_file=str(DATA / "gsm8k_test.jsonl"), seed=3)
    return HFEngine(d)


@pytest.fixture(scope="module")
def ab_engine(tmp_path_factory):
    """Vocabulary pad/eos/unk/a/b: EOS ends many paths early."""
    from tcli.engines.hf import HFEngine

    return HFEngine(_sharp_model(tmp_path_factory.mktemp("ab"), 8.0, alphabet="ab", seed=1),
                    batch_tokens=512)


def _opts(**kw) -> SampleOptions:
    base = dict(mode="tree", branch="entropy", width=2, depth=3, branch_entropy=TAU,
                min_segment_tokens=2, max_new_tokens=40, record_entropy=True,
                prompt_template="plain")
    return SampleOptions(**{**base, **kw})


def _run(engine, opts, prompts=PROMPTS, seed=5, native=True):
    return list(sample_records(engine, prompts, opts, seed=seed, native=native))


def _groups(recs):
    out: dict = {}
    for r in recs:
        out.setdefault(r["prompt_id"], []).append(r)
    return list(out.values())


def _teacher_entropies(engine, rec, temperature: float = 1.0) -> np.ndarray:
    """Entropy of softmax(logits / T) at every response token, from one full forward pass."""
    p, t = rec["prompt_token_ids"], rec["token_ids"]
    with torch.inference_mode():
        logits = engine.model(input_ids=torch.tensor([p + t])).logits[0].float()
    logp = torch.log_softmax(logits[len(p) - 1:len(p) - 1 + len(t)] / temperature, -1)
    return (-(logp.exp() * logp).sum(-1)).double().numpy()


def _check_rule(rec, h, tau: float, m: int, depth: int, tol: float = 0.0) -> int:
    """The record's segment_ends are exactly where ``h`` says the rule splits: at the first token
    after the segment's minimum whose entropy exceeds tau (children start at it), nowhere before,
    and nowhere in a last segment that still could split. Returns the number of splits."""
    path, ends, n = rec["node_path"], rec["segment_ends"], len(rec["token_ids"])
    assert len(path) == len(ends) and 1 <= len(path) <= depth + 1 and path[0] == 0
    assert ends[-1] == n and ends == sorted(ends) and len(set(ends[1:])) == len(ends) - 1
    starts = [0] + ends[:-1]
    for k, (s, e) in enumerate(zip(starts, ends)):
        first = s + max(m, 1 if k else 0)
        last = k == len(ends) - 1
        if k + 1 <= depth:  # this node could still split: no token above tau before its end
            quiet = h[first:n if last else e]
            assert (quiet <= tau + tol).all(), (k, s, e, quiet.max())
        if not last:
            assert e >= first and h[e] > tau - tol, (k, s, e, h[e])
    return len(ends) - 1


def _check_tree(group, width: int, depth: int, max_new: int):
    """Shape and sharing: every split node has exactly ``width`` children, the root one stem,
    leaves <= width^depth, shared segments identical token for token."""
    paths = [tuple(r["node_path"]) for r in group]
    assert paths == sorted(paths) and len(set(paths)) == len(paths) <= width ** depth
    inner = {p[:k] for p in paths for k in range(1, len(p))}
    assert not inner & set(paths)
    for node in inner:
        kids = {p[len(node)] for p in paths if p[:len(node)] == node and len(p) > len(node)}
        assert kids == set(range(width)), (node, kids)
    for a in group:
        assert len(a["token_ids"]) <= max_new and len(a["logprobs"]) == len(a["token_ids"])
        assert a["finish_reason"] == "stop" or len(a["token_ids"]) == max_new
        for b in group:
            k = 0
            while k < min(len(a["node_path"]), len(b["node_path"])) and \
                    a["node_path"][k] == b["node_path"][k]:
                k += 1
            if k and a is not b:
                n = a["segment_ends"][k - 1]
                assert n == b["segment_ends"][k - 1]
                for f in ("token_ids", "logprobs", "entropies"):
                    assert a[f][:n] == b[f][:n], f


# ----------------------------------------------------------------------------- the rule

@pytest.mark.parametrize("temperature,top_p,tau", [(1.0, 1.0, TAU), (0.7, 0.9, 0.5)])
def test_split_exactly_where_entropy_crosses_the_threshold(engine, temperature, top_p, tau):
    recs = _run(engine, _opts(temperature=temperature, top_p=top_p, branch_entropy=tau))
    splits = 0
    for group in _groups(recs):
        _check_tree(group, 2, 3, 40)
        for r in group:
            h = np.asarray(r["entropies"])
            tf = _teacher_entropies(engine, r, temperature)
            assert np.allclose(h, tf, atol=1e-4), np.abs(h - tf).max()
            splits += _check_rule(r, h, tau, 2, 3)
            _check_rule(r, tf, tau, 2, 3, tol=1e-4)  # the same split points from a plain forward
            assert r["temperature"] == temperature and r["top_p"] == top_p
    assert splits >= 6 and any(len(g) == 8 for g in _groups(recs))  # real trees, full ones too


def test_min_segment_is_respected(engine):
    m = 7
    recs = _run(engine, _opts(min_segment_tokens=m, max_new_tokens=48))
    seen = 0
    for r in recs:
        _check_rule(r, np.asarray(r["entropies"]), TAU, m, 3)
        ends = r["segment_ends"]
        inner = list(zip([0] + ends[:-1], ends))[:-1]
        assert all(e - s >= m for s, e in inner), ends
        seen += len(inner)
    assert seen > 0


def test_min_segment_zero_lets_the_root_split_at_the_first_token(engine):
    """Forced: threshold 0 splits at every chance, so min 0 splits the stem at token 0 and each
    child (whose first token is its own forking token) at its second token."""
    recs = _run(engine, _opts(branch_entropy=0.0, min_segment_tokens=0, depth=2), prompts=PROMPTS[:1])
    assert [r["segment_ends"][:-1] for r in recs] == [[0, 1]] * 4
    assert [r["node_path"] for r in recs] == [[0, a, b] for a in (0, 1) for b in (0, 1)]


def test_budgets_with_early_eos(ab_engine):
    for depth, width in ((3, 2), (2, 3)):
        recs = _run(ab_engine, _opts(width=width, depth=depth, max_new_tokens=12,
                                     branch_entropy=AB_TAU))
        assert any(r["finish_reason"] == "stop" and len(r["node_path"]) <= depth for r in recs)
        for group in _groups(recs):
            _check_tree(group, width, depth, 12)
            for r in group:
                _check_rule(r, np.asarray(r["entropies"]), AB_TAU, 2, depth)
                if r["finish_reason"] == "stop":
                    assert r["token_ids"][-1] in ab_engine.eos_token_ids


def test_huge_threshold_gives_one_path_equal_to_an_independent_sample(engine):
    recs = _run(engine, _opts(branch_entropy=1e9))
    assert [r["node_path"] for r in recs] == [[0]] * 3
    assert all(r["segment_ends"] == [len(r["token_ids"])] for r in recs)
    one = _run(engine, SampleOptions(n=1, max_new_tokens=40, prompt_template="plain"))
    assert [r["token_ids"] for r in recs] == [r["token_ids"] for r in one]
    assert [r["logprobs"] for r in recs] == [r["logprobs"] for r in one]
    assert "entropies" not in one[0]  # only with --record-entropy


# ----------------------------------------------------------------------------- determinism

def test_same_seed_same_tree_for_any_batching(engine):
    key = lambda recs: [(r["prompt_id"], r["node_path"], r["segment_ends"], r["token_ids"])  # noqa: E731
                        for r in recs]
    a = _run(engine, _opts())
    assert _run(engine, _opts()) == a
    assert key(_run(engine, _opts(prompts_per_batch=1))) == key(a)
    old = engine.batch_tokens
    engine.batch_tokens = 50  # one prompt per chunk, whatever fits
    try:
        assert key(_run(engine, _opts())) == key(a)
    finally:
        engine.batch_tokens = old
    assert key(_run(engine, _opts(), prompts=PROMPTS[2:])) == key(a)[-len(_groups(a)[-1]):]
    assert key(_run(engine, _opts(), seed=6)) != key(a)


def test_generic_path_same_determinism(engine):
    a = _run(engine, _opts(segment_tokens=5), native=False)
    b = _run(engine, _opts(segment_tokens=5, prompts_per_batch=1), native=False)
    assert [(r["node_path"], r["token_ids"]) for r in a] == [(r["node_path"], r["token_ids"]) for r in b]


# ----------------------------------------------------------------------------- native vs generic

def test_kv_forking_equals_generic_level_by_level_when_greedy(engine):
    """Greedy decoding draws the same tokens on both paths, so the trees must be equal: same split
    points and paths, log-probs and exact entropies equal to float round-off."""
    cfg = SamplingConfig(temperature=0.0, max_new_tokens=40, seed=3)
    rule = EntropyRule(2, 3, TAU, 2)
    ids = [r["prompt_token_ids"] for r in _run(engine, SampleOptions(n=1, max_new_tokens=1,
                                                                     prompt_template="plain"))]
    native = engine.sample_entropy_tree(ids, rule, cfg, record=True)
    generic = sample_entropy_tree_generic(engine, ids, rule, 5, cfg, record=True)
    assert sum(len(x) for x in native) > len(ids)  # it did split
    for a_leaves, b_leaves in zip(native, generic):
        assert [(a.node_path, a.token_ids, a.segment_ends, a.finish_reason) for a in a_leaves] == \
            [(b.node_path, b.token_ids, b.segment_ends, b.finish_reason) for b in b_leaves]
        for a, b in zip(a_leaves, b_leaves):
            assert np.allclose(a.logprobs, b.logprobs, atol=1e-5)
            assert np.allclose(a.entropies, b.entropies, atol=1e-5)


def test_generic_path_uses_topk_estimates_that_never_exceed_the_entropy(engine):
    recs = _run(engine, _opts(segment_tokens=6), native=False)
    splits = 0
    for group in _groups(recs):
        _check_tree(group, 2, 3, 40)
        for r in group:
            h = np.asarray(r["entropies"])
            assert (h <= _teacher_entropies(engine, r) + 1e-5).all()  # top-20 of ~100: a lower bound
            splits += _check_rule(r, h, TAU, 2, 3)
    assert splits >= 3


@pytest.mark.parametrize("kw", [dict(segment_tokens=6), dict(mode="independent", n=2)],
                         ids=["entropy-tree", "independent"])
def test_the_generic_path_records_the_top20_estimate(engine, kw):
    """native=False runs what engines without exact entropies run: each recorded entropy is
    topk_entropy of the 20 largest log-probs, below the exact entropy where the rest holds mass."""
    from tcli.engines.sampling import ENTROPY_TOP_K

    recs = _run(engine, _opts(max_new_tokens=12, temperature=1.0, **kw), prompts=PROMPTS[:2],
                native=False)
    below = 0.0
    for r in recs:
        p, t = r["prompt_token_ids"], r["token_ids"]
        with torch.inference_mode():
            logits = engine.model(input_ids=torch.tensor([p + t])).logits[0].float()
        lp = torch.log_softmax(logits[len(p) - 1:len(p) - 1 + len(t)], -1)
        want = topk_entropy(lp.topk(ENTROPY_TOP_K, -1).values.double().numpy())
        assert np.allclose(r["entropies"], want, atol=1e-4)
        below = max(below, float((_teacher_entropies(engine, r) - want).max()))
    assert below > 1e-2   # the estimate is not the exact entropy


def test_generate_entropy_contract(engine):
    ids = [[5, 6, 7], [8, 9]]
    cfg = SamplingConfig(temperature=0.8, max_new_tokens=6, seed=2)
    plain = engine.generate(ids, 2, cfg)
    exact = engine.generate_entropy(ids, 2, cfg, top_k=None)
    top3 = engine.generate_entropy(ids, 2, cfg, top_k=3)
    for p, e, k in zip(plain, exact, top3):  # the same samples as generate
        assert [c.token_ids for c in p] == [c.token_ids for c in e] == [c.token_ids for c in k]
    rec = {"prompt_token_ids": ids[0], "token_ids": exact[0][0].token_ids}
    assert np.allclose(exact[0][0].entropies, _teacher_entropies(engine, rec, 0.8), atol=1e-4)
    with torch.inference_mode():
        logits = engine.model(input_ids=torch.tensor([ids[0] + rec["token_ids"]])).logits[0]
    lp = torch.log_softmax(logits[2:2 + len(rec["token_ids"])].float() / 0.8, -1)
    want = topk_entropy(lp.topk(3, -1).values.double().numpy())
    assert np.allclose(top3[0][0].entropies, want, atol=1e-4)
    other = engine.generate_entropy(ids, 2, cfg, top_k=None, seeds=[2, 99])
    assert [c.token_ids for c in other[0]] == [c.token_ids for c in exact[0]]  # seed 2 = cfg.seed
    assert [c.token_ids for c in other[1]] != [c.token_ids for c in exact[1]]


def test_topk_entropy_is_a_lower_bound_exact_on_full_support():
    rng = np.random.default_rng(0)
    for v in (2, 7, 50, 1000):
        for _ in range(20):
            z = rng.normal(size=v) * rng.uniform(0.1, 5)
            lp = z - np.log(np.exp(z).sum())
            h = -(np.exp(lp) * lp).sum()
            for k in (1, 2, 5, 20, v):
                est = topk_entropy(np.sort(lp)[::-1][:min(k, v)])[0]
                assert est <= h + 1e-9
                if k >= v:
                    assert est == pytest.approx(h, abs=1e-9)
    assert topk_entropy([[0.0, -np.inf]])[0] == 0.0  # certain token, masked rest
    assert topk_entropy([[np.log(0.5), np.log(0.5)]])[0] == pytest.approx(np.log(2))


def test_topk_entropy_packs_a_small_rest_into_one_token():
    """Top-2 probabilities 0.5 and 0.4 leave r = 0.1 < p_k = 0.4: the rest counts as one token
    of probability 0.1, not as a quarter of a token of probability 0.4."""
    # H_k = -0.5 ln 0.5 - 0.4 ln 0.4 - 0.1 ln min(0.4, 0.1)
    want = 0.5 * np.log(2) + 0.4 * np.log(2.5) + 0.1 * np.log(10)
    assert topk_entropy(np.log([0.5, 0.4]))[0] == pytest.approx(want, abs=1e-9)  # float64


def test_topk_entropy_skips_masked_entries_when_mass_is_left():
    """Fewer finite log-probs than k (vLLM may return fewer; the rest are -inf) with mass left
    outside them: the rest is packed into tokens as likely as the smallest finite one."""
    lp = [np.log(0.3), -np.inf, np.log(0.3)]
    # H_k = -0.6 ln 0.3 - 0.4 ln min(0.3, 0.4) = -ln 0.3
    assert topk_entropy([lp])[0] == pytest.approx(-np.log(0.3), abs=1e-9)
    assert topk_entropy([[-np.inf, -np.inf]])[0] == 0.0   # nothing known: no estimate above 0


def test_a_child_never_splits_at_its_own_first_token():
    """With min_segment 0 the root may split at its first token, but a child's first token is
    its forking token: it can split from its second token on. Nothing splits past depth."""
    rule = EntropyRule(width=2, depth=3, threshold=0.0, min_segment=0)
    assert rule.splits(1, 0, 0, 1.0)           # the root, token 0
    assert not rule.splits(2, 5, 5, 1.0)       # a child starting at 5, its token 5
    assert rule.splits(2, 5, 6, 1.0)
    assert not rule.splits(3, 9, 9, 1.0) and rule.splits(3, 9, 10, 1.0)
    assert not rule.splits(4, 12, 14, 1.0)     # split 3 times already: path length 4 > depth
    assert not rule.splits(2, 5, 6, 0.0)       # entropy must exceed the threshold
    at_least_3 = EntropyRule(width=2, depth=3, threshold=0.0, min_segment=3)
    assert at_least_3.splits(2, 5, 8, 1.0) and not at_least_3.splits(2, 5, 7, 1.0)  # 5 + 3


# ----------------------------------------------------------------------------- --record-entropy

@pytest.mark.parametrize("kw", [dict(mode="independent", n=3),
                                dict(mode="tree", width=2, depth=2, segment_tokens=4)])
@pytest.mark.parametrize("native", [True, False])
def test_record_entropy_in_the_other_modes(engine, kw, native):
    opts = SampleOptions(max_new_tokens=10, prompt_template="plain", temperature=0.7, **kw)
    plain = _run(engine, opts, native=native)
    recs = _run(engine, SampleOptions(**{**opts.__dict__, "record_entropy": True}), native=native)
    assert all("entropies" not in r for r in plain)
    for a, b in zip(plain, recs):  # the same samples, plus the field
        assert {k: v for k, v in b.items() if k != "entropies"} == a
        tf = _teacher_entropies(engine, b, 0.7)
        h = np.asarray(b["entropies"])
        assert len(h) == len(b["token_ids"])
        if native:
            assert np.allclose(h, tf, atol=1e-4)
        else:  # generic engines: the top-20 estimate
            assert (h <= tf + 1e-5).all()


# ----------------------------------------------------------------------------- downstream

def test_tempo_and_treerpo_advantages_on_entropy_trees(engine):
    from tcli.algos.estimators import Group
    from tcli.config.stages import AdvantageOptions
    from tcli.stages.advantages import advantages_group

    recs = _run(engine, _opts())
    nonzero = 0
    for group in _groups(recs):
        for r in group:
            r["reward"] = float(r["token_ids"][r["segment_ends"][0]] % 2) if len(r["node_path"]) > 1 \
                else 0.0
        for est in ("tempo", "treerpo", "grpo"):
            out = advantages_group(Group.from_records([dict(r) for r in group]),
                                   AdvantageOptions(estimator=est))
            for o in out:
                a = np.asarray(o["advantages"])
                assert len(a) == len(o["token_ids"]) and np.isfinite(a).all()
                if est == "treerpo":  # the stem is shared by every leaf: no signal there
                    assert (a[:o["segment_ends"][0]] == 0).all()
                nonzero += int(np.any(a != 0))
    assert nonzero > 0


def test_cli_sample_show_and_advantages(engine, tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_bytes(b"".join(orjson.dumps(p) + b"\n" for p in PROMPTS))
    out = tmp_path / "r.jsonl"
    r = run_tcli(["sample-tree", prompts, "-m", engine.model_path, "--mode", "tree", "--branch",
                  "entropy", "--branch-entropy", TAU, "--min-segment-tokens", 2,
                  "--max-new-tokens", 40, "--record-entropy", "--prompt-template", "plain",
                  "--seed", 5, "--threads", 1, "-o", out], timeout=300)
    assert r.returncode == 0, r.stderr
    recs = [orjson.loads(x) for x in out.read_bytes().splitlines()]
    assert recs == _run(engine, _opts())  # the CLI is the library
    for x in recs:
        x["reward"] = float(len(x["token_ids"]) % 2)
    scored = b"".join(orjson.dumps(x) + b"\n" for x in recs)
    r = run_tcli(["show-tree", "-g", "p1", "--bytes"], input=scored)
    assert r.returncode == 0 and "H=" in r.stdout.decode() and "⑂ branch" in r.stdout.decode()
    r = run_tcli(["advantages", "-e", "treerpo"], input=scored)
    assert r.returncode == 0, r.stderr
    bad = dict(recs[0], entropies=[-1.0] * len(recs[0]["token_ids"]))
    r = run_tcli(["show-tree"], input=orjson.dumps(bad) + b"\n")
    assert r.returncode == 65 and b"<stdin>:1: field 'entropies'" in r.stderr, r.stderr
    short = dict(recs[0], entropies=[0.5])
    r = run_tcli(["show-tree"], input=orjson.dumps(short) + b"\n")
    assert r.returncode == 65 and b"'entropies'" in r.stderr and b"expected" in r.stderr


def test_show_tree_renders_the_entropy_at_each_fork():
    from rich.console import Console

    from tcli.show import render_group

    recs = [{"prompt_id": "x", "sample_id": i, "token_ids": t, "reward": float(i),
             "entropies": [0.1, 0.9, 0.2][:len(t)]} for i, t in enumerate([[1, 2, 3], [1, 4, 3]])]
    buf = io.StringIO()
    Console(file=buf, width=100).print(render_group(recs))
    assert "⑂ branch  H=0.90" in buf.getvalue()


# ----------------------------------------------------------------------------- settings

@pytest.mark.parametrize("args,needle", [
    (["--branch", "entropi"], "unknown value 'entropi'"),
    (["--mode", "tree", "--branch-entropy", "-1"], "--branch-entropy (sample.branch_entropy) must be >= 0"),
    (["--mode", "tree", "--branch-entropy", "nan"], "--branch-entropy (sample.branch_entropy)"),
    (["--mode", "tree", "--min-segment-tokens", "-1"], "--min-segment-tokens (sample.min_segment_tokens)"),
])
def test_bad_settings_exit_2(args, needle):
    r = run_tcli(["sample-tree", "-m", "nope", *args], input=b'{"id":1,"prompt":"x"}\n')
    assert r.returncode == 2 and needle in r.stderr.decode(), r.stderr


def test_loop_sample_table_takes_the_settings(tmp_path):
    from tcli.config.loop import load_config

    cfg = tmp_path / "c.toml"
    cfg.write_text('[sample]\nmode = "tree"\nbranch = "entropy"\nbranch_entropy = 0.5\n'
                   'min_segment_tokens = 3\nrecord_entropy = true\n')
    s = load_config(str(cfg)).sample
    assert (s.branch, s.branch_entropy, s.min_segment_tokens, s.record_entropy) == \
        ("entropy", 0.5, 3, True)
    cfg.write_text('model = "x"\nrun_dir = "' + str(tmp_path / "run") + '"\n'
                   '[sample]\nmode = "tree"\nbranch = "entropi"\n')
    r = run_tcli(["loop", "--config", cfg])
    assert r.returncode == 2 and "sample.branch" in r.stderr.decode(), r.stderr
    assert not (tmp_path / "run").exists()
