"""Rollouts read by a model with another tokenizer than the one that sampled them (the records'
`model` field): train-step, train-critic, values and expand-tree refuse them (65, the file, the
line, field 'model') even though every token id fits both vocabularies; a checkpoint of the same
tokenizer with other weights passes; and a train-step whose records' log-probs are far from the
model's own says so on stderr."""

from __future__ import annotations

import pytest

from conftest import TINY, failed, jsonl, parse, run_tcli, shared_model

ALPHABET = "0123456789+-=?# \n"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(sampler, stranger, sibling): a small-alphabet model, the printable-ASCII tiny model (its
    ids cover the sampler's), and the sampler's tokenizer with other weights."""
    sampler = shared_model(tmp_path_factory, seed=0, alphabet=ALPHABET, **TINY)
    stranger = shared_model(tmp_path_factory, seed=0, **TINY)
    sibling = shared_model(tmp_path_factory, seed=1, alphabet=ALPHABET, **TINY)
    return sampler, stranger, sibling


@pytest.fixture(scope="module")
def rollouts(models, tmp_path_factory):
    """Tree-sampled rollouts of the sampler, with rewards and advantages (what each reader needs)."""
    d = tmp_path_factory.mktemp("prov")
    (d / "p.jsonl").write_bytes(jsonl([{"id": "a", "prompt": "1+2=?\n", "answer": "3"},
                                       {"id": "b", "prompt": "4-1=?\n", "answer": "3"}]))
    r = run_tcli(["sample-tree", str(d / "p.jsonl"), "-m", models[0], "--mode", "tree",
                  "--width", "2", "--depth", "2", "--segment-tokens", "2", "--max-new-tokens", "6",
                  "--prompt-template", "plain", "--seed", "1"])
    assert r.returncode == 0, r.stderr.decode()
    recs = parse(r.stdout)
    for i, rec in enumerate(recs):
        n = len(rec["token_ids"])
        rec.update(reward=float(i % 2), advantages=[0.5 - i % 2] * n, returns=[0.1] * (n + 1),
                   critic_values=[0.0] * (n + 1))
    src = d / "rollouts.jsonl"
    src.write_bytes(jsonl(recs))
    return d, src


def _reads(cmd: str, model: str, src, out) -> list[str]:
    return {
        "train-step": ["train-step", str(src), "-m", model, "-o", str(out / "ckpt")],
        "expand-tree": ["expand-tree", str(src), "-m", model, "--expand-tokens", "8"],
        "values": ["values", str(src), "--critic", model],
        "train-critic": ["train-critic", str(src), "--critic", model, "-o", str(out / "c")],
    }[cmd]


@pytest.mark.parametrize("cmd", ["train-step", "expand-tree", "values", "train-critic"])
def test_records_of_another_tokenizer_are_refused(cmd, models, rollouts, tmp_path):
    sampler, stranger, _ = models
    _, src = rollouts
    model = stranger
    if cmd in ("values", "train-critic"):
        model = str(tmp_path / "critic")
        assert run_tcli(["init-critic", model, "--from", stranger]).returncode == 0
    r = run_tcli(_reads(cmd, model, src, tmp_path))
    line = failed(r, 65, f"{src}:1", "field 'model'", f"sampled by {sampler}",
                  "tokenizer differs")
    assert ("--critic" if cmd in ("values", "train-critic") else "--model") in line
    assert r.stdout == b"" and not (tmp_path / "ckpt").exists() and not (tmp_path / "c").exists()


def test_another_checkpoint_of_the_same_tokenizer_is_read(models, rollouts, tmp_path):
    _, _, sibling = models
    _, src = rollouts
    r = run_tcli(_reads("train-step", sibling, src, tmp_path))
    assert r.returncode == 0, r.stderr.decode()
    assert b"warning" not in r.stderr  # random weights of one shape: under a nat per token


def test_logprobs_far_from_the_model_are_said(models, rollouts, tmp_path):
    sampler = models[0]
    d, src = rollouts
    recs = parse(src.read_bytes())
    for rec in recs:
        rec["logprobs"] = [-30.0] * len(rec["token_ids"])  # what no model of this vocabulary gives
    far = d / "far.jsonl"
    far.write_bytes(jsonl(recs))
    r = run_tcli(_reads("train-step", sampler, far, tmp_path))
    assert r.returncode == 0, r.stderr.decode()
    assert b"tcli: warning: the sampled log-probs differ from the trained model" in r.stderr
    assert parse(r.stdout)[0]["mismatch_abs_logp"] > 10  # the log ratio is clamped at 20
    r = run_tcli(_reads("train-step", sampler, src, tmp_path / "again"))
    assert r.returncode == 0 and b"warning" not in r.stderr


@pytest.mark.parametrize("other", ["bigger", "same size"])
def test_a_reference_model_of_another_vocabulary_is_a_usage_error(other, models, rollouts,
                                                                  tmp_path_factory, tmp_path):
    """Another vocabulary size, or as many tokens that mean other characters: exit 2 before any
    weights load, and the loop leaves no run directory behind."""
    sampler, stranger, _ = models
    d, src = rollouts
    ref = stranger if other == "bigger" else shared_model(
        tmp_path_factory, seed=0, alphabet="abcdefghijklmnopq", **TINY)
    words = "has vocabulary size" if other == "bigger" else "has another tokenizer"
    failed(run_tcli(["train-step", str(src), "-m", sampler, "-o", str(tmp_path / "ckpt"),
                     "--ref-model", ref, "--kl-coef", "0.1"]), 2, f"--ref-model {ref}", words)
    r = run_tcli(["loop", "--model", sampler, "--train-data", str(d / "p.jsonl"), "--run-dir",
                  str(tmp_path / "run"), "--ref-model", ref, "--kl-coef", "0.1", "--steps", "1",
                  "--task", "arith"])
    failed(r, 2, "--ref-model (train.ref_model):", words)
    assert not (tmp_path / "run").exists() and not (tmp_path / "ckpt").exists()
