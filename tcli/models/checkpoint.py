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
    or not at all. An existing ``out_dir`` is replaced only after the new one is complete: on Linux
    the two directories are swapped in one step (renameat2 RENAME_EXCHANGE), so a kill at any
    moment leaves the old or the new checkpoint at ``out_dir``. Leftovers of a kill are named
    ``<name>.tmp-*`` (never a checkpoint name). A full disk raises a one-line TcliError."""
    import torch

    out_dir = os.path.abspath(out_dir)
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    existed = os.path.exists(out_dir)
    tmp = tempfile.mkdtemp(prefix=os.path.basename(out_dir) + ".tmp-", dir=parent)
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if optimizer is not None:
            # through a Python file, so a write error keeps its errno (torch's own writer turns
            # ENOSPC into "unexpected pos ...")
            with open(os.path.join(tmp, OPTIMIZER_FILE), "wb") as f:
                torch.save(optimizer.state_dict(), f)
        if state is not None:
            with open(os.path.join(tmp, STATE_FILE), "wb") as f:
                f.write(orjson.dumps(state, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS))
        _fsync_tree(tmp)
        if existed and _exchange(tmp, out_dir):
            _fsync_dir(parent)
            shutil.rmtree(tmp, ignore_errors=True)  # tmp now holds the old checkpoint
        elif existed:
            old = out_dir + ".old-" + os.path.basename(tmp)
            os.replace(out_dir, old)
            os.replace(tmp, out_dir)
            _fsync_dir(parent)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
            _fsync_dir(parent)
    except BaseException as e:
        full = isinstance(e, Exception) and _disk_full(e)
        shutil.rmtree(tmp, ignore_errors=True)
        if full:
            from tcli.errors import TcliError

            kept = "the previous checkpoint is unchanged" if existed else "nothing was written"
            raise TcliError(f"cannot write checkpoint {out_dir}: no space left on device; "
                            f"{kept}") from e
        raise
    return out_dir


def _disk_full(e: BaseException) -> bool:
    """ENOSPC/EDQUOT anywhere in the exception chain (safetensors reports it in its message)."""
    import errno

    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in str(e) or "os error 28" in str(e):
            return True
        e = e.__cause__ or e.__context__
    return False


def _exchange(a: str, b: str) -> bool:
    """Swap two existing paths atomically (Linux renameat2 RENAME_EXCHANGE); False where the
    call or the flag is not available, so the caller falls back to two renames."""
    import ctypes
    import errno

    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), b)


def _fsync_dir(path: str) -> None:
    """Make a rename durable (a crash of the machine, not only of the process)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


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
