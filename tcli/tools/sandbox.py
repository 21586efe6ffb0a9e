"""Run model-written Python (or a plugin function) in a separate, limited interpreter.

One call is one fresh process: ``sys.executable -S -s -P -u -B sandbox_boot.py`` with a clean
environment (no ``PYTHON*`` variables from the caller, ``PYTHONHASHSEED=0`` so that the same code
prints the same sets), in its own session, inside a new network namespace when ``unshare -rn``
works here, killed with its parent when ``setpriv --pdeathsig`` exists. The worker lowers its
rlimits (CPU, address space, file size, processes, open files), works in a fresh temporary
directory that is removed afterwards, and installs an audit hook (see ``sandbox_boot``).

The parent enforces the wall clock and the output size: past either, the whole process group is
killed. Nothing here raises for what the code does; every outcome is an ``Outcome``.
"""

from __future__ import annotations

import functools
import json
import os
import selectors
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass

from tcli.errors import UsageError

BOOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sandbox_boot.py")
EXIT_RAISED, EXIT_MEMORY, EXIT_NOT_STR = 1, 3, 4
LIMIT_SIGNALS = {signal.SIGXCPU: "CPU time limit", signal.SIGKILL: "a resource limit (killed)",
                 signal.SIGXFSZ: "file size limit"}


@dataclass(frozen=True)
class Limits:
    """What one call may use. Every call gets all of them; see docs/design.md §9 for which hold
    on which platform."""

    cpu_seconds: int = 5              # RLIMIT_CPU: SIGXCPU at this, SIGKILL a second later
    wall_seconds: float = 10.0        # the parent kills the process group after this
    memory_bytes: int = 1 << 30       # RLIMIT_AS (not enforced by macOS)
    output_bytes: int = 16 << 10      # stdout + stderr kept; beyond, the worker is killed
    file_bytes: int = 16 << 20        # RLIMIT_FSIZE: largest file the code may write
    processes: int = 16               # RLIMIT_NPROC (counts the user's processes; not for root)
    open_files: int = 64              # RLIMIT_NOFILE

    def __post_init__(self):
        for k, v in asdict(self).items():
            number = isinstance(v, (int, float)) and not isinstance(v, bool)
            if not (number and 0 < v < float("inf")):
                raise UsageError(f"tool limit {k} must be a positive finite number, not {v!r}")


@dataclass
class Outcome:
    """What a sandboxed call gave: the text shown to the model and an error kind (None: fine)."""

    text: str
    error: str | None
    seconds: float


@functools.lru_cache(maxsize=1)
def launcher() -> tuple[tuple[str, ...], str]:
    """(command prefix, network isolation): ``unshare -rn`` when it works here, ``setpriv
    --pdeathsig KILL`` when it exists; "namespace" or "audit-hook" (the worker's hook alone)."""
    def works(cmd) -> bool:
        try:
            return subprocess.run([*cmd, "true"], stdin=subprocess.DEVNULL, capture_output=True,
                                  timeout=10).returncode == 0
        except (OSError, subprocess.SubprocessError):
            return False

    prefix: tuple[str, ...] = ()
    net = "audit-hook"
    unshare = shutil.which("unshare")
    if sys.platform.startswith("linux") and unshare and works([unshare, "-rn"]):
        prefix, net = (unshare, "-rn"), "namespace"
    setpriv = shutil.which("setpriv")
    if setpriv and works([*prefix, setpriv, "--pdeathsig", "KILL", "--"]):
        prefix += (setpriv, "--pdeathsig", "KILL", "--")
    return prefix, net


def network_isolation() -> str:
    """"namespace" (no network device but loopback) or "audit-hook" (sockets refused in Python)."""
    return launcher()[1]


def _env() -> dict:
    return {"PATH": os.defpath, "PYTHONHASHSEED": "0", "PYTHONIOENCODING": "utf-8:backslashreplace",
            "PYTHONUTF8": "1", "LC_ALL": "C.UTF-8", "HOME": "/nonexistent"}


def _remove(path: str) -> None:
    """rmtree that also removes what the code made unreadable (chmod 000 inside its directory)."""
    def fix(func, p, _exc):
        try:
            os.chmod(os.path.dirname(p), stat.S_IRWXU)
            os.chmod(p, stat.S_IRWXU)
            func(p)
        except OSError:
            pass

    shutil.rmtree(path, onerror=fix)


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _collect(proc: subprocess.Popen, data: bytes, cap: int,
             deadline: float) -> tuple[bytes, str | None]:
    """Send ``data`` to the worker's stdin and read its output until it closes, up to ``cap``
    bytes and ``deadline`` (a worker that never reads its request times out too):
    (bytes, None | "timeout" | "output")."""
    buf, out_fd, in_fd = bytearray(), proc.stdout.fileno(), proc.stdin.fileno()
    os.set_blocking(in_fd, False)
    with selectors.DefaultSelector() as sel:
        sel.register(out_fd, selectors.EVENT_READ)
        sel.register(in_fd, selectors.EVENT_WRITE)
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return bytes(buf), "timeout"
            for key, _ in sel.select(min(left, 1.0)):
                if key.fd == in_fd:
                    try:
                        data = data[os.write(in_fd, data[:1 << 16]):]
                    except BlockingIOError:
                        continue
                    except BrokenPipeError:  # the worker is gone: its output says why
                        data = b""
                    if not data:
                        sel.unregister(in_fd)
                        proc.stdin.close()
                    continue
                chunk = os.read(out_fd, 1 << 16)
                if not chunk:
                    return bytes(buf), None
                buf += chunk
                if len(buf) > cap:
                    return bytes(buf[:cap]), "output"


