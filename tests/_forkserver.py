"""A pre-warmed launcher for the tests' ``tcli`` processes (used by ``conftest.run_tcli``).

A `python -m tcli` process spends ~5 CPU seconds importing torch and transformers before it reads
its first argument; the suite starts a few hundred of them. This server imports them once, then
forks one child per command: the child gets its own pid, cwd, environment, stdin/stdout/stderr
files, signal dispositions and exit code, and runs ``tcli/__main__.py`` exactly as ``-m tcli``
does (runpy), then exits through the interpreter's exit steps (threads joined, atexit, flush).
A request may also carry ``code``: the child then runs it as ``python -c code`` would.
What a fork cannot give a child, the caller keeps a real subprocess for: import-time behaviour
(which modules a command imports), a fresh hash seed, and an environment that differs in anything
read at start-up (see ``conftest.run_tcli``). The server refuses to serve (the caller falls back)
when its imports print anything, so that nothing a real process would print on stderr is hidden.

Protocol on two pipe fds named in argv (requests, replies): JSON lines. Request {id, argv, env,
cwd, stdin, stdout, stderr (paths), code (or null)}; replies {id, pid} when forked, then {id, status, cpu} when it
exited.
"""

from __future__ import annotations

import json
import os
import signal
import sys

PREIMPORT = ("torch", "numpy", "orjson", "pyarrow", "safetensors.torch", "tokenizers",
             "transformers", "transformers.models.qwen3.modeling_qwen3",
             "transformers.models.llama.modeling_llama", "peft", "tcli.cli", "tcli.models.load",
             "tcli.models.logprobs", "tcli.train.trainer", "tcli.engines.hf", "tcli.stages.sample",
             "tcli.loop.loop")


def preimport() -> str:
    """Import the heavy modules with fd 2 captured; return what they printed ('' = silent)."""
    import importlib
    import tempfile

    saved = os.dup(2)
    with tempfile.TemporaryFile() as cap:
        os.dup2(cap.fileno(), 2)
        try:
            for name in PREIMPORT:
                try:
                    importlib.import_module(name)
                except ImportError:
                    pass
            from tcli.cli import _register_commands

            _register_commands()
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
        cap.seek(0)
        return cap.read().decode(errors="replace")


def _std_streams() -> None:
    """Fresh sys.stdin/stdout/stderr on fds 0-2, buffered as the interpreter sets them up."""
    import io

    enc = sys.__stdout__.encoding if sys.__stdout__ else "utf-8"
    sys.stdin = sys.__stdin__ = io.TextIOWrapper(io.BufferedReader(io.FileIO(0, "r", closefd=False)),
                                                 encoding=enc)
    sys.stdout = sys.__stdout__ = io.TextIOWrapper(
        io.BufferedWriter(io.FileIO(1, "w", closefd=False)), encoding=enc)
    sys.stderr = sys.__stderr__ = io.TextIOWrapper(
        io.BufferedWriter(io.FileIO(2, "w", closefd=False)), encoding=enc,
        errors="backslashreplace", line_buffering=True)


def _redirect(req: dict) -> None:
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    for fd, path, mode in ((0, req["stdin"] or os.devnull, os.O_RDONLY),
                           (1, req["stdout"], flags), (2, req["stderr"], flags)):
        f = os.open(path, mode, 0o644)
        os.dup2(f, fd)
        os.close(f)


