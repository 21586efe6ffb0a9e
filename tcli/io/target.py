"""Where output bytes go, by what is at the path.

A regular file, new or existing (also at the end of a symlink), is written under a temporary
name beside it and renamed over it when complete: a reader sees the old or the new file, never
half of one, and a failed command leaves nothing behind. Anything else (/dev/null, a FIFO, a
terminal, /dev/stdout) is written straight through: renaming over a device would replace it (as
root, ``-o /dev/null`` would swap the system's device node for a file). A replaced file keeps its
permission bits (and owner, where allowed); a new one gets 0666 & ~umask, like any shell redirect.
"""

from __future__ import annotations

import io
import os
import re
import stat
import sys
from typing import IO

from tcli.errors import TcliError, UsageError

_FD_DIR = re.compile(r"/proc/(\d+)(?:/task/\d+)?/fd")
_OTHER_FD = -1  # a descriptor of another process: open its /proc link as it is
_MAX_LINKS = 40  # as the kernel's ELOOP limit


def _resolve(path: str) -> tuple[str, int | None]:
    """The path that writing ``path`` reaches, following symlinks one hop at a time, and the
    descriptor when it is one of this process's (/dev/stdout -> /proc/self/fd/1): those links
    name open files, not paths, so they end the walk."""
    p = os.path.abspath(path)
    for _ in range(_MAX_LINKS):
        parent, base = os.path.split(p)
        parent = os.path.realpath(parent)
        p = os.path.join(parent, base)
        m = _FD_DIR.fullmatch(parent)
        if m and base.isdigit():
            return p, int(base) if int(m.group(1)) == os.getpid() else _OTHER_FD
        if not os.path.islink(p):
            return p, None
        p = os.path.join(parent, os.readlink(p))
    raise UsageError(f"too many levels of symbolic links: {path}")


class Output:
    """An open output: write to ``file``, then ``commit()`` (rename into place, or flush) or
    ``abort()`` (remove the temporary file). ``atomic`` says whether a failure is invisible."""

    def __init__(self, path: str, buffer_size: int = 1 << 20):
        self.path = path
        self.tmp: str | None = None
        self.target: str | None = None  # the file the temporary one replaces
        self._own = path != "-"  # stdout stays open for the rest of the process
        self.file: IO[bytes] | None = None
        if not self._own:
            self.file = sys.stdout.buffer
            return
        try:
            fd = self._open(path)
        except OSError as e:
            raise TcliError(f"cannot write {path}: {e.strerror or e}") from None
        self.file = io.BufferedWriter(io.FileIO(fd, "wb"), buffer_size=buffer_size)

    @property
    def atomic(self) -> bool:
        return self.tmp is not None

    def _open(self, path: str) -> int:
        real, fd = _resolve(path)
        if fd is not None:
            return os.dup(fd) if fd >= 0 else os.open(real, os.O_WRONLY | os.O_CLOEXEC)
        try:
            st = os.stat(real)
        except FileNotFoundError:
            st = None
        if st is not None and stat.S_ISDIR(st.st_mode):
            raise UsageError(f"output is a directory: {path}")
        if st is not None and not stat.S_ISREG(st.st_mode):  # device, FIFO, socket: never replace
            return os.open(real, os.O_WRONLY | os.O_CLOEXEC)
        d = os.path.dirname(real)
        if not os.path.isdir(d):
            raise UsageError(f"output directory does not exist: {d}")
        fd, self.tmp = _create_beside(real, 0o600 if st else 0o666)
        self.target = real
        if st is not None:
            try:
                _copy_owner_and_mode(fd, st)
            except OSError:
                os.close(fd)
                self.abort()
                raise
        return fd

    def commit(self) -> None:
        """Make the output visible: flush and rename the temporary file over the target."""
        self.file.flush()
        if not self._own:
            return
        if self.tmp is not None:
            os.fsync(self.file.fileno())
        self.file.close()
        if self.tmp is not None:
            os.replace(self.tmp, self.target)
            self.tmp = None
            fsync_dir(os.path.dirname(os.path.abspath(self.target)))

    def abort(self) -> None:
        """Drop the output: the temporary file goes, the target stays as it was."""
        if self._own and self.file is not None:
            try:
                self.file.close()
            except Exception:  # noqa: BLE001 - the buffer may fail to flush (full disk); go on
                pass
        if self.tmp is not None:
            try:
                os.unlink(self.tmp)
            except FileNotFoundError:
                pass
            self.tmp = None


def fsync_dir(path: str) -> None:
    """A rename in ``path`` made durable: without it a power loss may bring back the old file
    (or none). A file system that cannot sync a directory keeps the rename as it is."""
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


_NAME_ROOM = 200  # bytes of the target's name kept in the temporary one (file names: 255)


def _create_beside(target: str, mode: int) -> tuple[int, str]:
    """A new file ``<target>.tmp-<random>`` opened for writing (a long name is cut, so that a
    legal target name never makes an illegal temporary one). ``mode`` goes through the umask,
    as for any new file (mkstemp's fixed 0600 would not)."""
    d, base = os.path.split(target)
    base = os.fsdecode(os.fsencode(base)[:_NAME_ROOM])
    for _ in range(100):
        tmp = os.path.join(d, f"{base}.tmp-{os.urandom(4).hex()}")
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary name beside {target}")


def _copy_owner_and_mode(fd: int, st: os.stat_result) -> None:
    """The replacement keeps the replaced file's owner (when allowed) and permission bits."""
    now = os.fstat(fd)
    if (now.st_uid, now.st_gid) != (st.st_uid, st.st_gid):
        try:
            os.fchown(fd, st.st_uid, st.st_gid)
        except PermissionError:
            pass  # not root: the file becomes the writer's, as with any editor's save
    os.fchmod(fd, stat.S_IMODE(st.st_mode))  # after chown, which clears set-id bits


def write_atomic_bytes(path: str, data: bytes) -> None:
    """Write a small file completely or not at all (same rules as record output)."""
    out = Output(path, buffer_size=max(len(data), 1))
    try:
        out.file.write(data)
        out.commit()
    except BaseException:
        out.abort()
        raise
