"""The vllm engine's own logic, checked without vLLM installed.

tests/unit/test_vllm_engine.py runs the engine end to end but only where the optional extra is
installed (``make test-vllm``); the default suite never imports vLLM. The pieces below decide what
vLLM is asked for (request seeds, engine arguments, LoRA slots, the CPUs it may bind) and how its
outputs are read, so a slip in them would pass unnoticed wherever vLLM is absent.
"""

from __future__ import annotations

import json
import math
import os
import random
from types import SimpleNamespace

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from tcli.engines import vllm_engine as ve  # noqa: E402
from tcli.engines.base import SamplingConfig  # noqa: E402
from tcli.engines.sampling import topk_entropy  # noqa: E402
from tcli.errors import DataError, TcliError, UsageError  # noqa: E402


def test_request_seed_depends_on_seed_and_every_prompt_token():
    """Same (seed, prompt) → same stream whatever else is batched; any change → another."""
    base = ve.request_seed(7, [1, 2, 3])
    assert base == ve.request_seed(7, (1, 2, 3))
    others = {ve.request_seed(8, [1, 2, 3]), ve.request_seed(7, [3, 2, 1]),
              ve.request_seed(7, [1, 2]), ve.request_seed(7, [1, 2, 3, 0]),
              ve.request_seed(-7, [1, 2, 3])}
    assert base not in others and len(others) == 5
    for s in others | {base}:  # room left for vLLM's seed + sample index
        assert 0 <= s <= (1 << 62) - 1


@pytest.mark.parametrize("cpus,want", [({3}, "3"), ({0, 1}, "0-1"), ({0, 1, 2, 5, 7, 8}, "0-2,5,7-8"),
                                       ({1, 4, 6}, "1,4,6")])
def test_cpu_list_is_a_vllm_range_list(monkeypatch, cpus, want):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(cpus), raising=False)
    assert ve._cpu_list() == want


