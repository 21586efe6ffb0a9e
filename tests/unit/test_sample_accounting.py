"""Honest token accounting: in tree mode a segment shared by several leaves was
generated once, so ``sampled_tokens`` (loop metrics, the sampled-token budget, tokens/s) counts it
once and ``leaf_tokens`` beside it sums the full responses. Independent sampling: both equal."""

from __future__ import annotations

import os

import orjson
import pytest

from conftest import arith_run_dir  # noqa: E402
from tcli.engines import ENGINES, Completion  # noqa: E402
from tcli.stages.sample import token_counts  # noqa: E402

PROMPTS = [{"id": f"p{i}", "prompt": f"{i}+{i}=?", "answer": str(2 * i),
            "meta": {"source": "tcli-arith"}} for i in range(1, 5)]
# the loop's tree: width 2, depth 2, 3-token segments, 6 tokens per leaf, no early stop
TREE = {"mode": "tree", "width": 2, "depth": 2, "segment_tokens": 3, "max_new_tokens": 6}
UNIQUE, LEAF = 2 * 3 + 4 * 3, 4 * 6          # per prompt: 2 first segments + 4 leaf segments


def test_token_counts_by_hand():
    tree = [{"prompt_id": "a", "token_ids": [1] * 5, "node_path": [0, 0], "segment_ends": [2, 5]},
            {"prompt_id": "a", "token_ids": [1] * 4, "node_path": [0, 1], "segment_ends": [2, 4]},
            {"prompt_id": "a", "token_ids": [1] * 1, "node_path": [1], "segment_ends": [1]},
            {"prompt_id": "b", "token_ids": [1] * 3, "node_path": [0, 0], "segment_ends": [2, 3]}]
    assert token_counts(tree) == (2 + 3 + 2 + 1 + 2 + 1, 5 + 4 + 1 + 3)
    flat = [{"prompt_id": "a", "token_ids": [1] * 7, "node_path": [], "segment_ends": []}] * 3
    assert token_counts(flat) == (21, 21)


def test_hf_tree_counts_match_the_engine(tmp_path):
    """The unique count from the records equals the tokens the hf engine actually generated."""
    torch = pytest.importorskip("torch")
    from tcli.config.stages import SampleOptions
    from tcli.engines.hf import HFEngine
    from tcli.models.tiny import init_tiny_model
    from tcli.stages.sample import sample_records

    torch.set_num_threads(1)
    engine = HFEngine(init_tiny_model(str(tmp_path / "m"), seed=0, hidden=32, layers=1, heads=2))
    opts = SampleOptions(mode="tree", width=2, depth=3, segment_tokens=3, max_new_tokens=9,
                         min_new_tokens=9, prompt_template="plain")
    recs = list(sample_records(engine, PROMPTS[:2], opts, seed=1))
    assert token_counts(recs) == (2 * (2 * 3 + 4 * 3 + 8 * 3), 2 * 8 * 9) == (84, 144)
    assert engine.generated_tokens == 84
    engine.generated_tokens = 0
    free = list(sample_records(engine, PROMPTS[:2], opts.replace(min_new_tokens=0, max_new_tokens=30,
                                                                 segment_tokens=2), seed=2))
    assert token_counts(free)[0] == engine.generated_tokens < token_counts(free)[1]
    ind = list(sample_records(engine, PROMPTS[:2], opts.replace(mode="independent", n=3), seed=1))
    assert token_counts(ind) == (2 * 3 * 9, 2 * 3 * 9)


class TreeScriptedEngine:
    """``generate`` only (so the loop samples trees level by level): every completion is exactly
    ``max_new_tokens`` letters long and never stops, so the tree is full and its counts exact."""

    name = "scripted-tree"

    def __init__(self, model: str, opts, *, seed: int = 0, trainer=None):
        from transformers import AutoTokenizer

        self.model_path = model
        self.tokenizer = AutoTokenizer.from_pretrained(model)
        self.policy_version = trainer.policy_version if trainer else 0
        self.digit = self.tokenizer("7", add_special_tokens=False)["input_ids"][0]

    def generate(self, prompts, n, cfg):
        comp = Completion([self.digit] * cfg.max_new_tokens, [-1.0] * cfg.max_new_tokens, "length")
        return [[comp] * n for _ in prompts]

    def load_weights(self, model_dir, policy_version):
        self.policy_version = policy_version

    def follow(self, trainer):
        self.policy_version = trainer.policy_version


if "scripted-tree" not in ENGINES:
    ENGINES.register("scripted-tree")(TreeScriptedEngine)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return arith_run_dir(tmp_path_factory, "accounting", {"prompts.jsonl": PROMPTS})


def _run(model, run_dir, **flags):
    from tcli.config.loop import load_config
    from tcli.loop import run_loop

    d, path = model
    base = {"model": path, "train_data": str(d / "prompts.jsonl"), "run_dir": str(run_dir),
            "steps": 4, "prompts_per_step": 4, "engine": "scripted-tree", "task": "arith",
            "workers": 0, "prompt_template": "plain", "lr": 1e-3, "estimator": "grpo",
            "eval_every": 0, "seed": 1, **TREE}
    if flags.get("mode", "tree") != "tree":  # a tree's shape is refused in independent mode
        base = {k: v for k, v in base.items() if k == "max_new_tokens" or k not in TREE}
    run_loop(load_config(None, {**base, **flags}), log=lambda s: None)
    with open(os.path.join(run_dir, "metrics.jsonl"), "rb") as f:
        return [m for m in map(orjson.loads, f.read().splitlines()) if m["kind"] == "train"]


def test_loop_counts_tree_tokens_once_and_budgets_on_them(model, tmp_path):
    # 4 prompts x 18 unique = 72 per step; leaf tokens 96. A 150-token budget is crossed by the
    # third step's unique tokens (216); counting leaf tokens would have stopped after two (192).
    from tcli.io import RecordReader

    train = _run(model, tmp_path / "run", max_sampled_tokens=150)
    assert [m["step"] for m in train] == [1, 2, 3]
    for i, m in enumerate(train, 1):
        assert (m["sampled_tokens"], m["leaf_tokens"]) == (4 * UNIQUE, 4 * LEAF) == (72, 96)
        assert m["sampled_tokens_total"] == 72 * i
        s = m["seconds_sample"]  # rounded to 1e-4 s in the metrics record
        assert 72 / (s + 5e-5) <= m["tokens_per_s_sample"] <= 72 / max(s - 5e-5, 1e-9)
        recs = [r for _, r in RecordReader(str(tmp_path / "run" / "rollouts" / f"step_{i}.arrow"))]
        assert len(recs) == 16 and sum(len(r["token_ids"]) for r in recs) == m["leaf_tokens"]


def test_loop_independent_counts_are_equal(model, tmp_path):
    train = _run(model, tmp_path / "run", steps=1, mode="independent", n=4)
    assert train[0]["sampled_tokens"] == train[0]["leaf_tokens"] == 4 * 4 * 6
