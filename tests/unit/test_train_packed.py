"""Prefix-shared (packed prefix-tree) train-step == the per-sequence path: the trie against a
brute-force one, per-token log-probs, entropies and gradients through a real tiny model, whole
Trainer steps (independent groups, trees with early EOS, mixed batches, every loss aggregation,
KL to a reference, small budgets that split groups, gradient checkpointing), torchrun, and the
sampling temperature read from the records."""

from __future__ import annotations

import os

import numpy as np
import orjson
import pytest
import torch

from conftest import SUM_REL, UPDATE_REL, assert_same_update, run_tcli, run_torchrun
from tcli.errors import DataError
from tcli.train.samples import TrainSample, batch_temperature, samples_from_records
from tcli.train.trie import bin_units, build_trie, group_units, pack_row

EOS = 1


# ----------------------------------------------------------------------------- data

def _tree(rng, prompt, width=3, depth=3, seg=4, p_eos=0.25):
    """Responses of one sampled tree: each node gets ``width`` children of ``seg`` tokens; a
    segment may end early with EOS (that branch stops)."""
    out = []

    def grow(prefix, level):
        for _ in range(width):
            s = rng.integers(3, 90, seg).tolist()
            if rng.random() < p_eos:
                s = s[:int(rng.integers(0, seg))] + [EOS]
            if s[-1] == EOS or level == depth:
                out.append(prefix + s)
            else:
                grow(prefix + s, level + 1)

    grow([], 1)
    return [(prompt, r) for r in out]


def _group(rng, prompt, n=6, shared=8):
    """Independent samples that share a random-length beginning (as sampled groups often do)."""
    base = rng.integers(3, 90, shared).tolist()
    out = []
    for _ in range(n):
        cut = int(rng.integers(0, shared + 1))
        out.append((prompt, base[:cut] + rng.integers(3, 90, int(rng.integers(1, 7))).tolist()))
    out.append(out[0])  # an exact duplicate
    return out


def _samples(pairs, rng):
    return [TrainSample(np.asarray(p, dtype=np.int64), np.asarray(r, dtype=np.int64),
                        (-0.5 * rng.random(len(r)) - 1.0).astype(np.float32),
                        rng.standard_normal(len(r)).astype(np.float32), line=i + 1)
            for i, (p, r) in enumerate(pairs)]


def _prompt(rng, n=None):
    return rng.integers(3, 90, n or int(rng.integers(2, 9))).tolist()


BATCHES = {
    "groups": lambda rng: [x for _ in range(3) for x in _group(rng, _prompt(rng))],
    "tree": lambda rng: _tree(rng, _prompt(rng)),
    "mixed": lambda rng: (_tree(rng, _prompt(rng), width=2) + _group(rng, _prompt(rng))
                          + [(_prompt(rng), rng.integers(3, 90, 5).tolist()) for _ in range(3)]),
}


# ----------------------------------------------------------------------------- the trie

def test_trie_matches_brute_force():
    """Node count = distinct response prefixes; each response's path, positions, parents and
    ancestor mask are those of its own sequence."""
    rng = np.random.default_rng(0)
    for _ in range(200):
        prompt = rng.integers(0, 3, int(rng.integers(1, 5)))
        resps = [np.asarray(r, dtype=np.int64) for _, r in
                 _tree(rng, prompt.tolist(), width=int(rng.integers(1, 4)), depth=2, seg=2)]
        tr = build_trie(prompt, resps, list(range(len(resps))))
        P = len(prompt)
        assert len(tr.node_pos) == len({tuple(r[:t + 1]) for r in resps for t in range(len(r))})
        ar = np.arange(tr.size)
        anc = (ar[None, :] <= ar[:, None]) & (ar[:, None] < tr.end[None, :])
        for r, nodes in zip(resps, tr.node_of):
            pos = P + nodes
            assert (tr.tokens[pos] == r).all() and (tr.depth[pos] == P + np.arange(len(r))).all()
            assert (tr.node_pos[nodes] == np.concatenate([[P - 1], pos[:-1]])).all()
            for t in range(len(r)):
                assert set(np.flatnonzero(anc[pos[t]])) == set(range(P)) | set(pos[:t + 1])


