"""One RL policy-gradient update (train-step) as a library: load a checkpoint with its optimizer
state, run epochs x mini-batches optimizer steps over advantaged rollouts, save a new checkpoint.

Data parallelism: under ``torchrun`` every rank holds the same sample list and takes a
deterministic, token-balanced shard of each mini-batch; the loss numerator is divided by the
GLOBAL denominator (token or sequence count, all-reduced before the first backward) and scaled by
the world size, so DDP's gradient averaging yields exactly the 1-process gradient. Micro-batches
(by a padded-token budget) accumulate gradients under ``no_sync`` and only the last one syncs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from tcli.errors import DataError, TcliError, UsageError
from tcli.records import float_array, token_array

LOGPROB_TOLERANCE = 1e-3  # a log-prob above this is not a log-prob (float noise stays below)
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


# ----------------------------------------------------------------------------- configuration

@dataclass
class TrainConfig:
    """Hyper-parameters of a train step. Names match ``LoopConfig`` so the loop can pass its own."""

    lr: float = 1e-6
    clip_low: float = 0.2
    clip_high: float = 0.28
    dual_clip: float = 3.0              # 0 disables the dual-clip bound
    loss_agg: str = "token-mean"
    kl_coef: float = 0.0
    kl_estimator: str = "k3"
    ref_model: str | None = None
    epochs: int = 1
    mini_batches: int = 1
    micro_batch_tokens: int = 16384
    max_grad_norm: float = 1.0          # 0 = no clipping (the norm is still reported)
    weight_decay: float = 0.0
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    seed: int = 0
    bf16: bool = False
    grad_checkpointing: bool = False
    device: str = "auto"

    @classmethod
    def from_mapping(cls, d: Mapping[str, Any], **overrides) -> "TrainConfig":
        """Pick the keys this config knows from a larger mapping (e.g. a LoopConfig dict)."""
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in {**dict(d), **overrides}.items() if k in names}
        if "adam_betas" in kw:
            kw["adam_betas"] = tuple(kw["adam_betas"])
        return cls(**kw)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["adam_betas"] = list(self.adam_betas)
        return d

    def validate(self) -> "TrainConfig":
        """Usage errors before anything heavy is loaded."""
        from tcli.train.loss import KL_ESTIMATORS, LOSS_AGGREGATIONS

        LOSS_AGGREGATIONS.get(self.loss_agg)
        KL_ESTIMATORS.get(self.kl_estimator)
        checks = [
            (self.lr >= 0 and math.isfinite(self.lr), "--lr must be a finite number >= 0"),
            (0 <= self.clip_low < 1, "--clip-low must be in [0, 1)"),
            (self.clip_high >= 0, "--clip-high must be >= 0"),
            (self.dual_clip == 0 or self.dual_clip > 1, "--dual-clip must be > 1 (or 0 to disable)"),
            (self.kl_coef >= 0, "--kl-coef must be >= 0"),
            (self.kl_coef == 0 or self.ref_model, "--kl-coef > 0 needs --ref-model"),
            (self.epochs >= 1, "--epochs must be >= 1"),
            (self.mini_batches >= 1, "--mini-batches must be >= 1"),
            (self.micro_batch_tokens >= 1, "--micro-batch-tokens must be >= 1"),
            (self.max_grad_norm >= 0, "--max-grad-norm must be >= 0"),
            (self.weight_decay >= 0, "--weight-decay must be >= 0"),
            (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:"),
             "--device must be auto, cpu or cuda"),
        ]
        for ok, msg in checks:
            if not ok:
                raise UsageError(msg)
        return self


# ----------------------------------------------------------------------------- samples

@dataclass
class TrainSample:
    """The four arrays train-step needs from a rollout record (small, picklable for broadcast)."""

    prompt: np.ndarray       # int64
    tokens: np.ndarray       # int64
    old_logp: np.ndarray     # float32, behaviour policy
    adv: np.ndarray          # float32
    line: int = 0

    def __len__(self) -> int:
        return len(self.prompt) + len(self.tokens)


def sample_from_record(rec: dict, vocab_size: int | None = None) -> TrainSample:
    """Validate one record; DataError names the field (the caller adds file and line)."""
    prompt = token_array(rec, "prompt_token_ids")
    tokens = token_array(rec, "token_ids")
    if len(prompt) == 0:
        raise DataError("is empty; the first response token needs a context", field="prompt_token_ids")
    logp = float_array(rec, "logprobs", len(tokens))
    if len(logp) and logp.max() > LOGPROB_TOLERANCE:
        raise DataError(f"log-probs must be <= 0, got {logp.max():.6g}", field="logprobs")
    adv = float_array(rec, "advantages", len(tokens))
    if vocab_size is not None:
        for name, arr in (("prompt_token_ids", prompt), ("token_ids", tokens)):
            if len(arr) and arr.max() >= vocab_size:
                raise DataError(f"token id {int(arr.max())} is outside the model's vocabulary "
                                f"(size {vocab_size})", field=name)
    return TrainSample(prompt, tokens, logp.astype(np.float32), adv.astype(np.float32))


def samples_from_records(records: Iterable, source: str = "<records>",
                         vocab_size: int | None = None) -> list[TrainSample]:
    """Records (dicts, or (line, dict) pairs from RecordReader) to validated samples."""
    out = []
    for i, item in enumerate(records, 1):
        line, rec = item if isinstance(item, tuple) else (i, item)
        try:
            s = sample_from_record(rec, vocab_size)
        except DataError as e:
            raise e.located(source, line) from None
        s.line = line
        out.append(s)
    return out


# ----------------------------------------------------------------------------- distributed

@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_device(pref: str = "auto", local_rank: int = 0):
    import torch

    if pref == "auto":
        pref = "cuda" if torch.cuda.is_available() else "cpu"
    if pref == "cuda":
        if not torch.cuda.is_available():
            raise UsageError("--device cuda: no CUDA device is available")
        pref = f"cuda:{local_rank}"
    return torch.device(pref)


def init_distributed(device_pref: str = "auto") -> DistInfo:
    """Join the torchrun process group when WORLD_SIZE > 1 (gloo on CPU, nccl on GPU)."""
    ws = int(os.environ.get("WORLD_SIZE", "1"))
    if ws <= 1:
        return DistInfo()
    import torch
    import torch.distributed as dist

    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_pref, local)
    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return DistInfo(dist.get_rank(), dist.get_world_size(), local)


def broadcast_object(obj, info: DistInfo):
    """Rank 0's object on every rank (identity when not distributed)."""
    if not info.enabled:
        return obj
    import torch.distributed as dist

    box = [obj if info.is_main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def shard_balanced(lengths: Sequence[int], world_size: int, rank: int) -> list[int]:
    """Indices for ``rank``: longest first to the rank with the fewest tokens (ties: lower rank).
    Every rank computes the same assignment, so no communication is needed."""
    load = [0] * world_size
    mine = []
    for i in sorted(range(len(lengths)), key=lambda i: (-int(lengths[i]), i)):
        r = min(range(world_size), key=lambda k: (load[k], k))
        load[r] += int(lengths[i])
        if r == rank:
            mine.append(i)
    return sorted(mine)


# ----------------------------------------------------------------------------- model loading

def _check_model_dir(path: str) -> None:
    if os.path.isdir(path):
        if not any(os.path.exists(os.path.join(path, f)) for f in WEIGHT_FILES) and not any(
                f.endswith(".safetensors") for f in os.listdir(path)):
            raise DataError(f"checkpoint directory {path} has no model weights "
                            f"(expected model.safetensors)", file=path)
        if not os.path.exists(os.path.join(path, "config.json")):
            raise DataError(f"checkpoint directory {path} has no config.json", file=path)
    elif os.path.exists(path):
        raise UsageError(f"model path {path} is a file, not a checkpoint directory")
    elif os.path.isabs(path) or path.startswith(".") or path.count("/") != 1:
        # not a hub name ("org/name"): fail now instead of asking a hub about a typo
        raise UsageError(f"model directory not found: {path}")


def model_vocab_size(path: str) -> int:
    """Vocabulary size for input validation, read from config.json without importing torch
    (bad input fails in a fraction of a second); AutoConfig for anything unusual."""
    import orjson

    _check_model_dir(path)
    try:
        with open(os.path.join(path, "config.json"), "rb") as f:
            cfg = orjson.loads(f.read())
        for d in (cfg, cfg.get("text_config") or {}):
            v = d.get("vocab_size")
            if isinstance(v, int) and not isinstance(v, bool) and v > 0:
                return v
    except (OSError, ValueError, AttributeError):
        pass
    return int(load_model_config(path).vocab_size)


def load_model_config(path: str):
    """The model's config (cheap: vocab size for input validation before loading weights)."""
    from tcli.models.quiet import quiet_transformers

    quiet_transformers()
    _check_model_dir(path)
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise TcliError(f"cannot load model config from {path}: {' '.join(str(e).split())}") from None


def load_model(path: str, device, *, train: bool):
    """float32 master weights (autocast gives bf16 compute); dropout forced off when training."""
    import torch
    from transformers import AutoModelForCausalLM

    from tcli.models.quiet import quiet_transformers

    quiet_transformers()
    _check_model_dir(path)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    except (OSError, ValueError) as e:
        raise TcliError(f"cannot load model from {path}: {' '.join(str(e).split())}") from None
    model.to(device)
    if train:
        model.train()
        disable_dropout(model)
    else:
        model.eval()
        model.requires_grad_(False)
    return model


def load_tokenizer(path: str):
    """The checkpoint's tokenizer, or None when the directory has none (weights-only dirs)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, TypeError):
        return None


def disable_dropout(model) -> None:
    """model.train() for autograd/checkpointing semantics, but no dropout: the importance ratio
    must compare the same deterministic policy the sampler used."""
    import torch

    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
        for attr in ("attention_dropout", "dropout", "hidden_dropout"):
            if isinstance(getattr(m, attr, None), float):
                setattr(m, attr, 0.0)


def load_optimizer_state(path: str, device) -> dict:
    """torch.load with weights_only=True: tensors and plain containers only, never code."""
    import pickle

    import torch

    try:
        return torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else "unsafe pickle"
        raise TcliError(f"refusing to load optimizer state {path}: not a plain tensor file "
                        f"(weights_only=True rejected it: {first})") from None
    except (RuntimeError, EOFError, OSError) as e:
        raise TcliError(f"cannot read optimizer state {path}: {' '.join(str(e).split())}") from None


def read_checkpoint_state(path: str) -> dict:
    from tcli.models.checkpoint import STATE_FILE, read_state

    try:
        st = read_state(path) if os.path.isdir(path) else {}
    except ValueError as e:
        raise DataError(f"invalid JSON ({e})", file=os.path.join(path, STATE_FILE)) from None
    if not isinstance(st, dict):
        raise DataError("must be a JSON object", file=os.path.join(path, STATE_FILE))
    return st


# ----------------------------------------------------------------------------- trainer

@dataclass
class _Acc:
    """Local sums for the metrics record (all-reduced once at the end of a step)."""

    loss: float = 0.0
    pg_loss: float = 0.0
    kl: float = 0.0
    clipped: float = 0.0
    dual_clipped: float = 0.0
    entropy: float = 0.0
    approx_kl: float = 0.0
    tokens: float = 0.0
    seqs: float = 0.0
    grad_norms: list = field(default_factory=list)
    skipped: int = 0

    KEYS = ("loss", "pg_loss", "kl", "clipped", "dual_clipped", "entropy", "approx_kl",
            "tokens", "seqs")


class Trainer:
    """Model + AdamW (+ frozen reference model) for repeated ``step(records)`` calls.

    ``loop`` keeps one Trainer alive across iterations; the CLI makes one per call. Only rank 0
    writes checkpoints.
    """

    def __init__(self, model_dir: str, config: TrainConfig | None = None, *,
                 dist_info: DistInfo | None = None):
        import torch

        self.config = cfg = (config or TrainConfig()).validate()
        self.model_dir = model_dir
        self.dist = dist_info or init_distributed(cfg.device)
        self.device = resolve_device(cfg.device, self.dist.local_rank)
        torch.manual_seed(cfg.seed)
        state = read_checkpoint_state(model_dir)
        self.step_count = int(state.get("step", 0))
        self.policy_version = int(state.get("policy_version", 0))
        self.optimizer_steps = int(state.get("optimizer_steps", 0))

        self.model = load_model(model_dir, self.device, train=True)
        self.model.config.use_cache = False
        if cfg.grad_checkpointing:
            kw = {"use_reentrant": False}
            if hasattr(self.model, "activation_checkpointing_enable"):
                self.model.activation_checkpointing_enable(activation_checkpointing_kwargs=kw)
            else:
                self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kw)
        self.tokenizer = load_tokenizer(model_dir) if self.dist.is_main else None
        self.vocab_size = int(self.model.config.vocab_size)
        self.pad_id = int(getattr(self.model.config, "pad_token_id", None) or 0)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=cfg.lr,
                                           betas=tuple(cfg.adam_betas), eps=cfg.adam_eps,
                                           weight_decay=cfg.weight_decay)
        from tcli.models.checkpoint import OPTIMIZER_FILE

        opt_path = os.path.join(model_dir, OPTIMIZER_FILE)
        if os.path.isdir(model_dir) and os.path.exists(opt_path):
            sd = load_optimizer_state(opt_path, self.device)
            try:
                self.optimizer.load_state_dict(sd)
            except (ValueError, KeyError, TypeError) as e:
                raise TcliError(f"optimizer state {opt_path} does not match the model: {e}") from None
        for g in self.optimizer.param_groups:  # the command line wins over the saved hyper-params
            g["lr"] = cfg.lr
            g["weight_decay"] = cfg.weight_decay
            g["betas"] = tuple(cfg.adam_betas)
            g["eps"] = cfg.adam_eps

        self.ddp = self.model
        if self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel as DDP

            self.ddp = DDP(self.model, device_ids=[self.device.index] if self.device.type == "cuda"
                           else None)
        self.ref_model = None
        if cfg.ref_model:
            self.ref_model = load_model(cfg.ref_model, self.device, train=False)
            if int(self.ref_model.config.vocab_size) != self.vocab_size:
                raise UsageError(f"--ref-model {cfg.ref_model} has vocabulary size "
                                 f"{self.ref_model.config.vocab_size}, the policy {self.vocab_size}")

    # -- helpers ----------------------------------------------------------------------------
    def _autocast(self):
        import torch

        if self.config.bf16:
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _pad(self, arrays: Sequence[np.ndarray], R: int):
        import torch

        out = torch.zeros((len(arrays), R), dtype=torch.float32)
        for b, a in enumerate(arrays):
            if len(a):
                out[b, :len(a)] = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))
        return out.to(self.device, non_blocking=True)

    def _allreduce(self, values: list[float]) -> list[float]:
        if not self.dist.enabled:
            return values
        import torch
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    def _ref_logp(self, samples, idxs, batch, cache: dict):
        import torch

        from tcli.models.logprobs import batch_logprobs

        missing = [i for i in idxs if i not in cache]
        if missing:
            with torch.no_grad(), self._autocast():
                lp, _ = batch_logprobs(self.ref_model, batch)
            for row, i in enumerate(idxs):
                cache[i] = lp[row, :len(samples[i].tokens)].float()
        R = batch.targets.shape[1]
        out = torch.zeros((len(idxs), R), dtype=torch.float32, device=self.device)
        for row, i in enumerate(idxs):
            v = cache[i]
            out[row, :len(v)] = v
        return out

    def _dummy_backward(self) -> None:
        """A rank with no data in this mini-batch still joins DDP's gradient all-reduce."""
        import torch

        ids = torch.full((1, 1), self.pad_id, dtype=torch.long, device=self.device)
        with self._autocast():
            out = self.ddp(input_ids=ids, use_cache=False)
        (out.logits.float().sum() * 0.0).backward()

    # -- the step ---------------------------------------------------------------------------
    def prepare(self, records: Iterable, source: str = "<records>") -> list[TrainSample]:
        return samples_from_records(records, source, self.vocab_size)

    def step(self, records: Sequence, *, sharded: bool = False) -> dict:
        """epochs x mini_batches optimizer steps on ``records`` (dicts or TrainSamples); returns
        one metrics dict (global over ranks). ``sharded=True`` means each rank passes its own
        records (e.g. a loop that sampled per rank) instead of all ranks passing the same list."""
        import torch

        from tcli.models.logprobs import batch_logprobs, make_batch, pack_micro_batches
        from tcli.train.loss import LOSS_AGGREGATIONS, KL_ESTIMATORS, kl_k3, policy_loss

        cfg = self.config
        records = list(records)
        if not all(isinstance(r, TrainSample) for r in records):
            samples = self.prepare(records)
        else:
            samples = records
        for s in samples:
            if len(s.tokens) and (int(s.tokens.max()) >= self.vocab_size
                                  or int(s.prompt.max()) >= self.vocab_size):
                raise DataError(f"token id outside the model's vocabulary (size {self.vocab_size})",
                                line=s.line or None, field="token_ids")
        samples = [s for s in samples if len(s.tokens) > 0]  # nothing to learn from empty responses
        agg = LOSS_AGGREGATIONS.get(cfg.loss_agg)
        kl_fn = KL_ESTIMATORS.get(cfg.kl_estimator)
        world = self.dist.world_size
        shard_world, shard_rank = (1, 0) if sharded else (world, self.dist.rank)
        acc = _Acc()
        ref_cache: dict = {}
        t0 = time.perf_counter()
        self.model.train()
        n_steps = 0

        for epoch in range(cfg.epochs):
            rng = np.random.default_rng([cfg.seed, self.step_count, epoch])
            perm = rng.permutation(len(samples)) if len(samples) else np.zeros(0, dtype=np.int64)
            for mb in np.array_split(perm, cfg.mini_batches):
                mb = [int(i) for i in mb]
                mine = [mb[j] for j in shard_balanced([len(samples[i]) for i in mb],
                                                      shard_world, shard_rank)]
                # global denominator first: every micro-batch divides by the same number
                local_tok = float(sum(len(samples[i].tokens) for i in mine))
                local_seq = float(len(mine))
                g_tok, g_seq = self._allreduce([local_tok, local_seq])
                denom = g_tok if agg.by_tokens else g_seq
                if denom <= 0:
                    continue  # an empty mini-batch on every rank: no optimizer step
                micro = pack_micro_batches([len(samples[i]) for i in mine], cfg.micro_batch_tokens)
                micro = [[mine[j] for j in m] for m in micro]
                step_loss = 0.0
                if not micro:
                    self._dummy_backward()
                for k, idxs in enumerate(micro):
                    last = k == len(micro) - 1
                    sync = contextlib.nullcontext() if (last or not self.dist.enabled) \
                        else self.ddp.no_sync()
                    batch = make_batch([samples[i].prompt for i in idxs],
                                       [samples[i].tokens for i in idxs], self.device, self.pad_id)
                    R = batch.targets.shape[1]
                    old = self._pad([samples[i].old_logp for i in idxs], R)
                    adv = self._pad([samples[i].adv for i in idxs], R)
                    ref = self._ref_logp(samples, idxs, batch, ref_cache) if self.ref_model else None
                    with sync:
                        with self._autocast():
                            logp, ent = batch_logprobs(self.ddp, batch, with_entropy=True)
                        mask = batch.mask
                        pl = policy_loss(logp, old, adv, mask, clip_low=cfg.clip_low,
                                         clip_high=cfg.clip_high, dual_clip=cfg.dual_clip or None)
                        per_tok = pl.loss
                        kl = None
                        if ref is not None:
                            kl = kl_fn(logp, ref).masked_fill(~mask, 0.0)
                            if cfg.kl_coef > 0:
                                per_tok = per_tok + cfg.kl_coef * kl
                        num = agg.numerator(per_tok, mask)
                        (num * (world / denom)).backward()
                    with torch.no_grad():
                        step_loss += float(num) / denom
                        acc.pg_loss += float(agg.numerator(pl.loss, mask)) / denom
                        if kl is not None:
                            acc.kl += float(kl.sum())
                        acc.clipped += float(pl.clipped.sum())
                        acc.dual_clipped += float(pl.dual_clipped.sum())
                        acc.entropy += float(ent.sum())
                        # KL(old || new) from the behaviour samples: k3 with r = pi_theta / pi_old
                        acc.approx_kl += float(kl_k3(old, logp.detach()).masked_fill(~mask, 0).sum())
                        acc.tokens += float(mask.sum())
                        acc.seqs += len(idxs)
                acc.loss += step_loss
                params = [p for p in self.model.parameters() if p.grad is not None]
                norm = torch.nn.utils.clip_grad_norm_(
                    params, cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf"))
                norm = float(norm)
                acc.grad_norms.append(norm)
                if math.isfinite(norm):
                    self.optimizer.step()
                    self.optimizer_steps += 1
                else:
                    acc.skipped += 1  # a non-finite gradient would poison the weights and Adam
                self.optimizer.zero_grad(set_to_none=True)
                n_steps += 1

        elapsed = time.perf_counter() - t0
        tot = dict(zip(_Acc.KEYS, self._allreduce([getattr(acc, k) for k in _Acc.KEYS])))
        # loss / pg_loss: each rank summed its numerator share over the global denominator, so
        # the all-reduced sum is the global loss per optimizer step
        ntok = max(tot["tokens"], 1.0)
        self.step_count += 1
        if n_steps:
            self.policy_version += 1
        metrics = {
            "step": self.step_count,
            "policy_version": self.policy_version,
            "loss": tot["loss"] / max(n_steps, 1),
            "pg_loss": tot["pg_loss"] / max(n_steps, 1),
            "clip_frac": tot["clipped"] / ntok,
            "dual_clip_frac": tot["dual_clipped"] / ntok,
            "entropy": tot["entropy"] / ntok,
            "approx_kl": tot["approx_kl"] / ntok,
            "grad_norm": float(np.mean(acc.grad_norms)) if acc.grad_norms else 0.0,
            "grad_norm_max": float(np.max(acc.grad_norms)) if acc.grad_norms else 0.0,
            "lr": cfg.lr,
            "num_tokens": int(round(tot["tokens"] / cfg.epochs)),
            "num_sequences": int(round(tot["seqs"] / cfg.epochs)),
            "optimizer_steps": n_steps - acc.skipped,
            "skipped_steps": acc.skipped,
            "tokens_per_s": tot["tokens"] / elapsed if elapsed > 0 else 0.0,
            "time_s": elapsed,
            "world_size": world,
        }
        if self.ref_model is not None:
            metrics["kl"] = tot["kl"] / ntok
        return metrics

    # -- checkpoints --------------------------------------------------------------------------
    def state(self, extra_state: Mapping | None = None) -> dict:
        return {"step": self.step_count, "policy_version": self.policy_version,
                "optimizer_steps": self.optimizer_steps, "seed": self.config.seed,
                "config": self.config.to_dict(), "parent": os.path.abspath(self.model_dir),
                **dict(extra_state or {})}

    def save(self, out_dir: str, extra_state: Mapping | None = None) -> str:
        """Atomic checkpoint (weights, tokenizer, optimizer.pt, tcli_state.json) from rank 0;
        the other ranks wait for it so nobody reads a half-written directory."""
        from tcli.models.checkpoint import save_pretrained_atomic

        if self.dist.is_main:
            save_pretrained_atomic(out_dir, self.model, self.tokenizer,
                                   state=self.state(extra_state), optimizer=self.optimizer)
        if self.dist.enabled:
            import torch.distributed as dist

            dist.barrier()
        return os.path.abspath(out_dir)


def load_trainer(model_dir: str, config: TrainConfig | None = None, **kw) -> Trainer:
    """A Trainer resumed from a checkpoint directory (weights + optimizer + step counters)."""
    return Trainer(model_dir, config, **kw)