def test_configure_env_keeps_what_the_user_set(monkeypatch):
    """In-process CPU backend by default; a user's own vLLM settings win; several workers keep
    vLLM's multiprocessing."""
    for k in ("VLLM_ENABLE_V1_MULTIPROCESSING", "VLLM_CPU_OMP_THREADS_BIND", "VLLM_LOGGING_LEVEL",
              "VLLM_LOGGING_STREAM"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("VLLM_LOGGING_LEVEL", "DEBUG")
    ve._configure_env(on_cpu=True, tensor_parallel_size=2)
    assert "VLLM_ENABLE_V1_MULTIPROCESSING" not in os.environ
    assert os.environ["VLLM_LOGGING_LEVEL"] == "DEBUG"
    assert os.environ["VLLM_LOGGING_STREAM"] == "ext://sys.stderr"  # stdout carries data
    ve._configure_env(on_cpu=True, tensor_parallel_size=1)
    assert os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"
    assert os.environ["VLLM_CPU_OMP_THREADS_BIND"] == ve._cpu_list()


@pytest.mark.parametrize("rank,slot", [(1, 1), (2, 8), (8, 8), (9, 16), (64, 64), (300, 320),
                                       (512, 512)])
def test_lora_rank_slot_is_the_smallest_that_holds_the_adapter(rank, slot):
    assert ve.lora_rank_slot(rank) == slot


def test_lora_rank_above_vllms_largest_is_refused():
    with pytest.raises(UsageError, match="513 is above"):
        ve.lora_rank_slot(513)


def _adapter(tmp_path, r):
    base = tmp_path / "base"
    base.mkdir(exist_ok=True)
    ad = tmp_path / "adapter"
    ad.mkdir(exist_ok=True)
    (ad / "adapter_config.json").write_text(json.dumps({"r": r, "base_model_name_or_path": str(base)}))
    (ad / "adapter_model.safetensors").write_bytes(b"")
    return str(ad), str(base)


def test_adapter_of_reads_base_and_rank(tmp_path):
    ad, base = _adapter(tmp_path, 8)
    assert ve.adapter_of(ad) == (os.path.abspath(base), 8)
    assert ve.adapter_of(base) is None  # a directory without adapter_config.json
    assert ve.adapter_of(str(tmp_path / "missing")) is None


@pytest.mark.parametrize("r", [0, -1, True, "8", 8.0, None])
def test_adapter_with_a_bad_rank_is_bad_data(tmp_path, r):
    ad, _ = _adapter(tmp_path, r)
    with pytest.raises(DataError) as e:
        ve.adapter_of(ad)
    assert "adapter_config.json" in str(e.value) and "r" in str(e.value)


def _kwargs(monkeypatch, *, on_cpu=True, kv=None, env=None, lora_rank=0, sampling=None, **kw):
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    if env is not None:
        monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", env)
    return ve._llm_kwargs(dict(kw), on_cpu=on_cpu, kv_cache_memory_bytes=kv, max_model_len=None,
                          sampling=sampling, lora_rank=lora_rank)


def test_llm_kwargs_kv_cache_size(monkeypatch):
    """1 GiB on CPU unless the user sized it (flag or vLLM's own variable); vLLM's default on GPU."""
    assert _kwargs(monkeypatch)["kv_cache_memory_bytes"] == ve.CPU_KV_CACHE_BYTES
    assert _kwargs(monkeypatch, kv=5000.0)["kv_cache_memory_bytes"] == 5000
    assert "kv_cache_memory_bytes" not in _kwargs(monkeypatch, env="4")
    assert "kv_cache_memory_bytes" not in _kwargs(monkeypatch, on_cpu=False)
    assert _kwargs(monkeypatch, on_cpu=False, kv=1 << 20)["kv_cache_memory_bytes"] == 1 << 20


def test_llm_kwargs_defaults_and_overrides(monkeypatch):
    kw = _kwargs(monkeypatch)
    assert kw["enable_prefix_caching"] is True and "enable_lora" not in kw
    assert kw["logprobs_mode"] == "raw_logprobs"
    assert kw["worker_extension_cls"] == "tcli.engines.vllm_engine.TcliWorkerExtension"
    assert _kwargs(monkeypatch, enable_prefix_caching=False)["enable_prefix_caching"] is False
    warm = SamplingConfig(temperature=0.7)
    assert _kwargs(monkeypatch, sampling=warm)["logprobs_mode"] == "processed_logprobs"
    assert ve._llm_kwargs({}, on_cpu=False, kv_cache_memory_bytes=None, max_model_len=96.0,
                          sampling=None, lora_rank=0)["max_model_len"] == 96


def test_llm_kwargs_lora(monkeypatch):
    kw = _kwargs(monkeypatch, lora_rank=12)
    assert (kw["enable_lora"], kw["max_loras"], kw["max_lora_rank"]) == (True, 1, 16)
    assert _kwargs(monkeypatch, lora_rank=12, max_lora_rank=64)["max_lora_rank"] == 64


def test_unknown_dtype_is_refused_before_vllm_is_needed():
    with pytest.raises(UsageError, match="unknown dtype 'int8'"):
        ve.VLLMEngine("any", dtype="int8")
    assert ve._DTYPES["auto"] == ve._DTYPES[None] == "float32"  # never vLLM's silent downcast


def test_preserve_global_rng_puts_every_generator_back():
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    want = random.random(), np.random.rand(), torch.rand(1).item()
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    with ve._preserve_global_rng():
        random.seed(99), np.random.seed(99), torch.manual_seed(99)
        random.random(), np.random.rand(), torch.rand(3)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == want


def test_safetensors_weights_reads_every_file_in_name_order(tmp_path):
    from safetensors.torch import save_file

    with pytest.raises(TcliError, match="no \\*.safetensors"):
        list(ve.safetensors_weights(str(tmp_path)))
    save_file({"b": torch.ones(2)}, str(tmp_path / "model-00002.safetensors"))
    save_file({"a": torch.zeros(3), "c": torch.arange(2.0)}, str(tmp_path / "model-00001.safetensors"))
    (tmp_path / "notes.txt").write_text("not weights")
    got = list(ve.safetensors_weights(str(tmp_path)))
    assert sorted(k for k, _ in got[:2]) == ["a", "c"] and got[2][0] == "b"
    assert torch.equal(dict(got)["c"], torch.arange(2.0))


def _lp(value, rank):
    return SimpleNamespace(logprob=value, rank=rank)


def _output(tokens, positions, reason="stop"):
    return SimpleNamespace(token_ids=tokens, logprobs=positions, finish_reason=reason)


def test_completion_reads_the_sampled_tokens_logprob():
    """The sampled token's own log-prob, even where it is not the most likely one."""
    out = _output([5, 9], [{5: _lp(-0.1, 1), 2: _lp(-3.0, 2)}, {9: _lp(-2.5, 2), 4: _lp(-0.2, 1)}])
    c = ve.VLLMEngine._completion(out)
    assert (c.token_ids, c.logprobs, c.finish_reason, c.entropies) == ([5, 9], [-0.1, -2.5], "stop", None)


def test_completion_entropy_uses_the_top_k_ranked_logprobs():
    """With top_k, the sampled token is also listed when it ranks below k: it must not count."""
    pos = [{7: _lp(-1.5, 3), 1: _lp(-0.5, 1), 2: _lp(-1.2, 2)}, {1: _lp(-0.01, 1), 3: _lp(-5.0, 2)}]
    c = ve.VLLMEngine._completion(_output([7, 1], pos, "length"), top_k=2)
    want = topk_entropy(np.array([[-0.5, -1.2], [-0.01, -5.0]]))
    assert c.finish_reason == "length" and np.allclose(c.entropies, want, rtol=1e-12)
    assert all(math.isfinite(e) and e > 0 for e in c.entropies)


@pytest.mark.parametrize("out,msg", [
    (_output([1], [{1: _lp(-0.1, 1)}], "abort"), "finish_reason='abort'"),
    (_output([1, 2], None), "no log-prob"),
    (_output([1, 2], [{1: _lp(-0.1, 1)}]), "no log-prob")])
def test_completion_refuses_what_it_cannot_record(out, msg):
    with pytest.raises(TcliError, match=msg):
        ve.VLLMEngine._completion(out)