def _setup_child(req: dict, base_path: list[str], server_threads: str | None) -> None:
    """Everything a fresh ``python -m tcli`` would have, for this request."""
    for sig in (signal.SIGTERM, signal.SIGCHLD, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    os.chdir(req["cwd"])
    os.environ.clear()
    os.environ.update(req["env"])
    extra = [p for p in req["env"].get("PYTHONPATH", "").split(os.pathsep) if p]
    sys.path[:] = [req["cwd"], *extra, *base_path]
    sys.argv = ["-m", *req["argv"]]
    _redirect(req)
    _std_streams()
    threads = req["env"].get("OMP_NUM_THREADS")
    if threads != server_threads and threads and threads.isdigit() and "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(int(threads))  # as libgomp would at start-up
    if "numpy" in sys.modules:
        sys.modules["numpy"].random.seed()  # a fresh process seeds its global RNG from the OS


def _run_code(code: str) -> None:
    """``python -c code``: sys.argv[0] '-c', the current directory first on sys.path, a fresh
    __main__ module."""
    import types

    sys.argv[0] = "-c"
    sys.path[0] = ""
    main = types.ModuleType("__main__")
    main.__builtins__ = __builtins__
    sys.modules["__main__"] = main
    exec(compile(code, "<string>", "exec"), main.__dict__)


def _exit_code(e: SystemExit) -> int:
    if e.code is None:
        return 0
    if isinstance(e.code, int):
        return e.code
    print(e.code, file=sys.stderr)
    return 1


def run_child(req: dict, base_path: list[str], server_threads: str | None) -> None:
    """The forked child: run ``-m tcli`` and leave through the interpreter's exit steps."""
    import atexit
    import runpy
    import threading
    import traceback

    code, kill_with = 1, None
    try:
        _setup_child(req, base_path, server_threads)
        if req.get("code") is None:
            runpy.run_module("tcli", run_name="__main__", alter_sys=True)
        else:
            _run_code(req["code"])
        code = 0
    except SystemExit as e:
        code = _exit_code(e)
    except KeyboardInterrupt:
        traceback.print_exc()
        kill_with = signal.SIGINT  # the interpreter re-raises an uncaught ^C as the signal
    except BaseException:  # noqa: BLE001 - an uncaught exception: traceback, exit 1
        traceback.print_exc()
    try:
        threading._shutdown()
        atexit._run_exitfuncs()
        for s in (sys.stdout, sys.stderr):
            s.flush()
    except BrokenPipeError:
        code = 120
    except BaseException:  # noqa: BLE001
        pass
    if kill_with is not None:
        signal.signal(kill_with, signal.SIG_DFL)
        os.kill(os.getpid(), kill_with)
    os._exit(code)


def _start(req: dict, ends: tuple, base_path: list[str], threads: str | None) -> int:
    pid = os.fork()
    if pid == 0:
        for fd in ends:
            os.close(fd)
        run_child(req, base_path, threads)
    return pid


def serve(rfd: int, wfd: int) -> None:
    """Fork a child per request line; reply with its pid at once and its exit status when it ends.
    Requests may overlap (tests run commands from threads): replies carry the request's id."""
    import select

    noise = preimport()
    reply = os.fdopen(wfd, "w", buffering=1)
    reply.write(json.dumps({"ready": not noise, "noise": noise[-2000:]}) + "\n")
    if noise:
        return
    pythonpath = os.environ.get("PYTHONPATH", "").split(os.pathsep)
    base_path = [p for p in sys.path[1:] if p not in pythonpath]
    threads = os.environ.get("OMP_NUM_THREADS")
    running, buf, eof = {}, b"", False
    while not eof or running:
        if not eof and select.select([rfd], [], [], 0.01 if running else None)[0]:
            data = os.read(rfd, 1 << 16)
            eof, buf = not data, buf + data
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                req = json.loads(line)
                pid = _start(req, (rfd, wfd), base_path, threads)
                running[pid] = req["id"]
                reply.write(json.dumps({"id": req["id"], "pid": pid}) + "\n")
        elif eof:
            select.select([], [], [], 0.01)
        while running:
            pid, status, ru = os.wait4(-1, os.WNOHANG)
            if pid == 0:
                break
            reply.write(json.dumps({"id": running.pop(pid), "status": os.waitstatus_to_exitcode(
                status), "cpu": ru.ru_utime + ru.ru_stime}) + "\n")


if __name__ == "__main__":
    serve(int(sys.argv[1]), int(sys.argv[2]))
