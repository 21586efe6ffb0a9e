"""SFT's pieces one by one (tcli.sft): pair encoding, the loss and its mode handling, the
learning-rate schedule's values, the batches, one optimizer step's settings, and what a short
run reports and saves."""

from __future__ import annotations

import json
import math
import os

import pytest

torch = pytest.importorskip("torch")

from conftest import SMALL  # noqa: E402
from tcli.sft import (_sft_step, encode_pairs, lr_schedule, response_loss,  # noqa: E402
                      response_nll, sft, shuffled_batches)

pytestmark = pytest.mark.usefixtures("one_torch_thread")
ALPHABET = "0123456789+-=?#\n "
PAIRS = [("1+2=?\n", "#### 3"), ("5-1=?\n", "#### 4"), ("2+2=?\n", "#### 4")]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny model with dropout in its attention, so the seed decides the masks."""
    from tcli.models.tiny import init_tiny_model

    d = init_tiny_model(str(tmp_path_factory.mktemp("sft") / "m"), seed=0, alphabet=ALPHABET,
                        **SMALL)
    cfg_path = os.path.join(d, "config.json")
    cfg = json.load(open(cfg_path))
    cfg["attention_dropout"] = 0.5
    with open(cfg_path, "w") as f:
        json.dump(cfg, f)
    return d


@pytest.fixture(scope="module")
def loaded(model_dir):
    from tcli.models.load import load_model, load_tokenizer

    return load_model(model_dir, train=True), load_tokenizer(model_dir, required=True)


def test_encode_pairs(loaded):
    _, tok = loaded
    prompts, responses = encode_pairs(tok, PAIRS)
    assert prompts[0] == tok(PAIRS[0][0], add_special_tokens=False)["input_ids"]
    assert responses[0][-1] == tok.eos_token_id and tok.eos_token_id not in responses[0][:-1]
    _, bare = encode_pairs(tok, PAIRS, add_eos=False)
    assert [r + [tok.eos_token_id] for r in bare] == responses
    with pytest.raises(ValueError, match="example 1: empty prompt"):
        encode_pairs(tok, [PAIRS[0], ("", "#### 1")])


def test_loss_is_the_token_mean_and_nll_keeps_the_mode(loaded):
    model, tok = loaded
    prompts, responses = encode_pairs(tok, PAIRS)
    model.eval()
    with torch.no_grad():
        each = [float(response_loss(model, [p], [r])) for p, r in zip(prompts, responses)]
        both = float(response_loss(model, prompts, responses))
    lengths = [len(r) for r in responses]
    assert both == pytest.approx(sum(e * n for e, n in zip(each, lengths)) / sum(lengths),
                                 rel=1e-5)
    model.train()
    assert response_nll(model, prompts, responses) == pytest.approx(both, rel=1e-5)
    assert model.training
    model.eval()
    response_nll(model, prompts, responses)
    assert not model.training
    model.train()


def test_an_empty_response_set_has_loss_zero(loaded):
    model, tok = loaded
    prompts, responses = encode_pairs(tok, [("1+1=?\n", "")], add_eos=False)
    assert responses == [[]]
    with torch.no_grad():
        assert float(response_loss(model, prompts, responses)) == 0.0


def test_lr_schedule_values():
    warm = lr_schedule(1.0, 10, warmup=4, schedule="constant")
    assert [warm(k) for k in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    cos = lr_schedule(2.0, 6, warmup=2, min_lr_ratio=0.1)
    assert [cos(0), cos(1), cos(2)] == [1.0, 2.0, 2.0]   # the first decay step is the peak
    assert cos(4) == pytest.approx(2.0 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 2))))
    assert cos(5) == pytest.approx(2.0 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 3 / 4))))
    assert cos(6) == pytest.approx(0.2)   # the floor, one step past the last
    assert lr_schedule(1.0, 3, warmup=3)(2) == 1.0
    with pytest.raises(ValueError, match="'constant' or 'cosine'"):
        lr_schedule(1.0, 3, schedule="linear")


def test_batches_are_fresh_shuffles_of_every_example():
    it = shuffled_batches(5, 2, seed=1)
    batches = [next(it) for _ in range(10)]   # 20 draws: 4 epochs of 5
    assert all(len(b) == 2 for b in batches)
    flat = [i for b in batches for i in b]
    epochs = [flat[i:i + 5] for i in range(0, 20, 5)]
    assert all(sorted(e) == list(range(5)) for e in epochs)
    assert len({tuple(e) for e in epochs}) > 1   # each epoch its own order
    again = shuffled_batches(5, 2, seed=1)
    assert [next(again) for _ in range(10)] == batches
    other = shuffled_batches(5, 2, seed=2)
    assert [next(other) for _ in range(10)] != batches


def _weights(model) -> list:
    return [p.detach().clone() for p in model.parameters()]


def _changed(before, model) -> bool:
    return any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_one_step_takes_its_lr_and_clips_only_when_asked(model_dir, loaded):
    from tcli.models.load import load_model

    _, tok = loaded
    prompts, responses = encode_pairs(tok, PAIRS)
    model = load_model(model_dir, train=True)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    before = _weights(model)
    loss = _sft_step(model, opt, prompts, responses, lr=0.0, max_grad_norm=1.0,
                     micro_batch_tokens=4096)
    assert math.isfinite(loss) and not _changed(before, model)   # lr 0: nothing moves
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)   # no moments yet
    _sft_step(model, opt, prompts, responses, lr=1e-2, max_grad_norm=0.0,
              micro_batch_tokens=4096)
    assert _changed(before, model)   # max_grad_norm 0: no clipping (not: clip to zero)


def test_a_short_run_reports_saves_and_repeats(model_dir, tmp_path):
    from tcli.models.checkpoint import read_state

    seen = []
    res = sft(model_dir, PAIRS, str(tmp_path / "a"), steps=5, lr=1e-2, batch_size=2, seed=3,
              log_every=2, callback=lambda step, loss, m: seen.append((step, loss)),
              extra_state={"task": "arith"}, max_new_tokens=12)
    assert res["steps"] == 5 and [s for s, _ in seen] == [2, 4]
    assert res["loss_first"] != res["loss_last"]
    st = read_state(str(tmp_path / "a"))
    assert st["sft"]["loss_last"] == res["loss_last"] and st["task"] == "arith"
    assert st["sampling"]["max_new_tokens"] == 12 and "versions" in st
    assert json.load(open(tmp_path / "a" / "config.json"))["use_cache"] is True

    # the same seed, whatever the global RNG did in between: the same weights
    torch.manual_seed(123)
    torch.rand(7)
    seen2 = []
    res2 = sft(model_dir, PAIRS, str(tmp_path / "b"), steps=5, lr=1e-2, batch_size=2, seed=3,
               log_every=2, callback=lambda step, loss, m: seen2.append((step, loss)))
    assert seen2 == seen and res2["loss_last"] == res["loss_last"]
    assert "max_new_tokens" not in read_state(str(tmp_path / "b"))["sampling"]
    # each callback gets the mean loss of the steps since the last one
    losses = []
    sft(model_dir, PAIRS, str(tmp_path / "c"), steps=5, lr=1e-2, batch_size=2, seed=3,
        log_every=1, callback=lambda step, loss, m: losses.append(loss))
    assert seen[1][1] == pytest.approx((losses[2] + losses[3]) / 2, rel=1e-6)
    assert res["loss_first"] == losses[0]


def test_weight_decay_reaches_the_optimizer(model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    for name, wd in (("plain", 0.0), ("decayed", 0.5)):
        sft(model_dir, PAIRS, str(tmp_path / name), steps=1, lr=1e-2, batch_size=3, seed=0,
            weight_decay=wd)
    a, b = (AutoModelForCausalLM.from_pretrained(str(tmp_path / n)) for n in ("plain", "decayed"))
    assert any(not torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))


def test_zero_steps_saves_the_start_and_bad_settings_fail_first(model_dir, tmp_path):
    from tcli.models.checkpoint import read_state

    res = sft(model_dir, PAIRS, str(tmp_path / "z"), steps=0, extra_state={"versions": {"x": 1}})
    assert res["steps"] == 0 and res["loss_first"] is None and res["loss_last"] is None
    assert read_state(str(tmp_path / "z"))["versions"] == {"x": 1}   # extra_state has the last word
    for kw in (dict(steps=-1), dict(steps=1, batch_size=0)):
        with pytest.raises(ValueError, match="steps must be >= 0 and batch_size >= 1"):
            sft(model_dir, PAIRS, str(tmp_path / "bad"), **kw)
    assert not (tmp_path / "bad").exists()
