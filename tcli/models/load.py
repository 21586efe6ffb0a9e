"""The one model loader: check a model directory, read its config, load weights and tokenizer.

Every command that reads a model goes through here, so a broken directory fails the same way
everywhere: a path that does not exist or is a file is a usage error (exit 2); a directory without
weights or config, or whose ``config.json`` / ``*.safetensors`` / index / tokenizer files are
corrupt or truncated, is bad data (exit 65) with one line naming the file. The cheap checks
(:func:`check_model_dir`: file presence, JSON parse, safetensors headers against the file sizes)
run before any weights are read; whatever slips past them is still caught at load time.

torch and transformers are imported inside the functions (importing this module is cheap).
"""

from __future__ import annotations

import contextlib
import os

from tcli.errors import DataError, UsageError
from tcli.models.files import (ADAPTER_WEIGHTS, CONFIG_FILE, TOKENIZER_FILES, base_of,
                               check_files, check_safetensors, is_hub_name, read_json_object)
from tcli.models.quiet import quiet_peft, quiet_transformers

ALLOW_DOWNLOADS_ENV = "TCLI_ALLOW_DOWNLOADS"  # =1: a hub name may be downloaded


# ----------------------------------------------------------------------------- checks (no torch)

def check_model_dir(path: str) -> None:
    """A usable model directory, or a hub name: UsageError for a missing path or a file,
    DataError naming the file for missing weights/config or a corrupt/truncated file."""
    if base_of(path):
        check_safetensors(os.path.join(path, ADAPTER_WEIGHTS))
        check_model_dir(base_of(path))  # a LoRA adapter: its base must be usable too
    elif os.path.isdir(path):
        check_files(path)
    elif os.path.exists(path):
        raise UsageError(f"model path {path} is a file, not a checkpoint directory")
    elif not is_hub_name(path):  # fail now instead of asking a hub about a typo
        raise UsageError(f"model directory not found: {path}")
    elif not downloads_allowed() and not _in_hub_cache(path):  # not a minute of retries offline
        raise UsageError(f"model directory not found: {path} (not a local directory nor in the "
                         f"Hugging Face cache; set {ALLOW_DOWNLOADS_ENV}=1 to download it)")


def downloads_allowed() -> bool:
    """Models are read from local files only unless the user asks for downloads."""
    return os.environ.get(ALLOW_DOWNLOADS_ENV, "") == "1"


def _hub_kw() -> dict:
    return {} if downloads_allowed() else {"local_files_only": True}


def _in_hub_cache(name: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(name, CONFIG_FILE), str)


# ----------------------------------------------------------------------------- config

def model_vocab_size(path: str) -> int:
    """Vocabulary size for input validation, from config.json without importing torch (bad input
    fails in a fraction of a second); AutoConfig for hub names and unusual configs."""
    check_model_dir(path)
    path = base_of(path) or path
    if os.path.isdir(path):
        cfg = read_json_object(os.path.join(path, CONFIG_FILE))
        for d in (cfg, cfg.get("text_config") or {}):
            v = d.get("vocab_size") if isinstance(d, dict) else None
            if isinstance(v, int) and not isinstance(v, bool) and v > 0:
                return v
    return int(load_config(path).vocab_size)


def load_config(path: str):
    """The model's transformers config."""
    quiet_transformers()
    check_model_dir(path)
    path = base_of(path) or path
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path, **_hub_kw())
    except Exception as e:  # noqa: BLE001 - narrowed by _load_error (bugs re-raise)
        raise _load_error(path, "config", e) from None


# ----------------------------------------------------------------------------- weights, tokenizer

def load_model(path: str, *, device="cpu", dtype=None, train: bool = False,
               keep_dropout: bool = False, attn_implementation: str | None = None,
               meta: bool = False):
    """A causal LM on ``device`` (float32 by default: master weights; autocast gives bf16 compute).

    ``train=False``: eval mode, no gradients. ``train=True``: train mode with dropout forced off
    (the importance ratio must compare the same deterministic policy the sampler used) unless
    ``keep_dropout``. ``dtype`` is a torch dtype or a name (float32, bfloat16, float16).
    A LoRA adapter directory loads as its base with the adapter merged in.
    ``meta``: the architecture only, on the meta device, no weights read (``device`` ignored):
    what ranks > 0 of a sharded load build before rank 0's weights fill their shards.
    """
    quiet_transformers()
    check_model_dir(path)
    check_not_a_critic(path)
    kw = {"dtype": torch_dtype(dtype)}
    if attn_implementation:
        kw["attn_implementation"] = attn_implementation
    if meta:  # an adapter directory merged keeps its base's architecture and names
        model = _empty_model(path, kw)
    elif base_of(path):
        return load_merged(path, device=device, dtype=dtype, train=train,
                           keep_dropout=keep_dropout, attn_implementation=attn_implementation)
    else:
        model = _from_pretrained(path, kw).to(device)
    if train:
        model.train()
        if not keep_dropout:
            disable_dropout(model)
    else:
        model.eval()
        model.requires_grad_(False)
    return model


