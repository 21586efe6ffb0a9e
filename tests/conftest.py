"""Shared test helpers: run the real `tcli` command in a subprocess from the repository root."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # the package is used from the checkout, not installed
    sys.path.insert(0, str(REPO))

from tcli.io.benchmarks import BENCHMARK_DIR, BENCHMARKS  # noqa: E402

DATA = Path(BENCHMARK_DIR)  # the shipped benchmarks' directory (files keep their source names)


def benchmark(name: str) -> Path:
    """A shipped benchmark's file, found by its name in the registry."""
    return Path(BENCHMARKS[name].path)


def _base_env() -> dict:
    env = dict(os.environ)
    env.pop("TCLI_DEBUG", None)
    return env


# Environment variables a tcli process reads after start-up (the fork server's child sets them);
# any other difference from the server's environment needs a fresh interpreter.
RUNTIME_ENV = ("TCLI_", "PYTHONPATH", "OMP_NUM_THREADS", "PYTEST_")


class ForkServer:
    """Client of tests/_forkserver.py: one pre-warmed interpreter (torch, transformers and tcli
    imported) forks a child per ``tcli`` command, which saves the ~5 CPU seconds of imports each
    real process pays. Thread-safe (tests run commands from threads). ``TCLI_TEST_FORKSERVER=0``
    turns it off: every command is then a new interpreter."""

    def __init__(self):
        import tempfile
        import threading

        self.env = _base_env()
        self.dir = tempfile.mkdtemp(prefix="tcli-fork-")
        self.cpu = 0.0  # CPU seconds of the children (not in this process's rusage)
        self.lock, self.cond, self.msgs, self.next_id = threading.Lock(), threading.Condition(), {}, 0
        req_r, self.req = os.pipe()
        rep_r, rep_w = os.pipe()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests._forkserver", str(req_r), str(rep_w)], cwd=REPO,
            env=self.env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=open(os.path.join(self.dir, "server.log"), "wb"), pass_fds=(req_r, rep_w))
        os.close(req_r)
        os.close(rep_w)
        self.replies = os.fdopen(rep_r, "r")
        line = self.replies.readline()
        self.ready = bool(line and json.loads(line).get("ready"))
        if self.ready:
            threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.replies:
            msg = json.loads(line)
            with self.cond:
                self.msgs.setdefault(msg["id"], []).append(msg)
                self.cond.notify_all()
        with self.cond:
            self.ready = False
            self.cond.notify_all()

    def _wait(self, rid: int, key: str, timeout: float | None) -> dict | None:
        """The reply with ``key`` to request ``rid`` (None after ``timeout`` seconds)."""
        def found():
            return next((m for m in self.msgs.get(rid, ()) if key in m), None)

        with self.cond:
            if not self.cond.wait_for(lambda: found() or not self.ready, timeout) or not found():
                return None
            msg = found()
            self.msgs[rid].remove(msg)
            return msg

    def serves(self, env: dict) -> bool:
        if not self.ready or self.proc.poll() is not None:
            return False
        keys = {k for k in set(env) | set(self.env) if env.get(k) != self.env.get(k)}
        return all(k.startswith(RUNTIME_ENV) for k in keys)

    def run(self, argv: list[str], input: bytes | None, timeout: float, env: dict,
            code: str | None = None) -> subprocess.CompletedProcess:
        """Like subprocess.run(capture_output=True) of ``python -m tcli *argv`` (of
        ``python -c code *argv`` when ``code`` is given)."""
        import signal
        import tempfile

        d = tempfile.mkdtemp(dir=self.dir)
        with self.lock:
            self.next_id += 1
            rid = self.next_id
            req = {"id": rid, "argv": argv, "env": env, "cwd": str(REPO), "stdin": None,
                   "stdout": os.path.join(d, "out"), "stderr": os.path.join(d, "err"),
                   "code": code}
            if input is not None:
                req["stdin"] = os.path.join(d, "in")
                Path(req["stdin"]).write_bytes(input)
            os.write(self.req, (json.dumps(req) + "\n").encode())
        started = self._wait(rid, "pid", 60)
        if started is None:
            raise RuntimeError(f"the fork server did not answer (log: {self.dir}/server.log)")
        done = timed_out = self._wait(rid, "status", timeout)
        if done is None:
            os.kill(started["pid"], signal.SIGKILL)
            done = self._wait(rid, "status", 60)
        if done is None:
            raise RuntimeError(f"the fork server died (log: {self.dir}/server.log)")
        self.cpu += done["cpu"]
        out, err = (Path(req[k]).read_bytes() for k in ("stdout", "stderr"))
        shutil.rmtree(d, ignore_errors=True)
        cmd = [sys.executable, *(["-m", "tcli"] if code is None else ["-c", code]), *argv]
        if timed_out is None:
            raise subprocess.TimeoutExpired(cmd, timeout, output=out, stderr=err)
        return subprocess.CompletedProcess(cmd, done["status"], out, err)

    def close(self) -> None:
        os.close(self.req)
        self.proc.wait(timeout=60)
        shutil.rmtree(self.dir, ignore_errors=True)


