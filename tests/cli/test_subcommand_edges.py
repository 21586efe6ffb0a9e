"""The less-travelled commands given what a careless or hostile user gives them: plot into a
directory or through a link, train-step records whose sampling fields no flag could give, a
relative `--model` recorded by sample-tree and expand-tree, and show-tree decoding with another
model's tokenizer. Each failure is one line with the exit code of design §2.5 and no output."""

from __future__ import annotations

import os

import orjson
import pytest

from conftest import REPO, SMALL, failed, jsonl, parse, prompts, rollouts, run_tcli, shared_model

pytest.importorskip("torch")


# ----------------------------------------------------------------------------- plot

def _run_dir(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_bytes(jsonl([
        {"kind": "train", "step": 1, "reward_mean": 0.5, "wall_time": 1.0},
        {"kind": "train", "step": 2, "reward_mean": 0.7, "wall_time": 2.0}]))
    return run


def test_plot_into_a_directory_is_refused_and_leaves_nothing_beside_it(tmp_path):
    run = _run_dir(tmp_path)
    out = tmp_path / "fig.png"
    out.mkdir()
    (out / "keep").write_text("mine")
    failed(run_tcli(["plot", run, "-o", out]), 2, "output is a directory", "fig.png")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fig.png", "run"]  # no temporary file
    assert (out / "keep").read_text() == "mine"


def test_plot_through_a_symlink_writes_its_target_and_keeps_the_link(tmp_path):
    run = _run_dir(tmp_path)
    target, link = tmp_path / "real.svg", tmp_path / "link.svg"
    link.symlink_to(target)
    r = run_tcli(["plot", run, "-o", link])
    assert r.returncode == 0, r.stderr.decode()
    assert link.is_symlink() and target.read_bytes().startswith(b"<?xml")


# ----------------------------------------------------------------------------- train-step

@pytest.mark.parametrize("field,value,words", [
    ("max_new_tokens", -5, ["must be >= 1"]),
    ("max_new_tokens", "8", ["must be an integer"]),
    ("max_new_tokens", {"a": 1}, ["must be an integer"]),
    ("prompt_template", "Answer:", ["{prompt}"]),
    ("prompt_template", 5, ["must be a string"])])
def test_train_step_refuses_sampling_fields_its_checkpoint_could_not_be_sampled_with(
        tiny, tmp_path, field, value, words):
    """Every record agreeing on them, they would be recorded in the new checkpoint, which
    sample-tree and eval then refuse: bad data here instead, and no checkpoint."""
    recs = [{**r, field: value} for r in rollouts()]
    (tmp_path / "r.jsonl").write_bytes(jsonl(recs))
    out = tmp_path / "ckpt"
    r = run_tcli(["train-step", tmp_path / "r.jsonl", "-m", tiny, "-o", out, "-q"])
    failed(r, 65, "r.jsonl:1:", f"field '{field}'", *words)
    assert not out.exists() and sorted(os.listdir(tmp_path)) == ["r.jsonl"]


@pytest.mark.parametrize("reason", ["LENGTH", "truncated", ["length"]])
def test_mask_truncated_refuses_a_finish_reason_it_cannot_read(tiny, tmp_path, reason):
    """Read as "not truncated", such a response would stay in the loss without a word."""
    recs = rollouts()
    recs[4]["finish_reason"] = reason
    (tmp_path / "r.jsonl").write_bytes(jsonl(recs))
    r = run_tcli(["train-step", tmp_path / "r.jsonl", "-m", tiny, "-o", tmp_path / "c",
                  "--mask-truncated", "-q"])
    failed(r, 65, "r.jsonl:5:", "field 'finish_reason'", "stop or length")
    assert not (tmp_path / "c").exists()


def test_train_step_metrics_into_a_directory_is_refused_before_the_step(tiny, tmp_path):
    """Found when the metrics are appended, it was exit 1 with the new checkpoint written."""
    (tmp_path / "r.jsonl").write_bytes(jsonl(rollouts()))
    (tmp_path / "m").mkdir()
    r = run_tcli(["train-step", tmp_path / "r.jsonl", "-m", tiny, "-o", tmp_path / "c",
                  "--metrics", tmp_path / "m", "-q"])
    failed(r, 2, "--metrics", "is a directory")
    assert not (tmp_path / "c").exists() and r.stdout == b""


def test_fsdp_without_torchrun_says_it_shards_nothing(tiny, tmp_path):
    """One process holds the whole model whatever --parallel says: asked for fsdp to save
    memory, the user is told that none is saved."""
    (tmp_path / "r.jsonl").write_bytes(jsonl(rollouts()))
    r = run_tcli(["train-step", tmp_path / "r.jsonl", "-m", tiny, "-o", tmp_path / "c",
                  "--parallel", "fsdp", "-q"])
    assert r.returncode == 0, r.stderr.decode()
    assert r.stderr.decode() == ("tcli: warning: parallel = fsdp shards only under torchrun; "
                                 "this one process holds the whole model\n")


@pytest.mark.parametrize("targets", ["lm_head", "q_proj,embed_tokens"])
def test_lora_on_a_tied_lm_head_or_embedding_is_refused(tiny, tmp_path, targets):
    """Merged for sampling, the adapter's update to the shared matrix changes both sides: the
    merged model (sample-tree, eval, merge-lora) would not be the one trained."""
    with open(os.path.join(tiny, "config.json"), "rb") as f:
        assert orjson.loads(f.read())["tie_word_embeddings"]
    (tmp_path / "r.jsonl").write_bytes(jsonl(rollouts()))
    r = run_tcli(["train-step", tmp_path / "r.jsonl", "-m", tiny, "-o", tmp_path / "c",
                  "--lora-rank", "2", "--lora-targets", targets, "-q"])
    failed(r, 2, "LoRA targets", "tied")
    assert not (tmp_path / "c").exists() and r.stdout == b""


# ----------------------------------------------------------------------------- devices

@pytest.mark.parametrize("cmd", ["sample-tree", "train-step"])
def test_a_cuda_device_this_machine_lacks_is_a_usage_error(tiny, tmp_path, cmd):
    """torch's own failure ("Torch not compiled with CUDA", an invalid ordinal) was exit 1."""
    (tmp_path / "p.jsonl").write_bytes(jsonl(prompts()))
    (tmp_path / "r.jsonl").write_bytes(jsonl(rollouts()))
    args = {"sample-tree": [tmp_path / "p.jsonl", "--max-new-tokens", "4"],
            "train-step": [tmp_path / "r.jsonl", "-o", tmp_path / "c"]}[cmd]
    r = run_tcli([cmd, *args, "-m", tiny, "--device", "cuda:999", "-q"])
    failed(r, 2, "--device cuda:999")
    assert r.stdout == b"" and not (tmp_path / "c").exists()


@pytest.mark.parametrize("field,value", [("r", "8"), ("r", 2.5), ("lora_alpha", "big")])
def test_merge_lora_names_an_adapter_config_number_peft_cannot_read(tiny, tmp_path, field, value):
    """peft failed with a TypeError (exit 1) on these."""
    (tmp_path / "r.jsonl").write_bytes(jsonl(rollouts()))
    ad = tmp_path / "ad"
    r = run_tcli(["train-step", tmp_path / "r.jsonl", "-m", tiny, "-o", ad, "--lora-rank", "2",
                  "-q"])
    assert r.returncode == 0, r.stderr.decode()
    cfg = orjson.loads((ad / "adapter_config.json").read_bytes())
    (ad / "adapter_config.json").write_bytes(orjson.dumps({**cfg, field: value}))
    m = run_tcli(["merge-lora", ad, tmp_path / "merged", "-q"])
    failed(m, 65, "adapter_config.json", f"field '{field}'")
    assert not (tmp_path / "merged").exists()


def test_an_adapter_whose_base_was_replaced_by_another_tokenizer_is_refused(tmp_path):
    """init-model run again over the base with another alphabet: merged, the adapter would run
    on embeddings of another vocabulary and exit 0."""
    base, ad = tmp_path / "base", tmp_path / "ad"
    small = ["--hidden", "16", "--layers", "1", "-q"]
    assert run_tcli(["init-model", base, *small]).returncode == 0
    (tmp_path / "r.jsonl").write_bytes(jsonl(rollouts()))
    r = run_tcli(["train-step", tmp_path / "r.jsonl", "-m", base, "-o", ad, "--lora-rank", "2",
                  "-q"])
    assert r.returncode == 0, r.stderr.decode()
    assert run_tcli(["merge-lora", ad, tmp_path / "ok", "-q"]).returncode == 0  # the same base
    assert run_tcli(["init-model", base, "--alphabet", "0123456789+-=", *small]).returncode == 0
    for argv in (["merge-lora", ad, tmp_path / "merged", "-q"],
                 ["sample-tree", tmp_path / "r.jsonl", "-m", ad, "-q"]):
        failed(run_tcli(argv), 65, "adapter_config.json", "field 'base_model_name_or_path'",
               "was the base replaced?")
    assert not (tmp_path / "merged").exists()


# ----------------------------------------------------------------------------- model paths

def test_a_relative_model_is_recorded_as_its_absolute_directory(tiny, tmp_path):
    """Rollouts are read from other directories (train-step, show-tree): a relative `model`
    would name another directory there, or none, and the tokenizer check would pass."""
    rel = os.path.relpath(tiny, REPO)  # run_tcli runs in the repository
    assert not os.path.isabs(rel)
    (tmp_path / "p.jsonl").write_bytes(jsonl(prompts()[:2]))
    s = run_tcli(["sample-tree", tmp_path / "p.jsonl", "-m", rel, "--mode", "tree", "--width",
                  "2", "--depth", "2", "--segment-tokens", "3", "--max-new-tokens", "8",
                  "--prompt-template", "plain", "-q"])
    assert s.returncode == 0, s.stderr.decode()
    v = run_tcli(["verify", "-q"], input=s.stdout)
    assert v.returncode == 0, v.stderr.decode()
    e = run_tcli(["expand-tree", "-m", rel, "--expand-tokens", "16", "-q"], input=v.stdout)
    assert e.returncode == 0, e.stderr.decode()
    out = parse(e.stdout)
    assert any("expand_round" in r for r in out)
    assert {r["model"] for r in out} == {os.path.abspath(tiny)}


# ----------------------------------------------------------------------------- expand-tree

@pytest.fixture(scope="module")
def deep_trees(tiny, tmp_path_factory) -> list[dict]:
    """Verified trees of two levels (prefix tokens below the root are fed to the model)."""
    d = tmp_path_factory.mktemp("trees")
    (d / "p.jsonl").write_bytes(jsonl(prompts()[:2]))
    s = run_tcli(["sample-tree", d / "p.jsonl", "-m", tiny, "--mode", "tree", "--width", "2",
                  "--depth", "2", "--segment-tokens", "3", "--max-new-tokens", "8",
                  "--prompt-template", "plain", "-q"])
    v = run_tcli(["verify", "-q"], input=s.stdout)
    assert v.returncode == 0, v.stderr.decode()
    recs = parse(v.stdout)
    assert any(len(r["node_path"]) == 2 and r["segment_ends"][0] > 0 for r in recs)
    return recs


def _set(recs, line: int, field: str, fn) -> list[dict]:
    out = [dict(r) for r in recs]
    out[line - 1][field] = fn(out[line - 1][field])
    return out


@pytest.mark.parametrize("line,field,fn,words", [
    (1, "token_ids", lambda t: [10 ** 6, *t[1:]], ["outside the model's vocabulary"]),
    (1, "prompt_token_ids", lambda t: [10 ** 6, *t[1:]], ["outside the model's vocabulary"]),
    (2, "prompt_token_ids", lambda t: t[:-1], ["differs from the group's first"])])
def test_expand_tree_refuses_token_ids_its_model_cannot_continue(
        tiny, deep_trees, tmp_path, line, field, fn, words):
    """An id beyond the vocabulary failed inside the embedding (exit 1); a group whose records
    disagree on the prompt was continued from the first one's, and each new leaf labelled with
    its source's."""
    (tmp_path / "t.jsonl").write_bytes(jsonl(_set(deep_trees, line, field, fn)))
    r = run_tcli(["expand-tree", tmp_path / "t.jsonl", "-m", tiny, "--expand-tokens", "16",
                  "-o", tmp_path / "out.jsonl", "-q"])
    failed(r, 65, f"t.jsonl:{line}:", f"field '{field}'", *words)
    assert sorted(os.listdir(tmp_path)) == ["t.jsonl"]


# ----------------------------------------------------------------------------- show-tree

@pytest.fixture(scope="module")
def other_vocab(tmp_path_factory) -> str:
    """A tiny model whose tokenizer is not the TINY model's (a smaller alphabet)."""
    from examples.arith.task import ALPHABET

    return shared_model(tmp_path_factory, seed=0, alphabet=ALPHABET, **SMALL)


def test_show_tree_refuses_a_tokenizer_other_than_the_samplers(tiny, other_vocab, tmp_path):
    recs = [{**r, "model": tiny} for r in rollouts()]
    (tmp_path / "r.jsonl").write_bytes(jsonl(recs))
    ok = run_tcli(["show-tree", tmp_path / "r.jsonl", "--tokenizer", tiny])
    assert ok.returncode == 0, ok.stderr.decode()
    r = run_tcli(["show-tree", tmp_path / "r.jsonl", "--tokenizer", other_vocab])
    failed(r, 65, "r.jsonl:1:", "field 'model'", "--tokenizer")
    assert r.stdout == b""


def test_show_tree_refuses_token_ids_its_tokenizer_does_not_have(other_vocab, tmp_path):
    """With the sampler gone, ids beyond the given tokenizer would be dropped from the text."""
    recs = [{**r, "model": str(tmp_path / "gone")} for r in rollouts()]
    (tmp_path / "r.jsonl").write_bytes(jsonl(recs))
    r = run_tcli(["show-tree", tmp_path / "r.jsonl", "--tokenizer", other_vocab])
    failed(r, 65, "r.jsonl:", "field 'token_ids'", "outside the vocabulary")
    assert r.stdout == b""
    by_bytes = run_tcli(["show-tree", tmp_path / "r.jsonl", "--bytes"])
    assert by_bytes.returncode == 0 and orjson.dumps("p0")[1:-1] in by_bytes.stdout
