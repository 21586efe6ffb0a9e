"""What a model directory's files must hold, checked without torch: the weights and config a
checkpoint needs, JSON objects, safetensors headers against the file sizes, and the files of a
LoRA adapter directory (peft's ``adapter_config.json`` naming its base model).

A missing or broken file is bad data (exit 65) with one line naming the file.
"""

from __future__ import annotations

import hashlib
import math
import os
import struct
from functools import lru_cache

import orjson

from tcli.errors import DataError

CONFIG_FILE = "config.json"
SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
WEIGHT_FILES = (SAFETENSORS_FILE, SAFETENSORS_INDEX, "pytorch_model.bin",
                "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")
_MAX_HEADER = 100 * 1024 * 1024  # the safetensors library's own limit
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
TOKENIZER_JSON = "tokenizer.json"


def is_hub_name(path: str) -> bool:
    """``org/name``: something only a hub can resolve (never an existing local path)."""
    return (not os.path.exists(path) and not os.path.isabs(path) and not path.startswith(".")
            and path.count("/") == 1)


def check_files(path: str) -> None:
    """A checkpoint directory's weights and config are there and whole (no weights read)."""
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



def is_adapter_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, ADAPTER_CONFIG))


def adapter_base(path: str) -> str:
    """The base model directory an adapter directory names (checked: it must exist)."""
    cfg_path = os.path.join(path, ADAPTER_CONFIG)
    cfg = read_json_object(cfg_path)
    _check_lora_numbers(cfg, cfg_path)
    base = cfg.get("base_model_name_or_path")
    if not isinstance(base, str) or not base:
        raise DataError("names no base model", file=cfg_path, field="base_model_name_or_path")
    if not os.path.isabs(base) and not os.path.exists(base):
        base = os.path.join(path, base)  # relative to the adapter directory
    if not os.path.isdir(base):
        raise DataError(f"names base model {base!r}, which is not a directory", file=cfg_path,
                        field="base_model_name_or_path")
    if not os.path.isfile(os.path.join(path, ADAPTER_WEIGHTS)):
        raise DataError(f"adapter directory has no {ADAPTER_WEIGHTS}", file=path)
    if other_tokenizer(path, base):  # the base directory was replaced since training
        raise DataError(f"names base model {base!r}, whose tokenizer is not the one the adapter "
                        "was trained with (was the base replaced?)", file=cfg_path,
                        field="base_model_name_or_path")
    return base


def _check_lora_numbers(cfg: dict, cfg_path: str) -> None:
    """peft reads ``r``'s and ``lora_alpha``'s types without checking them: a string there was
    a TypeError deep inside it (exit 1) instead of bad data naming the file and field."""
    for key, low in (("r", 1), ("lora_alpha", None)):
        if key not in cfg:  # peft's default
            continue
        v = cfg[key]
        number = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        if not number or (low is not None and (not isinstance(v, int) or v < low)):
            want = "an integer >= 1" if low is not None else "a finite number"
            raise DataError(f"must be {want}, got {v!r}"[:200], file=cfg_path, field=key)


def base_of(path: str) -> str | None:
    """The base model directory of a LoRA adapter directory, else None."""
    return adapter_base(path) if os.path.isdir(path) and is_adapter_dir(path) else None


POSITION_KEYS = ("max_position_embeddings", "n_positions")  # Llama/Qwen family, GPT-2 family


def max_positions(path: str) -> int | None:
    """The positions a model directory's config.json (its base's, for an adapter) declares, or
    None when it declares none."""
    base = base_of(path) or path
    cfg = os.path.join(base, CONFIG_FILE)
    if not os.path.isfile(cfg):
        return None
    data = read_json_object(cfg)
    data = data.get("text_config", data) if isinstance(data.get("text_config"), dict) else data
    found = next((data[k] for k in POSITION_KEYS if isinstance(data.get(k), int)), None)
    return found if found and found > 0 else None


# ----------------------------------------------------------------------------- tokenizers
# Token ids mean something only to the tokenizer that made them: rollouts read by another model
# (tcli.models.provenance) and an adapter over a replaced base (adapter_base) are found by their
# vocabularies, read from tokenizer.json without loading anything.

@lru_cache(maxsize=32)
def _vocab_digest(path: str, mtime_ns: int) -> str | None:
    try:
        with open(os.path.join(path, TOKENIZER_JSON), "rb") as f:
            tok = orjson.loads(f.read())
    except (OSError, orjson.JSONDecodeError):
        return None
    model = tok.get("model") if isinstance(tok, dict) else None
    if not isinstance(model, dict) or "vocab" not in model:
        return None
    added = sorted((t.get("id"), t.get("content")) for t in tok.get("added_tokens") or []
                   if isinstance(t, dict))
    blob = orjson.dumps([model.get("type"), model["vocab"], added], option=orjson.OPT_SORT_KEYS)
    return hashlib.sha256(blob).hexdigest()


def vocab_digest(path: str) -> str | None:
    """A digest of the token <-> id mapping of a model directory (None: cannot tell). Formatting
    and settings that do not change what an id means (a chat template) do not count."""
    try:
        mtime = os.stat(os.path.join(path, TOKENIZER_JSON)).st_mtime_ns
    except OSError:
        return None
    return _vocab_digest(os.path.realpath(path), mtime)


def other_tokenizer(a: str, b: str) -> bool:
    """True when both directories' tokenizers are known and map ids to tokens differently."""
    da, db = vocab_digest(a), vocab_digest(b)
    return da is not None and db is not None and da != db
