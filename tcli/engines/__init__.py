"""Generation engines, registered by name: ``hf`` (transformers) and ``vllm`` (optional extra).

Engine modules import torch/transformers/vllm only when an engine is created.
"""

from __future__ import annotations

from tcli.engines.base import Completion, Engine, SamplingConfig  # noqa: F401
from tcli.registry import Registry

ENGINES: Registry = Registry("engine")


@ENGINES.register("hf")
def _hf(model: str, **kw) -> Engine:
    from tcli.engines.hf import HFEngine

    return HFEngine(model, **kw)


@ENGINES.register("vllm")
def _vllm(model: str, **kw) -> Engine:
    from tcli.engines.vllm_engine import VLLMEngine

    return VLLMEngine(model, **kw)


def make_engine(name: str, model: str, **kw) -> Engine:
    return ENGINES.get(name)(model, **kw)
