"""The hf engine's preallocated KV cache: same tokens and log-probs, byte for
byte, as transformers' DynamicCache path for any batching, and the layer's own invariants."""

from __future__ import annotations

import orjson
import pytest

torch = pytest.importorskip("torch")

from tcli.config.stages import SampleOptions  # noqa: E402
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
    child.batch_select_indices(torch.tensor([2]))
    assert child.keys.shape == (1, 3, 9, 4) and torch.equal(child.keys[0, :, :4], k[0, :, 2:])