def check_not_a_critic(path: str) -> None:
    """A critic (or any other token or sequence classifier) loaded as a causal LM gets a new,
    random LM head where its value head was: refused, rather than sampled from."""
    archs = getattr(load_config(path), "architectures", None) or []
    heads = [a for a in archs if a.endswith(("ForTokenClassification",
                                             "ForSequenceClassification"))]
    if heads and len(heads) == len(archs):
        raise UsageError(f"{path} is a critic or classifier ({', '.join(heads)}), not a causal "
                         "LM: a policy checkpoint goes here (a critic goes to --critic)")


def load_merged(path: str, *, device="cpu", dtype=None, train: bool = False, **load_kw):
    """Base + adapter of a LoRA adapter directory, merged into the base weights in memory: a
    plain transformers model (what sampling and eval run; no LoRA overhead per forward). Merged
    in float32, then cast to ``dtype``; ``load_kw`` go to the base's ``load_model``."""
    from peft import PeftModel

    base = load_model(base_of(path), device="cpu", train=train, **load_kw)
    with quiet_peft():
        pm = pretrained(PeftModel, base, path, path=path, what="LoRA adapter")
    model = pm.merge_and_unload()
    model.to(device=device, dtype=torch_dtype(dtype))
    if not train:
        model.requires_grad_(False)
    return model


def _from_pretrained(path: str, kw: dict):
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(path, **kw, **_hub_kw())
    except Exception as e:  # noqa: BLE001 - narrowed by _load_error (bugs re-raise)
        raise _load_error(path, "model", e) from None


def _empty_model(path: str, kw: dict):
    """The model of ``path``'s config with every tensor on the meta device (no memory, no
    file reads beyond config.json)."""
    import torch
    from transformers import AutoModelForCausalLM

    cfg = load_config(path)
    try:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(cfg, **kw)
    except (ValueError, KeyError) as e:
        raise _load_error(path, "model", e) from None


def load_tokenizer(path: str, *, required: bool = False):
    """The directory's tokenizer; None for a weights-only directory (no tokenizer files) unless
    ``required``. Tokenizer files that exist but do not load are bad data, never ignored."""
    quiet_transformers()
    local = os.path.isdir(path)
    if local and not any(os.path.exists(os.path.join(path, f)) for f in TOKENIZER_FILES):
        if required:
            raise DataError(f"checkpoint directory has no tokenizer (expected {TOKENIZER_FILES[0]})",
                            file=path)
        return None
    for name in ("tokenizer.json", "tokenizer_config.json"):
        if local and os.path.exists(os.path.join(path, name)):
            read_json_object(os.path.join(path, name))
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, **_hub_kw())
    except Exception as e:  # noqa: BLE001 - narrowed by _load_error (bugs re-raise)
        raise _load_error(path, "tokenizer", e) from None


def disable_dropout(model) -> None:
    """model.train() for autograd/checkpointing semantics, but no dropout."""
    import torch

    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
        for attr in ("attention_dropout", "dropout", "hidden_dropout"):
            if isinstance(getattr(m, attr, None), float):
                setattr(m, attr, 0.0)


