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
import struct

from tcli.errors import DataError, UsageError

CONFIG_FILE = "config.json"
SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
WEIGHT_FILES = (SAFETENSORS_FILE, SAFETENSORS_INDEX, "pytorch_model.bin",
                "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")
_MAX_HEADER = 100 * 1024 * 1024  # the safetensors library's own limit


# ----------------------------------------------------------------------------- checks (no torch)

def is_hub_name(path: str) -> bool:
    """``org/name``: something only a hub can resolve (never an existing local path)."""
    return (not os.path.exists(path) and not os.path.isabs(path) and not path.startswith(".")
            and path.count("/") == 1)


def check_model_dir(path: str) -> None:
    """A usable model directory, or a hub name: UsageError for a missing path or a file,
    DataError naming the file for missing weights/config or a corrupt/truncated file."""
    if os.path.isdir(path) and _adapter_base(path):
        check_safetensors(os.path.join(path, "adapter_model.safetensors"))
        check_model_dir(_adapter_base(path))  # a LoRA adapter: its base must be usable too
    elif os.path.isdir(path):
        _check_files(path)
    elif os.path.exists(path):
        raise UsageError(f"model path {path} is a file, not a checkpoint directory")
    elif not is_hub_name(path):  # fail now instead of asking a hub about a typo
        raise UsageError(f"model directory not found: {path}")


def _adapter_base(path: str) -> str | None:
    """The base model directory of a LoRA adapter directory (tcli.train.lora), else None."""
    from tcli.train.lora import adapter_base, is_adapter_dir

    return adapter_base(path) if is_adapter_dir(path) else None


def _check_files(path: str) -> None:
    names = os.listdir(path)
    shards = sorted(n for n in names if n.endswith(".safetensors"))
    if not any(n in names for n in WEIGHT_FILES) and not shards:
        raise DataError(f"checkpoint directory has no model weights (expected {SAFETENSORS_FILE})",
                        file=path)
    if CONFIG_FILE not in names:
        raise DataError(f"checkpoint directory has no {CONFIG_FILE}", file=path)
    read_json_object(os.path.join(path, CONFIG_FILE))
    if SAFETENSORS_INDEX in names:
        index = read_json_object(os.path.join(path, SAFETENSORS_INDEX))
        wmap = index.get("weight_map")
        if not isinstance(wmap, dict) or not all(isinstance(v, str) for v in wmap.values()):
            raise DataError("has no weight_map of tensor name -> file",
                            file=os.path.join(path, SAFETENSORS_INDEX))
        for shard in sorted(set(wmap.values())):
            p = os.path.join(path, shard)
            if os.path.basename(shard) != shard or not os.path.isfile(p):
                raise DataError(f"names shard {shard!r}, which is missing",
                                file=os.path.join(path, SAFETENSORS_INDEX))
    for name in shards:
        check_safetensors(os.path.join(path, name))


def read_json_object(path: str) -> dict:
    """A JSON file that must hold an object; DataError naming the file otherwise."""
    import orjson

    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise DataError(f"cannot read: {e.strerror or e}", file=path) from None
    try:
        obj = orjson.loads(data)
    except orjson.JSONDecodeError as e:
        raise DataError(f"is not valid JSON ({e}); the file is corrupt or truncated",
                        file=path) from None
    if not isinstance(obj, dict):
        raise DataError("must hold a JSON object", file=path)
    return obj


def check_safetensors(path: str) -> None:
    """Read a safetensors header (8-byte length + JSON) and check that the tensors it lists fill
    the file exactly, as the safetensors library requires: catches random bytes and truncation
    without reading any weights."""
    import orjson

    bad = "is not a valid safetensors file ({}); the file is corrupt or truncated"
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            n = struct.unpack("<Q", head)[0] if len(head) == 8 else None
            if n is None or n > min(size - 8, _MAX_HEADER):
                raise DataError(bad.format(f"header length {n} does not fit a {size}-byte file"
                                           if n is not None else f"only {size} bytes"), file=path)
            header = orjson.loads(f.read(n))
    except OSError as e:
        raise DataError(f"cannot read: {e.strerror or e}", file=path) from None
    except orjson.JSONDecodeError:
        raise DataError(bad.format("the header is not JSON"), file=path) from None
    if not isinstance(header, dict):
        raise DataError(bad.format("the header is not a JSON object"), file=path)
    end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        if (not isinstance(offsets, list) or len(offsets) != 2
                or not all(isinstance(o, int) and o >= 0 for o in offsets)):
            raise DataError(bad.format(f"tensor {name!r} has no valid data_offsets"), file=path)
        end = max(end, offsets[1])
    if 8 + n + end != size:
        raise DataError(bad.format(f"the header lists {8 + n + end} bytes, the file has {size}"),
                        file=path)


# ----------------------------------------------------------------------------- config

def model_vocab_size(path: str) -> int:
    """Vocabulary size for input validation, from config.json without importing torch (bad input
    fails in a fraction of a second); AutoConfig for hub names and unusual configs."""
    check_model_dir(path)
    path = (os.path.isdir(path) and _adapter_base(path)) or path
    if os.path.isdir(path):
        cfg = read_json_object(os.path.join(path, CONFIG_FILE))
        for d in (cfg, cfg.get("text_config") or {}):
            v = d.get("vocab_size") if isinstance(d, dict) else None
            if isinstance(v, int) and not isinstance(v, bool) and v > 0:
                return v
    return int(load_config(path).vocab_size)


def load_config(path: str):
    """The model's transformers config."""
    from tcli.models.quiet import quiet_transformers

    quiet_transformers()
    check_model_dir(path)
    path = (os.path.isdir(path) and _adapter_base(path)) or path
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path)
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
    from tcli.models.quiet import quiet_transformers

    quiet_transformers()
    check_model_dir(path)
    kw = {"dtype": torch_dtype(dtype)}
    if attn_implementation:
        kw["attn_implementation"] = attn_implementation
    if meta:  # an adapter directory merged keeps its base's architecture and names
        model = _empty_model(path, kw)
    elif os.path.isdir(path) and _adapter_base(path):
        from tcli.train.lora import load_merged

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


def _from_pretrained(path: str, kw: dict):
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(path, **kw)
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
    from tcli.models.quiet import quiet_transformers

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
        return AutoTokenizer.from_pretrained(path)
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

    from tcli.models.quiet import quiet_transformers

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

    from tcli.models.quiet import quiet_transformers

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