def test_units_split_big_groups_and_bin_without_padding():
    rng = np.random.default_rng(1)
    pairs = BATCHES["mixed"](rng)
    prompts = [np.asarray(p) for p, _ in pairs]
    resps = [np.asarray(r) for _, r in pairs]
    whole = group_units(prompts, resps, range(len(pairs)), budget=10_000)
    assert len(whole) == 5  # tree, group, three singletons
    small = group_units(prompts, resps, range(len(pairs)), budget=24)
    assert len(small) > len(whole)
    assert sorted(m for u in small for m in u.members) == list(range(len(pairs)))
    for u in small:  # only a lone response may exceed the budget
        assert u.size <= 24 or len(u.members) == 1
    bins = bin_units([u.size for u in small], 24)
    assert sorted(u for b in bins for u in b) == list(range(len(small)))
    row = pack_row([small[u] for u in bins[0]])
    assert len(row.input_ids) == sum(small[u].size for u in bins[0])
    for j, m in enumerate(row.members):
        assert (row.node_tok[row.node_of[j]] == resps[m]).all()


@pytest.mark.parametrize("q", [1, 5, 64])
def test_tile_plan_is_the_block_diagonal_ancestor_mask(q):
    """Query tiles (straddling tries too) see exactly their ancestors, nothing of another trie."""
    from tcli.train.trie import tile_plan

    rng = np.random.default_rng(6)
    pairs = BATCHES["mixed"](rng)
    units = group_units([np.asarray(p) for p, _ in pairs], [np.asarray(r) for _, r in pairs],
                        range(len(pairs)), budget=10_000)
    row = pack_row(units)
    n = len(row.input_ids)
    want = np.zeros((n, n), dtype=bool)
    for (s, e), u in zip(row.blocks, units):
        ar = np.arange(e - s)
        want[s:e, s:e] = (ar[None, :] <= ar[:, None]) & (ar[:, None] < u.end[None, :])
    kidx, mask = tile_plan(row.end, q)
    got = np.zeros((kidx.shape[0] * q, n), dtype=bool)
    for t in range(kidx.shape[0]):
        np.logical_or.at(got[t * q:(t + 1) * q], (slice(None), kidx[t]), mask[t])
    assert (got[:n] == want).all()
    assert kidx.shape[1] < n or q >= n  # tiles gather a path, not the whole row


# ----------------------------------------------------------------------------- the model

@pytest.fixture(scope="module")
def model(tiny):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny).eval()