def run_worker(request: dict, limits: Limits, cap: int | None = None) -> tuple[bytes, int | None,
                                                                             str | None, float]:
    """Start the worker on ``request``, collect its output: (output, return code, "timeout" |
    "output" | None, seconds). The temporary directory is gone when this returns."""
    tmp = tempfile.mkdtemp(prefix="tcli-tool-")
    start = time.monotonic()
    try:
        req = {**request, "tmp": tmp, "limits": asdict(limits)}
        cmd = [*launcher()[0], sys.executable, "-S", "-s", "-P", "-u", "-B", BOOT]
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, cwd=tmp, env=_env(),
                                start_new_session=True, close_fds=True)
        killed: str | None = "timeout"  # until _collect says otherwise
        deadline = start + limits.wall_seconds
        try:
            out, killed = _collect(proc, json.dumps(req).encode(), cap or limits.output_bytes,
                                   deadline)
            if killed is None:  # output closed: the worker is exiting (or hides past the deadline)
                try:
                    proc.wait(timeout=max(deadline - time.monotonic(), 0.0))
                except subprocess.TimeoutExpired:
                    killed = "timeout"
        finally:
            _kill_group(proc)
            rc = proc.wait()
            for f in (proc.stdin, proc.stdout):
                f.close()
        return out, (None if killed else rc), killed, time.monotonic() - start
    finally:
        _remove(tmp)


def _decode(out: bytes) -> str:
    return out.decode("utf-8", "replace")


def classify(rc: int | None, killed: str | None, limits: Limits) -> tuple[str | None, str]:
    """(error kind, note for the model) of a finished worker."""
    if killed == "timeout":
        return "timeout", f"[killed: wall-clock limit of {limits.wall_seconds:g} s]"
    if killed == "output":
        return "limit", (f"[output truncated: over {limits.output_bytes} bytes; "
                         "the code was stopped]")
    if rc == 0:
        return None, ""
    if rc in (EXIT_RAISED, EXIT_NOT_STR):
        return "tool_error", ""
    if rc == EXIT_MEMORY:
        return "limit", f"[memory limit of {limits.memory_bytes >> 20} MiB]"
    if rc is not None and rc < 0 and -rc in LIMIT_SIGNALS:
        return "limit", f"[killed: {LIMIT_SIGNALS[-rc]}]"
    return "crash", f"[the worker crashed: exit status {rc}]"


def run_code(code: str, limits: Limits) -> Outcome:
    """Run ``code``; its stdout and stderr (interleaved, at most ``output_bytes``) are the text."""
    out, rc, killed, seconds = run_worker({"mode": "code", "code": code}, limits)
    error, note = classify(rc, killed, limits)
    text = _decode(out)
    if note:
        text = f"{text.rstrip()}\n{note}".lstrip("\n")
    return Outcome(text if text else "(no output)", error, seconds)


def plugin_request(module: str, function: str, path: list[str], mode: str = "plugin",
                   arguments: dict | None = None) -> dict:
    return {"mode": mode, "module": module, "function": function, "path": path,
            "arguments": arguments or {}}


def run_plugin(request: dict, limits: Limits) -> Outcome:
    """Call a plugin function in the worker; its returned string is the text."""
    cap = 6 * limits.output_bytes + 4096  # the JSON answer of a string of output_bytes characters
    out, rc, killed, seconds = run_worker(request, limits, cap)
    error, note = classify(rc, killed, limits)
    if killed is None and rc in (0, EXIT_RAISED, EXIT_MEMORY, EXIT_NOT_STR):
        try:
            ans = json.loads(out)
        except ValueError:
            return Outcome(f"[the plugin's worker sent no answer: exit status {rc}]", "crash",
                           seconds)
        if ans.get("ok"):
            if ans.get("truncated"):
                return Outcome(f"{ans['result']}\n[output truncated: over {limits.output_bytes} "
                               "characters]", "limit", seconds)
            return Outcome(ans["result"], None, seconds)
        return Outcome(f"{ans.get('error', 'error')}", error or "tool_error", seconds)
    return Outcome(note or _decode(out)[-500:], error or "crash", seconds)