def torch_dtype(dtype):
    """A torch dtype from a torch dtype, a name or None/"auto" (float32)."""
    import torch

    if isinstance(dtype, torch.dtype):
        return dtype
    table = {None: torch.float32, "auto": torch.float32, "float32": torch.float32,
             "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if dtype not in table:
        raise UsageError(f"unknown dtype {dtype!r}; valid: float32, bfloat16, float16")
    return table[dtype]


def check_cuda_device(pref: str) -> None:
    """UsageError for ``cuda`` or ``cuda:N`` that this machine cannot give (no CUDA, or no
    device N): torch would fail later with an assertion or an invalid ordinal (exit 1)."""
    import torch

    if not str(pref).startswith("cuda"):
        return
    if not torch.cuda.is_available():
        raise UsageError(f"--device {pref}: no CUDA device is available")
    index = str(pref).partition(":")[2]
    if index.isdigit() and int(index) >= torch.cuda.device_count():
        raise UsageError(f"--device {pref}: this machine has {torch.cuda.device_count()} CUDA "
                         "device(s), numbered from 0")


def pretrained(cls, *args, path: str, what: str, **kw):
    """``cls.from_pretrained(*args, **kw)``: the one place tcli calls it (causal LMs here, PPO
    critics, LoRA adapters), so every loading failure becomes the same one-line error."""
    try:
        return cls.from_pretrained(*args, **kw)
    except Exception as e:  # noqa: BLE001 - narrowed by _load_error (bugs re-raise)
        raise _load_error(path, what, e) from None


def _load_error(path: str, what: str, e: Exception) -> Exception:
    """A loading failure as one line: DataError naming the directory when it exists (its files are
    broken), UsageError for a hub name that cannot be resolved. Programming errors and running
    out of memory are not data problems: they are re-raised unchanged."""
    import pickle

    from safetensors import SafetensorError

    known = (OSError, ValueError, KeyError, EOFError, pickle.UnpicklingError, SafetensorError,
             RuntimeError)
    if not isinstance(e, known) or isinstance(e, MemoryError) or "out of memory" in str(e):
        raise e
    if isinstance(e, pickle.UnpicklingError):
        why = ("its weights are a pickle that could run code; refused (Weights only load "
               "failed): convert them to safetensors")
    else:
        why = " ".join(str(e).split())[:300] or type(e).__name__
    if os.path.isdir(path):
        return DataError(f"cannot load {what}: {why}", file=path)
    return UsageError(f"cannot load {what} {path!r}: {why}")


# ----------------------------------------------------------------------------- GGUF files

def load_gguf_model(path: str, dtype=None):
    """The model exactly as transformers loads the GGUF file (dequantized; still marked as
    quantized, so it cannot be saved): the reference for the converted checkpoint's logits."""
    from transformers import AutoModelForCausalLM

    quiet_transformers()
    d, name = os.path.split(os.path.abspath(path))
    try:
        with _no_gguf_progress_bar():
            model, info = AutoModelForCausalLM.from_pretrained(
                d, gguf_file=name, dtype=torch_dtype(dtype), local_files_only=True,
                output_loading_info=True)
    except Exception as e:  # noqa: BLE001 - narrowed by _gguf_error
        raise _gguf_error(path, "weights", e) from None
    missing = sorted(info.get("missing_keys") or ())  # transformers would leave them random
    if missing:
        names = ", ".join(missing[:3]) + (", ..." if len(missing) > 3 else "")
        raise DataError(f"the file has no tensor for {len(missing)} weight(s) of its "
                        f"architecture ({names})", file=path)
    model.eval()
    return model


@contextlib.contextmanager
def _no_gguf_progress_bar():
    """transformers' GGUF converter draws a plain tqdm bar that the hub switches do not reach;
    stderr is for tcli's own logs, so the bar is turned off while the file converts."""
    try:
        import functools

        from transformers import modeling_gguf_pytorch_utils as conv
        bar = conv.tqdm
    except (ImportError, AttributeError):
        yield
        return
    conv.tqdm = functools.partial(bar, disable=True)
    try:
        yield
    finally:
        conv.tqdm = bar


def load_gguf_tokenizer(path: str):
    """The tokenizer (with its chat template) transformers builds from a GGUF file's metadata."""
    from transformers import AutoTokenizer

    quiet_transformers()
    d, name = os.path.split(os.path.abspath(path))
    try:
        return AutoTokenizer.from_pretrained(d, gguf_file=name, local_files_only=True)
    except Exception as e:  # noqa: BLE001 - narrowed by _gguf_error
        raise _gguf_error(path, "tokenizer", e) from None


def _gguf_error(path: str, what: str, e: Exception) -> Exception:
    """transformers' failure to read a GGUF file as one line naming the file (exit 65); bugs and
    running out of memory re-raise unchanged."""
    import struct

    from tcli.errors import TcliError

    known = (OSError, ValueError, KeyError, IndexError, EOFError, RuntimeError, struct.error,
             NotImplementedError, TypeError)
    if isinstance(e, ImportError):
        return TcliError(f"{path}: reading GGUF {what} failed: {e}; pip install 'tcli[real]'")
    if not isinstance(e, known) or isinstance(e, MemoryError) or "out of memory" in str(e):
        raise e
    why = " ".join(str(e).split())[:300] or type(e).__name__
    return DataError(f"cannot convert GGUF {what}: {why}", file=path)
