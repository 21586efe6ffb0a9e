"""Checkpoints are directories written to a temporary sibling and renamed into place (DESIGN §5)."""

from __future__ import annotations

import os
import shutil
import tempfile

import orjson

STATE_FILE = "tcli_state.json"
OPTIMIZER_FILE = "optimizer.pt"


def save_pretrained_atomic(out_dir: str, model, tokenizer, *, state: dict | None = None,
                           optimizer=None) -> str:
    """Write model (safetensors) + tokenizer (+ optimizer, state) so that ``out_dir`` appears whole
    or not at all. An existing ``out_dir`` is replaced only after the new one is complete."""
    import torch

    out_dir = os.path.abspath(out_dir)
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=os.path.basename(out_dir) + ".tmp-", dir=parent)
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if optimizer is not None:
            torch.save(optimizer.state_dict(), os.path.join(tmp, OPTIMIZER_FILE))
        if state is not None:
            with open(os.path.join(tmp, STATE_FILE), "wb") as f:
                f.write(orjson.dumps(state, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS))
        _fsync_tree(tmp)
        if os.path.exists(out_dir):
            old = out_dir + ".old-" + os.path.basename(tmp)
            os.replace(out_dir, old)
            os.replace(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _fsync_tree(path: str) -> None:
    for root, _, files in os.walk(path):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def read_state(ckpt: str) -> dict:
    p = os.path.join(ckpt, STATE_FILE)
    if not os.path.exists(p):
        return {}
    with open(p, "rb") as f:
        return orjson.loads(f.read())
