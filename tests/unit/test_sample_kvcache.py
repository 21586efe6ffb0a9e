"""The hf engine's preallocated KV cache: same tokens and log-probs, byte for
byte, as transformers' DynamicCache path for any batching, and the layer's own invariants."""

from __future__ import annotations

import orjson
import pytest

torch = pytest.importorskip("torch")

from tcli.config.stages import SampleOptions  # noqa: E402
from tcli.engines.sampling import SamplingConfig  # noqa: E402
from tcli.stages.sample import sample_records  # noqa: E402

PROMPTS = [{"id": "s", "prompt": "ab"}, {"id": "l", "prompt": "a much longer prompt, left padded"},
           {"id": 3, "prompt": "bab"}]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from tcli.models.tiny import init_tiny_model

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield init_tiny_model(str(tmp_path_factory.mktemp("m") / "tiny"), seed=4, hidden=32, layers=2,
                          heads=4, kv_heads=2)
    torch.set_num_threads(old)


@pytest.mark.parametrize("batch_tokens", [1 << 20, 120])
@pytest.mark.parametrize("kw", [dict(mode="tree", width=3, depth=3, segment_tokens=4),
                                dict(mode="independent", n=4)], ids=["tree", "independent"])
def test_static_cache_gives_the_dynamic_cache_bytes(model, kw, batch_tokens):
    from tcli.engines.hf import HFEngine

    opts = SampleOptions(max_new_tokens=20, temperature=0.8, top_p=0.95, prompts_per_batch=3,
                         prompt_template="plain", **kw)
    out = {}
    for kv in ("dynamic", "static"):
        engine = HFEngine(model, batch_tokens=batch_tokens, kv_cache=kv)
        out[kv] = b"".join(map(orjson.dumps, sample_records(engine, PROMPTS, opts, seed=3)))
        out[kv + "_tokens"] = engine.generated_tokens
    assert out["static"] == out["dynamic"] and out["static_tokens"] == out["dynamic_tokens"]


def test_the_static_path_is_taken(model):
    from tcli.engines.hf import HFEngine
    from tcli.engines.kv import SlabLayer, new_cache

    engine = HFEngine(model)
    cache = new_cache(engine.model.config, engine.kv_cache)
    assert engine.kv_cache == "static" and all(isinstance(x, SlabLayer) for x in cache.layers)
    assert not any(isinstance(x, SlabLayer) for x in new_cache(engine.model.config, "dynamic").layers)
    with pytest.raises(ValueError, match="kv_cache"):
        HFEngine(model, kv_cache="paged")


def test_slab_layer_writes_in_place_forks_and_grows():
    from tcli.engines.kv import SlabLayer

    g = torch.Generator().manual_seed(0)
    k0, v0 = torch.randn(2, 3, 5, 4, generator=g), torch.randn(2, 3, 5, 4, generator=g)
    layer = SlabLayer(room=2)
    k, v = layer.update(k0, v0)
    assert torch.equal(k, k0) and layer.buf_k.shape == (2, 3, 7, 4)
    buf = layer.buf_k
    k1 = torch.randn(2, 3, 1, 4, generator=g)
    k, _ = layer.update(k1, k1)
    assert layer.buf_k is buf and torch.equal(k, torch.cat([k0, k1], 2))  # no reallocation
    child = layer.fork(torch.tensor([1, 1, 0]), room=3)
    assert child.buf_k.shape == (3, 3, 9, 4) and torch.equal(child.keys, k[[1, 1, 0]])
    assert layer.buf_k is buf and torch.equal(layer.keys, k)  # the parent is untouched
    child.trim_left(2)
    assert torch.equal(child.keys, k[[1, 1, 0]][:, :, 2:]) and child.get_seq_length() == 4
    for _ in range(5):  # 2 beyond the reserved room: the buffer grows, values stay
        child.update(k1[[0, 1, 1]], k1[[0, 1, 1]])
    assert child.get_seq_length() == 9 and torch.equal(child.keys[:, :, :4], k[[1, 1, 0]][:, :, 2:])
    assert torch.equal(child.keys[:, :, 4:], k1[[0, 1, 1]].expand(-1, -1, 5, -1))
    free = child.buf_k.shape[-2] - child.end
    child.batch_select_indices(torch.tensor([2]))
    assert child.keys.shape == (1, 3, 9, 4) and torch.equal(child.keys[0, :, :4], k[0, :, 2:])
    assert child.buf_k.shape[-2] - child.end == free > 0  # rows that leave keep the room free
    buf = child.buf_k
    child.update(k1[:1], k1[:1])
    assert child.buf_k is buf and torch.equal(child.keys[:, :, 9:], k1[:1])


def _ab_model(path, **attention) -> str:
    """A random Qwen3 over pad/eos/unk/a/b (EOS is likely, so rows end early) with the given
    attention settings (sliding windows, say)."""
    from transformers import AutoModelForCausalLM, GenerationConfig, Qwen3Config

    from tcli.models.checkpoint import save_pretrained_atomic
    from tcli.models.tiny import build_char_tokenizer

    tok = build_char_tokenizer("ab")
    cfg = Qwen3Config(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                      intermediate_size=64, tie_word_embeddings=True, bos_token_id=None,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **attention)
    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.generation_config = GenerationConfig(eos_token_id=tok.eos_token_id,
                                               pad_token_id=tok.pad_token_id)
    return save_pretrained_atomic(str(path), model, tok, state={})


@pytest.mark.parametrize("attention, kv", [
    (dict(use_sliding_window=True, sliding_window=3, max_window_layers=0), "static"),
    (dict(use_sliding_window=True, sliding_window=3, max_window_layers=1), "static"),
    (dict(use_sliding_window=False), "dynamic"),
], ids=["sliding", "mixed-sliding", "dynamic-cache"])
def test_left_pad_trim_is_exact_for_every_cache_kind(one_torch_thread, tmp_path, monkeypatch,
                                                     attention, kv):
    """Rows of the short prompt continue without the long prompt's pad columns (a piece of
    children that needs none): sliding-window layers cannot drop columns and must keep them,
    transformers' DynamicCache drops exactly those; the log-probs stay a full forward's."""
    from tcli.engines import hf
    from tcli.engines.hf import HFEngine

    engine = HFEngine(_ab_model(tmp_path / "ab", **attention), kv_cache=kv, batch_tokens=72)
    trims, real = [], hf.trim_left
    monkeypatch.setattr(hf, "trim_left", lambda cache, k: (trims.append(k), real(cache, k))[1])
    prompts = [engine.tokenizer("a")["input_ids"], engine.tokenizer("ab" * 8)["input_ids"]]
    for seed in range(5):
        out = engine.sample_tree(prompts, 2, 3, 2, SamplingConfig(max_new_tokens=16, seed=seed))
        for p, leaves in zip(prompts, out):
            for lf in leaves:
                with torch.inference_mode():
                    logits = engine.model(input_ids=torch.tensor([p + lf.token_ids])).logits[0]
                lp = torch.log_softmax(logits.float(), -1)[len(p) - 1:-1]
                want = lp.gather(1, torch.tensor(lf.token_ids).unsqueeze(1)).squeeze(1)
                assert torch.allclose(torch.tensor(lf.logprobs), want, atol=1e-4, rtol=0)
        if trims:
            break
    assert trims   # the pad columns were cut (or kept, for sliding windows) at least once