_SERVER: list = []


def fork_server() -> ForkServer | None:
    """The session's fork server, started on first use (None when turned off)."""
    if os.environ.get("TCLI_TEST_FORKSERVER", "1") == "0":
        return None
    if not _SERVER:
        import atexit

        _SERVER.append(ForkServer())
        atexit.register(_SERVER[0].close)
    return _SERVER[0]


def run_tcli(args, input: bytes | None = None, timeout: float = 120, env: dict | None = None,
             **kwargs) -> subprocess.CompletedProcess:
    """``python -m tcli *args`` with cwd = repo root; stdin gets ``input`` (or /dev/null), output
    is captured as bytes. Returns the CompletedProcess (check ``returncode`` yourself). Runs as a
    child of the fork server when it can (same behaviour, no import cost), else as a new
    interpreter; ``fresh=True`` forces the latter."""
    return _run(None, args, input, timeout, env, **kwargs)


def run_python(code: str, args=(), input: bytes | None = None, timeout: float = 120,
               env: dict | None = None, **kwargs) -> subprocess.CompletedProcess:
    """``python -c code *args`` as :func:`run_tcli` runs ``python -m tcli``."""
    return _run(code, args, input, timeout, env, **kwargs)


def _run(code, args, input, timeout, env, fresh: bool = False, **kwargs):
    full_env = _base_env()
    full_env.update(env or {})
    argv = [str(a) for a in args]
    server = None if fresh or kwargs else fork_server()
    if server is not None and server.serves(full_env):
        return server.run(argv, input, timeout, full_env, code)
    head = ["-m", "tcli"] if code is None else ["-c", code]
    return subprocess.run([sys.executable, *head, *argv], cwd=REPO,
                          input=input, stdin=None if input is not None else subprocess.DEVNULL,
                          capture_output=True, timeout=timeout, env=full_env, **kwargs)


@pytest.fixture(autouse=True, scope="session")
def sigint_raises():
    """A runner started as a background job (``cmd &`` in a script, CI) inherits SIGINT ignored,
    and Python then never raises KeyboardInterrupt: restore the default so the Ctrl-C tests test
    tcli, not how pytest was launched."""
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    yield


@pytest.fixture
def tcli():
    """The ``run_tcli`` helper as a fixture."""
    return run_tcli


def arith_run_dir(tmp_path_factory, name: str, files: dict, **model_kw) -> tuple:
    """A directory with a tiny arith-alphabet model (``model/``) and prompt files
    (``files``: file name -> records); returns (dir, model path)."""
    import orjson

    from examples.arith.task import ALPHABET
    from tcli.models.tiny import init_tiny_model

    d = tmp_path_factory.mktemp(name)
    path = str(d / "model")
    kw = {"hidden": 32, "layers": 1, "heads": 2, "kv_heads": 1, "intermediate": 64, **model_kw}
    init_tiny_model(path, seed=0, alphabet=ALPHABET, **kw)
    for fname, recs in files.items():
        (d / fname).write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in recs))
    return d, path