def _grid_and_grads(model, micro, samples, temperature=1.0):
    model.zero_grad(set_to_none=True)
    with micro.attention(model):
        lp, ent, mask = micro.logprobs(model, samples, torch.device("cpu"), pad_id=0,
                                       temperature=temperature, with_entropy=True)
        (lp * torch.linspace(-1, 1, lp.numel()).view_as(lp)).sum().backward()
    per = {i: (lp[r, :len(samples[i].tokens)].detach(), ent[r, :len(samples[i].tokens)])
           for r, i in enumerate(micro.idxs)}
    return per, {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("kind", sorted(BATCHES))
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_packed_logprobs_and_grads_equal_per_sequence(model, kind, temperature):
    """Same per-token log-probs and entropies, and the same parameter gradient of a weighted
    sum of them, as one padded row per response (to 1e-5 relative)."""
    from tcli.train.batching import LAYOUTS

    rng = np.random.default_rng(2)
    samples = _samples(BATCHES[kind](rng), rng)
    idx = list(range(len(samples)))
    packed = LAYOUTS.get("packed")(samples, idx, 10_000, 1, 0)
    padded = LAYOUTS.get("padded")(samples, idx, 10_000, 1, 0)
    assert len(packed) == len(padded) == 1
    assert packed[0].model_tokens < padded[0].real_tokens  # shared tokens run once
    # the padded reference in the packed micro-batch's row order (the weights make order matter)
    padded[0].idxs = list(packed[0].idxs)
    a, ga = _grid_and_grads(model, packed[0], samples, temperature)
    b, gb = _grid_and_grads(model, padded[0], samples, temperature)
    for i in idx:
        assert torch.allclose(a[i][0], b[i][0], rtol=1e-5, atol=1e-5), i
        assert torch.allclose(a[i][1], b[i][1], rtol=1e-5, atol=1e-5), i
    for k in ga:
        assert (ga[k] - gb[k]).norm() <= 1e-5 * gb[k].norm() + 1e-9, k


def _whole_batch_both_ways(samples):
    """(indices, the packed micro-batch, the padded one in the packed one's sample order): every
    sample in one micro-batch of each layout, so the two grids compare row by row."""
    from tcli.train.batching import LAYOUTS

    idx = list(range(len(samples)))
    packed = LAYOUTS.get("packed")(samples, idx, 10_000, 1, 0)[0]
    padded = LAYOUTS.get("padded")(samples, idx, 10_000, 1, 0)[0]
    padded.idxs = list(packed.idxs)
    return idx, packed, padded


def test_packed_fallback_head_applies_temperature(model, monkeypatch):
    """A model without a plain linear head is scored from its full logits on the packed row too,
    and those are divided by T there as well: packed equals padded at T = 0.7."""
    import tcli.models.logprobs as logprobs
    monkeypatch.setattr(logprobs, "final_hidden", lambda model, **kw: None)  # not a plain head
    rng = np.random.default_rng(3)
    samples = _samples(BATCHES["groups"](rng), rng)
    idx, packed, padded = _whole_batch_both_ways(samples)
    a, ga = _grid_and_grads(model, packed, samples, 0.7)
    b, gb = _grid_and_grads(model, padded, samples, 0.7)
    for i in idx:  # float32 log-softmax of the same logits: 1e-5 as in the plain-head test above
        assert torch.allclose(a[i][0], b[i][0], rtol=1e-5, atol=1e-5), i
        assert torch.allclose(a[i][1], b[i][1], rtol=1e-5, atol=1e-5), i
    for k in ga:
        assert (ga[k] - gb[k]).norm() <= 1e-5 * gb[k].norm() + 1e-9, k


@pytest.mark.parametrize("arch", ["llama-sdpa", "qwen3-eager"])
def test_packed_equals_per_sequence_on_llama_and_eager(tiny, arch):
    """The real models are Llama; eager attention too: the tree attention replaces both."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    if arch == "llama-sdpa":
        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
                          max_position_embeddings=512, pad_token_id=0)
        model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").eval()
    else:
        model = AutoModelForCausalLM.from_pretrained(tiny, attn_implementation="eager").eval()
    rng = np.random.default_rng(7)
    samples = _samples(BATCHES["mixed"](rng), rng)
    idx, packed, padded = _whole_batch_both_ways(samples)
    a, ga = _grid_and_grads(model, packed, samples)
    b, gb = _grid_and_grads(model, padded, samples)
    assert model.config._attn_implementation == arch.split("-")[1]  # restored after the step
    for i in idx:
        assert torch.allclose(a[i][0], b[i][0], rtol=1e-5, atol=1e-5), i
    for k in ga:
        assert (ga[k] - gb[k]).norm() <= 1e-5 * gb[k].norm() + 1e-9, k


def _step(tiny, samples, **kw):
    from tcli.config.stages import TrainOptions
    from tcli.train.trainer import Trainer

    tr = Trainer(tiny, TrainOptions(lr=1e-3, **kw))
    grads = {}

    def keep(*_):
        grads[len(grads)] = {n: p.grad.clone() for n, p in tr.model.named_parameters()}

    tr.optimizer.register_step_pre_hook(keep)
    return tr.step(samples), grads, tr.model.state_dict()


CASES = {
    "token-mean": dict(),
    "seq-mean-token-mean": dict(loss_agg="seq-mean-token-mean"),
    "seq-mean-token-sum": dict(loss_agg="seq-mean-token-sum", mini_batches=2),
    "kl-ref": dict(kl_coef=0.1),
    "small-budget": dict(micro_batch_tokens=40),
    "checkpointing": dict(grad_checkpointing=True, micro_batch_tokens=60),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_trainer_step_equals_per_sequence(tiny, tiny_model_seed1, case):
    """A whole train step: loss, metrics, every optimizer step's gradient and the new weights.
    The first optimizer step's gradient is a reordered float32 sum (1e-5); a later one starts
    from weights that Adam's first, sign-like step moved apart by float noise (up to UPDATE_REL
    of the update, see conftest.assert_same_update), so it is held to UPDATE_REL."""
    rng = np.random.default_rng(3)
    samples = _samples(BATCHES["mixed"](rng), rng)
    kw = dict(CASES[case])
    if "kl_coef" in kw:
        kw["ref_model"] = tiny_model_seed1  # a different model: the KL term has a gradient
    m1, g1, w1 = _step(tiny, samples, share_prefix=False, **kw)
    m2, g2, w2 = _step(tiny, samples, share_prefix=True, **kw)
    rel = SUM_REL if len(g1) == 1 else UPDATE_REL  # later steps: weights apart (conftest)
    for k in ("loss", "pg_loss", "entropy", "approx_kl", "clip_frac", "grad_norm"):
        assert m2[k] == pytest.approx(m1[k], rel=rel, abs=1e-7), k
    if "kl_coef" in kw:
        assert m2["kl"] == pytest.approx(m1["kl"], rel=1e-5) and m1["kl"] > 0
    assert (m2["num_tokens"], m2["num_sequences"]) == (m1["num_tokens"], m1["num_sequences"])
    assert m2["padding_share"] == 0.0 and m1["padding_share"] > 0.0
    assert m2["model_tokens"] < sum(len(s) for s in samples) * CASES[case].get("epochs", 1)
    assert g1.keys() == g2.keys() and len(g1) >= 1
    for s in g1:
        for k in g1[s]:
            tol = 1e-5 if s == 0 else UPDATE_REL
            assert (g1[s][k] - g2[s][k]).norm() <= tol * g1[s][k].norm() + 1e-9, (s, k)
    assert_same_update(_initial(tiny), w1, w2)


def _initial(model_dir: str) -> dict:
    """The weights a step starts from, keyed as the trainer's state_dict."""
    from tcli.models.load import load_model

    return load_model(model_dir).state_dict()


