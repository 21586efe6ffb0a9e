"""Generation engines, registered by name: ``hf`` (transformers) and ``vllm`` (optional extra).

Every caller opens an engine with :func:`open_engine` from the stage's sample settings
(``SampleOptions`` or any object with its fields); engine modules import torch/transformers/vllm
only when an engine is created.
"""

from __future__ import annotations

from typing import Callable

from tcli.engines.base import Completion, Engine, SamplingConfig  # noqa: F401
from tcli.registry import Registry

Factory = Callable[..., Engine]
ENGINES: Registry[Factory] = Registry("engine")


@ENGINES.register("hf")
def _hf(model: str, opts, *, seed: int = 0, trainer=None) -> Engine:
    """With a trainer the engine samples from the trainer's own module (no second copy)."""
    from tcli.engines.hf import HFEngine

    return HFEngine(model, device=opts.device, dtype=opts.dtype, batch_tokens=opts.batch_tokens,
                    trainer=trainer, cuda_graphs=getattr(opts, "cuda_graphs", "auto"))


@ENGINES.register("vllm")
def _vllm(model: str, opts, *, seed: int = 0, trainer=None) -> Engine:
    """With a LoRA trainer, vLLM's LoRA support is on from the start (follow hands adapters)."""
    from tcli.engines.vllm_engine import VLLMEngine

    train = getattr(trainer, "opts", None)
    return VLLMEngine(model, seed=seed, sampling=opts.engine_config(seed),
                      gpu_memory_utilization=opts.gpu_memory_utilization,
                      lora_rank=int(getattr(train, "lora_rank", 0) or 0),
                      **({"dtype": opts.dtype} if opts.dtype else {}))


def open_engine(model: str, opts, *, seed: int = 0, trainer=None) -> Engine:
    """The engine named by ``opts.engine`` on ``model`` (or on ``trainer``'s weights)."""
    return ENGINES.get(opts.engine)(model, opts, seed=seed, trainer=trainer)
