"""Behaviour log-probs at the sampling temperature (sampler side).

Tokens are drawn from softmax(logits / T) then top-p; the recorded ``logprobs`` must be
log_softmax(logits / T) of the same tokens, not renormalised after top-p (verl and TRL recompute
exactly that in training), and every record names the ``temperature`` and ``top_p`` it used.
Greedy decoding records the untempered log-probs with temperature 1.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from tcli.config.stages import SampleOptions  # noqa: E402
from tcli.stages.sample import sample_records  # noqa: E402

PROMPTS = [{"id": "a", "prompt": "ab"}, {"id": "b", "prompt": "a much longer prompt abab"}]
MODES = {"independent": dict(mode="independent", n=3),
         "tree": dict(mode="tree", width=2, depth=3, segment_tokens=3)}


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    from tcli.engines.hf import HFEngine
    from tcli.models.tiny import init_tiny_model

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    d = init_tiny_model(str(tmp_path_factory.mktemp("m") / "tiny"), seed=2, hidden=32, layers=2,
                        heads=2)
    yield HFEngine(d)
    torch.set_num_threads(old)


def _sample(engine, mode, seed=4, **kw):
    opts = SampleOptions(prompt_template="plain", max_new_tokens=12, **MODES[mode]).replace(**kw)
    return list(sample_records(engine, PROMPTS, opts, seed=seed))


def _teacher_forced(engine, rec, temperature):
    """log_softmax(logits / T) of the response tokens, one uncached forward pass per record."""
    p, t = rec["prompt_token_ids"], rec["token_ids"]
    with torch.inference_mode():
        logits = engine.model(input_ids=torch.tensor([p + t])).logits[0].float()
    rows = torch.arange(len(p) - 1, len(p) - 1 + len(t))
    return torch.log_softmax(logits / temperature, -1)[rows, torch.tensor(t)]


@pytest.mark.parametrize("mode", list(MODES))
def test_logprobs_are_tempered_not_renormalised(engine, mode):
    recs = _sample(engine, mode, temperature=0.7, top_p=0.8)
    assert len(recs) >= 6
    for r in recs:
        assert r["temperature"] == 0.7 and r["top_p"] == 0.8
        got = torch.tensor(r["logprobs"])
        assert torch.allclose(got, _teacher_forced(engine, r, 0.7), atol=1e-5, rtol=0)
        # neither the raw (T = 1) distribution nor the top-p renormalised one
        assert not torch.allclose(got, _teacher_forced(engine, r, 1.0), atol=1e-3, rtol=0)


@pytest.mark.parametrize("mode", list(MODES))
def test_temperature_one_is_the_raw_distribution(engine, mode):
    recs = _sample(engine, mode, temperature=1.0)
    for r in recs:
        assert r["temperature"] == 1.0 and r["top_p"] == 1.0
        assert torch.allclose(torch.tensor(r["logprobs"]), _teacher_forced(engine, r, 1.0),
                              atol=1e-5, rtol=0)


def test_greedy_records_temperature_zero_with_logprobs_at_one(engine):
    """A greedy record says it was greedy (temperature 0); its log-probs are those at T = 1."""
    recs = _sample(engine, "independent", temperature=0.0, top_p=0.5)
    for r in recs:
        assert r["temperature"] == 0.0 and r["top_p"] == 0.5
        assert torch.allclose(torch.tensor(r["logprobs"]), _teacher_forced(engine, r, 1.0),
                              atol=1e-5, rtol=0)


def test_tokens_do_not_depend_on_the_logprob_temperature(engine):
    """Recording tempered log-probs changes no sampled token (the sampler is untouched)."""
    a = _sample(engine, "tree", temperature=0.7, seed=9)
    b = _sample(engine, "tree", temperature=0.7, seed=9)
    assert a == b
    assert [r["token_ids"] for r in a] != [r["token_ids"] for r in _sample(engine, "tree", seed=9)]


def test_vllm_logprobs_mode_selection():
    """The vllm engine's mode per setting (pure function: runs without vLLM installed)."""
    from tcli.engines.base import SamplingConfig
    from tcli.engines.vllm_engine import logprobs_mode
    from tcli.errors import UsageError

    assert logprobs_mode(SamplingConfig(temperature=1.0, top_p=0.5, min_new_tokens=3)) == "raw_logprobs"
    assert logprobs_mode(SamplingConfig(temperature=0.0, top_p=0.5)) == "raw_logprobs"
    assert logprobs_mode(SamplingConfig(temperature=0.7)) == "processed_logprobs"
    for bad in (dict(top_p=0.9), dict(min_new_tokens=2)):
        with pytest.raises(UsageError, match="temperature 0.7"):
            logprobs_mode(SamplingConfig(temperature=0.7, **bad))