def test_oversize_group_and_response_still_train(tiny):
    """A budget smaller than one response: every response gets a micro-batch of its own."""
    rng = np.random.default_rng(4)
    samples = _samples(_group(rng, _prompt(rng, 6), n=3), rng)
    m1, g1, _ = _step(tiny, samples, share_prefix=False, micro_batch_tokens=4)
    m2, g2, _ = _step(tiny, samples, share_prefix=True, micro_batch_tokens=4)
    assert m2["loss"] == pytest.approx(m1["loss"], rel=1e-5)
    for k in g1[0]:
        assert (g1[0][k] - g2[0][k]).norm() <= 1e-5 * g1[0][k].norm() + 1e-9, k


# ----------------------------------------------------------------------------- temperature

def test_temperature_from_records():
    rec = {"prompt_token_ids": [5, 6], "token_ids": [7, 8], "logprobs": [-1.0, -1.0],
           "advantages": [1.0, 1.0]}
    s = samples_from_records([rec, {**rec, "temperature": 1.0}, {**rec, "temperature": 0}])
    assert [x.temperature for x in s] == [1.0, 1.0, 1.0]  # absent and greedy read as 1
    assert batch_temperature(samples_from_records([{**rec, "temperature": 0.6}] * 2)) == 0.6
    with pytest.raises(DataError) as e:
        samples_from_records([{**rec, "temperature": 0.6}, {**rec, "temperature": 0.6},
                              {**rec, "temperature": 0.8}], source="r.jsonl")
    assert (e.value.file, e.value.line, e.value.field) == ("r.jsonl", 3, "temperature")
    for bad in (-1, "hot", True, float("nan")):
        with pytest.raises(DataError, match="temperature"):
            samples_from_records([{**rec, "temperature": bad}])


