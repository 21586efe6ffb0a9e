"""Edges of ``--branch entropy`` on the hf engine (tcli.engines.entropy_tree) on a tiny model:
no room to sample (as in a segments tree, checked too), and the leaves' shape whatever the
threshold."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from tcli.engines.sampling import EntropyRule, SamplingConfig  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")
PROMPTS = [[5, 6, 7], [8, 9, 10, 11], [3]]


@pytest.fixture(scope="module")
def engine(tiny_model):
    from tcli.engines.hf import HFEngine

    return HFEngine(tiny_model)


@pytest.mark.parametrize("record", [False, True])
def test_no_room_gives_one_empty_leaf_per_prompt(engine, record):
    """max_new_tokens 0: one empty root path per prompt, ended by length (as sample_tree)."""
    cfg = SamplingConfig(temperature=1.0, max_new_tokens=0, seed=1)
    out = engine.sample_entropy_tree(PROMPTS, EntropyRule(2, 2, 0.0, 0), cfg, record=record)
    assert len(out) == len(PROMPTS)
    for leaves in out:
        (lf,) = leaves
        assert (lf.node_path, lf.token_ids, lf.logprobs, lf.segment_ends, lf.finish_reason) == \
            ((0,), [], [], [0], "length")
        assert lf.entropies == ([] if record else None)


@pytest.fixture(scope="module")
def ab_engine(tmp_path_factory):
    """Vocabulary pad/eos/unk/a/b with sharpened logits: EOS ends many paths early while others
    split, often in the same block of the every-k path."""
    from tcli.engines.hf import HFEngine
    from tcli.models.checkpoint import save_pretrained_atomic
    from tcli.models.load import load_model, load_tokenizer
    from tcli.models.tiny import init_tiny_model

    d = tmp_path_factory.mktemp("ab")
    init_tiny_model(str(d / "base"), seed=1, alphabet="ab", hidden=32, layers=2, heads=2,
                    kv_heads=1, intermediate=64)
    model, tok = load_model(str(d / "base")), load_tokenizer(str(d / "base"), required=True)
    with torch.no_grad():
        model.model.norm.weight.mul_(8.0)
    return HFEngine(save_pretrained_atomic(str(d / "sharp"), model, tok, state={}),
                    batch_tokens=512)


def _shape(out):
    return [[(lf.node_path, lf.token_ids, lf.segment_ends, lf.finish_reason) for lf in leaves]
            for leaves in out]


@pytest.mark.parametrize("seed", range(4))
def test_every_k_check_gives_the_per_token_trees_when_rows_end_and_split_together(ab_engine,
                                                                                   seed):
    """A block where as many rows end as splits add: the row count stays, the rows change."""
    prompts = [[3, 4, 3], [4, 4], [3], [4, 3, 3, 4]]
    cfg = SamplingConfig(temperature=1.0, max_new_tokens=24, seed=seed)
    rule = EntropyRule(width=2, depth=3, threshold=0.3, min_segment=1)
    trees = []
    for every in (1, 4):
        ab_engine.stop_every = every
        try:
            trees.append(_shape(ab_engine.sample_entropy_tree(prompts, rule, cfg)))
        finally:
            ab_engine.stop_every = 1
    assert trees[0] == trees[1]
    assert any(len(t) > 1 for t in trees[0])


@pytest.mark.parametrize("record", [False, True])
def test_no_room_gives_width_empty_leaves_per_prompt_in_a_segments_tree(engine, record):
    """sample_tree with max_new_tokens 0: the root's ``width`` children, empty, ended by length,
    each with the one segment end a response of length 0 has."""
    cfg = SamplingConfig(temperature=1.0, max_new_tokens=0, seed=1)
    out = engine.sample_tree(PROMPTS, 2, 3, 4, cfg, entropy=record)
    assert [[(lf.node_path, lf.token_ids, lf.logprobs, lf.segment_ends, lf.finish_reason,
              lf.entropies) for lf in leaves] for leaves in out] == \
        [[((c,), [], [], [0], "length", [] if record else None) for c in range(2)]] * 3
