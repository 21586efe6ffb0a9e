"""Which directories a checkpoint writer may replace: only what tcli wrote (docs/design.md §5.2).

A checkpoint's ``tcli_state.json`` lists under ``files`` everything its writer put there, so a
file a user adds later (notes, another model's weights) is told apart from tcli's own and is never
deleted by a write over the checkpoint, a loop's pruning or ``--overwrite``.
"""

from __future__ import annotations

import os
import re

from tcli.errors import DataError, UsageError
from tcli.models.files import read_json_object

STATE_FILE = "tcli_state.json"
MARKER = ".tcli-partial-checkpoint"  # in a checkpoint being written (tcli.models.checkpoint)
FILES = "files"  # the state's list of what the writer put in the checkpoint
# what a checkpoint written before its state listed its files holds: save_pretrained's weights and
# config, a tokenizer's files, a peft adapter and its model card, tcli's state and optimizer
_WRITTEN = re.compile(r"(config|generation_config|adapter_config|special_tokens_map|added_tokens|"
                      r"tcli_state)\.json|.*\.safetensors(\.index\.json)?|tokenizer[^/]*|"
                      r"vocab\.(json|txt)|merges\.txt|chat_template\.(jinja|json)|optimizer\.pt|"
                      r"README\.md")


def check_checkpoint_target(out_dir: str, label: str = "checkpoint directory",
                            kind: str | None = None) -> None:
    """UsageError unless ``out_dir`` may be (re)written: absent, an empty directory or a tcli
    checkpoint (it has tcli_state.json) holding only what tcli wrote and, when the writer says
    which ``kind`` it writes, of that kind (a critic written over a trained policy is lost work)."""
    if not out_dir:
        raise UsageError(f"{label} must name a directory")
    if os.path.islink(out_dir):
        raise UsageError(f"{label} {out_dir} is a symbolic link; refusing to replace it "
                         "(give the real directory)")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise UsageError(f"{label} {out_dir} is a file, not a checkpoint directory; "
                         "refusing to replace it")
    if not os.path.isdir(out_dir) or not os.listdir(out_dir):
        return
    if not os.path.isfile(os.path.join(out_dir, STATE_FILE)):
        raise UsageError(f"{label} {out_dir} is not a checkpoint: a non-empty directory tcli "
                         f"did not write (no {STATE_FILE}); refusing to replace it (choose a new "
                         "directory)")
    foreign = foreign_files(out_dir)
    if foreign:
        raise UsageError(f"{label} {out_dir} holds {foreign[0]}, which tcli did not write; "
                         "refusing to replace it (move that away or choose a new directory)")
    found = checkpoint_kind(out_dir)
    if kind and found != kind:
        raise UsageError(f"{label} {out_dir} is a {found} checkpoint, and this writes a {kind}; "
                         "refusing to replace it (choose a new directory)")


def checkpoint_kind(ckpt: str) -> str:
    """``critic`` for a one-label token classifier (init-critic, train-critic), else ``policy``
    (a causal LM or a LoRA adapter)."""
    path = os.path.join(ckpt, "config.json")
    try:
        archs = read_json_object(path).get("architectures") if os.path.isfile(path) else None
    except DataError:
        archs = None
    critic = isinstance(archs, list) and any(isinstance(a, str) and a.endswith(
        "ForTokenClassification") for a in archs)
    return "critic" if critic else "policy"


def foreign_files(ckpt: str) -> list[str]:
    """What a tcli checkpoint holds that its writer did not put there: the paths its state's
    ``files`` does not list, or, in a checkpoint older than that list, those not named as the
    writers name theirs. Sorted; [] for a directory that is not there."""
    if not os.path.isdir(ckpt):
        return []
    state = os.path.join(ckpt, STATE_FILE)
    try:
        listed = read_json_object(state).get(FILES) if os.path.isfile(state) else None
    except DataError:
        listed = None
    if not isinstance(listed, list) or not all(isinstance(n, str) for n in listed):
        listed = None
    return [os.path.join(ckpt, rel) for rel in entries(ckpt) if rel != MARKER
            and not (rel in listed if listed is not None else _WRITTEN.fullmatch(rel))]


def entries(root: str) -> list[str]:
    """Every file, symbolic link and empty folder under ``root`` (a folder ends in /), relative
    to it, sorted."""
    out = []
    for path, dirs, files in os.walk(root):
        rel = os.path.relpath(path, root)
        names = files + [d for d in dirs if os.path.islink(os.path.join(path, d))]
        if not names and not dirs and path != root:
            out.append(rel + "/")
        out += [n if rel == "." else os.path.join(rel, n) for n in names]
    return sorted(out)