def test_temperature_scales_logits(model):
    """Recomputed log-probs at T are log_softmax(logits / T) of a plain forward; T = 1 is
    bit-identical to not passing T."""
    from tcli.models.logprobs import batch_logprobs, make_batch

    batch = make_batch([[5, 6, 7], [9, 10]], [[11, 12, 13], [14]], "cpu")
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([[5, 6, 7, 11, 12, 13]])).logits[0, 2:5]
        want = torch.log_softmax(logits / 0.5, -1).gather(1, torch.tensor([[11], [12], [13]]))
        got, ent = batch_logprobs(model, batch, temperature=0.5, with_entropy=True)
        assert torch.allclose(got[0], want[:, 0], atol=1e-5)
        p = torch.softmax(logits / 0.5, -1)
        assert torch.allclose(ent[0], -(p * p.log()).sum(-1), atol=1e-5)
        a, _ = batch_logprobs(model, batch)
        b, _ = batch_logprobs(model, batch, temperature=1.0)
        assert torch.equal(a, b)


def test_cli_mixed_temperature_exit_65(tiny, tmp_path):
    rec = {"prompt_token_ids": [5, 6], "token_ids": [7, 8], "logprobs": [-1.0, -1.0],
           "advantages": [1.0, 1.0], "temperature": 0.7}
    path = tmp_path / "roll.jsonl"
    path.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in (rec, {**rec, "temperature": 1})))
    r = run_tcli(["train-step", path, "-m", tiny, "-o", tmp_path / "ck"])
    assert r.returncode == 65, r.stderr.decode()
    err = r.stderr.decode()
    assert f"{path}:2" in err and "temperature" in err and not (tmp_path / "ck").exists()


# ----------------------------------------------------------------------------- torchrun

def test_torchrun_packed_equals_one_process_per_sequence(tiny, tmp_path):
    """2 gloo processes with shared prefixes (whole tries per rank) == 1 process per sequence."""
    from safetensors.torch import load_file

    rng = np.random.default_rng(5)
    pairs = BATCHES["mixed"](rng)
    recs = [{"prompt_token_ids": p, "token_ids": r, "advantages": rng.standard_normal(len(r)).tolist(),
             "logprobs": (-0.5 * rng.random(len(r)) - 1.0).tolist()} for p, r in pairs]
    path = tmp_path / "roll.jsonl"
    path.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in recs))
    args = ["train-step", str(path), "-m", tiny, "--lr", "1e-3", "--micro-batch-tokens", "60"]
    one = run_tcli([*args, "-o", tmp_path / "a", "--no-share-prefix"], env={"OMP_NUM_THREADS": "1"})
    two = run_torchrun(["-m", "tcli", *args, "-o", tmp_path / "b"], timeout=300)
    assert one.returncode == 0 and two.returncode == 0, (one.stderr + two.stderr).decode()[-3000:]
    m1, m2 = orjson.loads(one.stdout), orjson.loads(two.stdout)
    for k in ("loss", "entropy", "grad_norm"):  # one optimizer step: reordered float32 sums
        assert m2[k] == pytest.approx(m1[k], rel=SUM_REL), k
    w1 = load_file(str(tmp_path / "a" / "model.safetensors"))
    w2 = load_file(str(tmp_path / "b" / "model.safetensors"))
    assert_same_update(load_file(os.path.join(tiny, "model.safetensors")), w1, w2)


def test_bins_fill_up_to_exactly_the_budget():
    """A unit that fits the room left in a row to the token joins it: rows are filled up to the
    micro-batch budget, not one token short (every extra row is one more forward)."""
    # first-fit decreasing, budget 10: 6 opens row 0 (room 4), 4 fits it exactly (room 0),
    # 3 opens row 1 (room 7), 1 joins row 1
    assert bin_units([6, 4, 3, 1], 10) == [[0, 1], [2, 3]]
    # sizes 12, 10, 2 (in that order: 12 > budget, alone; 10 = budget, full; 2 opens a third row)
    assert bin_units([10, 12, 2], 10) == [[1], [0], [2]]
