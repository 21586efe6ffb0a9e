"""Checkpoint directories: written whole or not at all, never over user data (docs/design.md §5).

A checkpoint is written into a temporary sibling ``<name>.tmp-XXXXXXXX`` and then put in place by
one rename (or, over an existing checkpoint, an atomic exchange of the two directories), so a
kill at any moment leaves the old or the new checkpoint. The temporary directory carries a marker
file (:data:`MARKER`) locked with ``flock`` by its writer while it is written: a later write into
the same parent removes a ``*.tmp-*`` / ``*.old-*`` directory only when it has that marker and no
live process holds its lock, so the leftovers of a killed write are cleaned up and nothing else
(a user's directory, a writer still running) is ever touched.

The target must be absent, an empty directory or a checkpoint tcli wrote (it has
``tcli_state.json``) holding nothing tcli did not write there (:func:`foreign_files`); anything
else (a regular file, a symbolic link, a downloaded model, a user's file inside a checkpoint) is
refused with a UsageError before anything is written.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import signal
import tempfile
import threading

import orjson

from tcli.errors import DataError, TcliError
from tcli.io.target import fsync_dir
from tcli.models.files import read_json_object
from tcli.models.ownership import (FILES, MARKER, STATE_FILE, check_checkpoint_target,  # noqa: F401
                                   entries)

OPTIMIZER_FILE = "optimizer.pt"
_MAGIC = b"tcli partial checkpoint: safe to delete when no process holds its lock\n"
_LEFTOVER = re.compile(r".+\.(tmp|old)-[A-Za-z0-9_]{8}")


# ----------------------------------------------------------------------------- writing

def save_pretrained_atomic(out_dir: str, model, tokenizer, *, state: dict | None = None,
                           optimizer=None) -> str:
    """Write model (safetensors) + tokenizer (+ optimizer, state) so that ``out_dir`` appears whole
    or not at all, and only where :func:`check_checkpoint_target` allows. On any exception or
    interrupt (SIGINT; SIGTERM too, even with the default handler) before the swap the temporary
    directory is removed and ``out_dir`` is unchanged; a signal during the swap is delivered after
    it. Stale leftovers of killed writes in the parent are removed first. A full disk raises a
    one-line TcliError."""
    out_dir = os.path.abspath(out_dir)
    check_checkpoint_target(out_dir)
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    remove_stale_leftovers(parent)
    existed = os.path.exists(out_dir)
    tmp = None
    with _sigterm_raises():
        try:
            with _deferred_signals():
                tmp = _Temp.create(parent, os.path.basename(out_dir))
            _write(tmp.path, model, tokenizer, state, optimizer)
            _modes_from_umask(tmp.path)
            _fsync_tree(tmp.path)
            with _deferred_signals() as pending:
                tmp.unmark()
                if not pending:  # a signal so far calls the swap off (it is raised on exit)
                    tmp.path = _put_in_place(tmp.path, out_dir, existed)
                if tmp.path is not None:  # the replaced directory (or the called-off new one)
                    with contextlib.suppress(OSError):  # marked: a kill while deleting it leaves
                        tmp.mark()                      # a leftover the next write removes
            fsync_dir(parent)
        except BaseException as e:
            kept = "the previous checkpoint is unchanged" if existed else "nothing was written"
            if isinstance(e, Exception) and _disk_full(e):
                raise TcliError(f"cannot write checkpoint {out_dir}: no space left on device; "
                                f"{kept}") from e
            if isinstance(e, OSError) and e.errno and e.strerror:
                # named by the target, not the temporary directory; the same OSError subclass
                raise OSError(e.errno, f"cannot write checkpoint: {e.strerror}; {kept}",
                              out_dir) from e
            raise
        finally:
            if tmp is not None:
                tmp.remove()
    return out_dir


def _write(tmp: str, model, tokenizer, state, optimizer) -> None:
    import torch

    model.save_pretrained(tmp, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    if optimizer is not None:
        # through a Python file, so a write error keeps its errno (torch's own writer turns
        # ENOSPC into "unexpected pos ...")
        with open(os.path.join(tmp, OPTIMIZER_FILE), "wb") as f:
            torch.save(optimizer.state_dict(), f)
    if state is not None:  # last, listing everything written (itself too)
        files = sorted([n for n in entries(tmp) if n != MARKER] + [STATE_FILE])
        with open(os.path.join(tmp, STATE_FILE), "wb") as f:
            f.write(orjson.dumps({**state, FILES: files},
                                 option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS))


def _put_in_place(tmp: str, out_dir: str, existed: bool) -> str | None:
    """Rename the finished ``tmp`` to ``out_dir``; returns the path now holding the replaced
    directory (to delete), or None. Runs with SIGINT/SIGTERM deferred."""
    if not existed:
        os.rename(tmp, out_dir)
        return None
    if _exchange(tmp, out_dir):
        return tmp
    # no renameat2: two renames; a kill between them leaves both directories, neither marked
    old = _leftover_name(out_dir, "old")
    os.rename(out_dir, old)
    try:
        os.rename(tmp, out_dir)
    except BaseException:
        os.rename(old, out_dir)
        raise
    return old


def _leftover_name(out_dir: str, kind: str) -> str:
    while True:
        p = f"{out_dir}.{kind}-{secrets.token_hex(4)}"
        if not os.path.lexists(p):
            return p


class _Temp:
    """A directory of ours next to the target, marked and flock-ed while it exists."""

    def __init__(self, path: str):
        self.path: str | None = path
        self.fd: int | None = None

    @classmethod
    def create(cls, parent: str, name: str) -> "_Temp":
        t = cls(tempfile.mkdtemp(prefix=name + ".tmp-", dir=parent))
        try:
            t.mark()
        except BaseException:
            os.rmdir(t.path)
            raise
        return t

    def mark(self) -> None:
        """Create the marker (O_EXCL, no symlink following) and hold its lock."""
        import fcntl

        self._unlock()
        marker = os.path.join(self.path, MARKER)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(marker)  # a stray copy inside a replaced directory
        fd = os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            os.write(fd, _MAGIC + f"pid {os.getpid()}\n".encode())
        except BaseException:
            os.close(fd)
            raise
        self.fd = fd

    def unmark(self) -> None:
        """Remove the marker (the lock stays held until remove)."""
        os.unlink(os.path.join(self.path, MARKER))

    def remove(self) -> None:
        """Delete the directory: its marker last, so a kill half-way leaves it recognisable."""
        try:
            if self.path is not None:
                _remove_leftover(self.path)
        finally:
            self._unlock()

    def _unlock(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def _remove_leftover(path: str) -> None:
    if not os.path.isdir(path) or os.path.islink(path):
        return
    for name in os.listdir(path):
        if name == MARKER:
            continue
        p = os.path.join(path, name)
        if os.path.isdir(p) and not os.path.islink(p):
            shutil.rmtree(p, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                os.unlink(p)
    with contextlib.suppress(OSError):
        os.unlink(os.path.join(path, MARKER))
    with contextlib.suppress(OSError):
        os.rmdir(path)


def remove_stale_leftovers(parent: str) -> list[str]:
    """Delete the leftovers of killed checkpoint writes in ``parent``: directories named
    ``<name>.tmp-XXXXXXXX`` / ``<name>.old-XXXXXXXX`` that hold our marker file whose lock no live
    process holds. Anything else is left alone. Returns the removed paths."""
    import fcntl

    removed = []
    try:
        names = os.listdir(parent)
    except OSError:
        return removed
    for name in names:
        path = os.path.join(parent, name)
        if not _LEFTOVER.fullmatch(name) or os.path.islink(path) or not os.path.isdir(path):
            continue
        try:
            fd = os.open(os.path.join(path, MARKER), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            continue  # not ours (or a writer between its last steps): leave it
        try:
            if not os.read(fd, len(_MAGIC)) == _MAGIC:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                continue  # its writer is alive
            _remove_leftover(path)
            removed.append(path)
        finally:
            os.close(fd)
    return removed


# ----------------------------------------------------------------------------- signals

@contextlib.contextmanager
def _sigterm_raises():
    """While a checkpoint is written, SIGTERM with the default action (which would end the process
    without any cleanup) raises SystemExit(143) instead, so the temporary directory is removed.
    A handler installed by the application is left alone."""
    if threading.current_thread() is not threading.main_thread() \
            or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield
        return

    def handler(signum, frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


@contextlib.contextmanager
def _deferred_signals():
    """SIGINT/SIGTERM received inside the block are delivered when it ends: the renames that swap
    a checkpoint into place are never interrupted half-way. Yields the list of signals received
    so far (empty: none pending)."""
    got: list[int] = []
    sigs = (signal.SIGINT, signal.SIGTERM)
    if threading.current_thread() is not threading.main_thread() \
            or any(signal.getsignal(s) is None for s in sigs):  # not ours to manage
        yield got
        return
    old = {s: signal.signal(s, lambda signum, frame: got.append(signum)) for s in sigs}
    try:
        yield got
    finally:
        for s in sigs:
            signal.signal(s, old[s])
        for s in dict.fromkeys(got):
            signal.raise_signal(s)


# ----------------------------------------------------------------------------- OS helpers

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


def _umask() -> int:
    """The process's umask, read from /proc where it can be (setting it to read it back would
    race with other threads creating files)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _modes_from_umask(path: str) -> None:
    """mkdtemp makes the directory 0700 and some writers (safetensors) make files 0600: give the
    checkpoint the modes a plain mkdir and open would, 0777 and 0666 less the umask, so that a
    shared group can read it when the user's umask says so."""
    mask = _umask()
    for root, _, files in os.walk(path):
        os.chmod(root, 0o777 & ~mask)
        for name in files:
            p = os.path.join(root, name)
            if not os.path.islink(p):
                os.chmod(p, 0o666 & ~mask)


def _fsync_tree(path: str) -> None:
    for root, _, files in os.walk(path):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


# ----------------------------------------------------------------------------- reading

def read_state(ckpt: str) -> dict:
    """``tcli_state.json`` of a checkpoint ({} when absent); DataError naming the file when it is
    not a JSON object."""
    p = os.path.join(ckpt, STATE_FILE)
    if not os.path.exists(p):
        return {}
    return read_json_object(p)


def read_counters(ckpt: str) -> dict[str, int]:
    """step, policy_version and optimizer_steps of a checkpoint (0 when absent)."""
    st = read_state(ckpt) if os.path.isdir(ckpt) else {}
    out = {}
    for key in ("step", "policy_version", "optimizer_steps"):
        v = st.get(key, 0)
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise DataError(f"must be an integer >= 0, got {v!r}",
                            file=os.path.join(ckpt, STATE_FILE), field=key)
        out[key] = v
    return out


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
