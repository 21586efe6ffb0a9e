"""The python tool's sandbox: every limit ends the code with an error Turn, the caller never sees
an exception, the temporary directory is gone afterwards, and the same code gives the same text.

Limits are set low here so that each case costs about a second of CPU at most; the assertions
are about what happened (which error, what text), never about how long it took."""

from __future__ import annotations

import os

import pytest

from tcli.errors import UsageError
from tcli.tools import Limits, Toolset, network_isolation
from tcli.tools.sandbox import run_code

FAST = Limits(cpu_seconds=1, wall_seconds=60, memory_bytes=256 << 20, output_bytes=4096,
              file_bytes=1 << 20)


def python(code: str, limits: Limits = FAST):
    turn = Toolset(["python"], fmt="tags", limits=limits).step(f"<python>{code}</python>")
    assert turn is not None
    assert turn.call == {"name": "python", "arguments": {"code": code.strip("\n")}}
    return turn


def test_prints_come_back_and_runs_are_deterministic():
    code = "print(sorted({3, 1, 2}), {'a', 'b', 'c', 'd'}, hash('tcli'))\nprint(7 * 6)"
    a, b = python(code), python(code)
    assert a.error is None and a.result == b.result and a.result.endswith("\n42\n")
    assert python("x = 1").result == "(no output)"


def test_long_programs_and_fenced_programs():
    """A request larger than a pipe's buffer reaches the worker; a Markdown fence is removed."""
    code = "s = '''" + "é中" * 30_000 + "'''\nprint(len(s))"
    assert python(code).result == "60000\n"
    assert python("```python\nprint('fenced')\n```").result == "fenced\n"


def test_errors_are_tracebacks_of_the_code_only():
    turn = python("def f():\n    return 1 / 0\nf()")
    assert turn.error == "tool_error"
    assert 'File "<python>", line 2, in f' in turn.result and "return 1 / 0" in turn.result
    assert turn.result.rstrip().endswith("ZeroDivisionError: division by zero")
    assert "sandbox_boot" not in turn.result
    assert python("import sys; sys.exit(3)").error == "tool_error"
    assert python("import sys; sys.exit(0)").error is None
    assert python("print(1").error == "tool_error"  # a syntax error


def test_infinite_loop_is_stopped_by_the_cpu_limit():
    turn = python("while True:\n    pass")
    assert turn.error == "limit" and "CPU time limit" in turn.result


def test_sleeping_code_is_stopped_by_the_wall_clock():
    slow = Limits(cpu_seconds=5, wall_seconds=1)
    turn = python("import time\nprint('started', flush=True)\ntime.sleep(600)", slow)
    assert turn.error == "timeout" and "wall-clock limit of 1 s" in turn.result
    assert turn.result.startswith("started\n")


def test_a_worker_that_closes_its_output_and_hangs_is_still_timed_out():
    turn = python("import os, time\nos.close(1)\nos.close(2)\ntime.sleep(600)",
                  Limits(cpu_seconds=5, wall_seconds=1))
    assert turn.error == "timeout"


def test_fork_bomb_is_contained():
    turn = python("import os\nwhile True:\n    os.fork()")
    assert turn.error == "tool_error" and "os.fork is not allowed" in turn.result
    for code in ("import subprocess", "import multiprocessing", "import os; os.system('true')",
                 "import os; os.execv('/bin/true', ['true'])", "import ctypes",
                 "import pty; pty.spawn('/bin/sh')"):
        assert python(code).error == "tool_error", code


def test_the_rlimits_are_in_place():
    names = ["CPU", "AS", "FSIZE", "NPROC", "NOFILE", "CORE"]
    turn = python("import resource\nfor n in %r:\n    print(resource.getrlimit("
                  "getattr(resource, 'RLIMIT_' + n)))" % names)
    f = FAST
    want = [(1, 2), (f.memory_bytes,) * 2, (f.file_bytes,) * 2, (f.processes,) * 2,
            (f.open_files,) * 2, (0, 0)]
    assert turn.result.split("\n")[:-1] == [str(w) for w in want]
    big = python(f"open('big', 'wb').write(b'x' * {2 * FAST.file_bytes})")
    assert big.error == "tool_error" and "File too large" in big.result


def test_huge_output_is_truncated_and_the_code_stopped():
    turn = python("while True:\n    print('x' * 1000)")
    assert turn.error == "limit"
    assert f"[output truncated: over {FAST.output_bytes} bytes" in turn.result
    assert len(turn.result.encode()) < FAST.output_bytes + 200


@pytest.mark.parametrize("code", ["x = bytearray(1 << 30)",
                                  "a = []\nwhile True:\n    a.append(bytearray(1 << 20))"])
def test_memory_hog_is_stopped(code):
    turn = python(code)
    assert turn.error == "limit" and "memory limit" in turn.result


def test_reading_outside_the_working_directory_is_refused():
    for code in ("print(open('/etc/passwd').read())", "import os; print(os.listdir('/etc'))",
                 "import pathlib; print(pathlib.Path('/etc/passwd').read_text())",
                 "import os; os.symlink('/etc/passwd', 'p'); print(open('p').read())",
                 f"print(open({os.path.abspath(__file__)!r}).read())"):
        turn = python(code)
        assert turn.error == "tool_error" and "is not allowed" in turn.result, code
        assert "root:" not in turn.result
    ok = python("open('notes.txt', 'w').write('kept')\nprint(open('notes.txt').read())\n"
                "import os, json, fractions\nprint(os.listdir('.'))")  # stdlib imports work
    assert ok.error is None and ok.result == "kept\n['notes.txt']\n"


def test_writing_outside_the_working_directory_is_refused(tmp_path):
    target = tmp_path / "escaped.txt"
    for code in (f"open({str(target)!r}, 'w').write('x')", f"import os; os.mkdir({str(target)!r})",
                 f"import shutil; shutil.copy('/etc/hostname', {str(target)!r})",
                 f"import os; os.rename('.', {str(target)!r})", "import os; os.chdir('/')",
                 f"import sqlite3; sqlite3.connect({str(target)!r}).execute('create table t(x)')"):
        assert python(code).error == "tool_error", code
        assert not target.exists()


def test_network_is_refused():
    assert network_isolation() in ("namespace", "audit-hook")
    for code in ("import socket; socket.create_connection(('127.0.0.1', 9))",
                 "import socket; socket.getaddrinfo('localhost', 80)",
                 "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9')"):
        turn = python(code)
        assert turn.error == "tool_error" and "not allowed" in turn.result, code


@pytest.mark.parametrize("ending", ["", "import time\ntime.sleep(600)"])
def test_the_temporary_directory_is_removed(ending):
    """Also what the code made unreadable, and also when the worker is killed."""
    code = ("import os\nos.makedirs('a/b')\nopen('a/b/f', 'w').write('x')\nos.chmod('a', 0)\n"
            "print(os.getcwd(), flush=True)\n" + ending)
    turn = python(code, Limits(cpu_seconds=5, wall_seconds=1) if ending else FAST)
    assert turn.error == ("timeout" if ending else None)
    cwd = turn.result.split("\n")[0]
    assert "tcli-tool-" in os.path.basename(cwd) and cwd != os.getcwd()
    assert not os.path.exists(cwd)


def test_crashes_are_crash_turns():
    turn = python("import os, signal\nos.kill(os.getpid(), signal.SIGSEGV)")
    assert turn.error == "crash" and "exit status -11" in turn.result
    assert python("import os\nos._exit(7)").error == "crash"
    assert python("import os\nos.kill(1, 9)").error == "tool_error"  # only itself


def test_limits_are_checked():
    with pytest.raises(UsageError, match="cpu_seconds"):
        Limits(cpu_seconds=0)
    with pytest.raises(UsageError, match="wall_seconds"):
        Limits(wall_seconds=float("inf"))
    assert run_code("print('direct')", FAST).text == "direct\n"


def test_calls_from_several_threads():
    from concurrent.futures import ThreadPoolExecutor

    ts = Toolset(["python", "calc"], fmt="tags", limits=FAST)
    calls = [f"<python>print({i} ** 2)</python>" for i in range(4)] + ["<calc>2**10</calc>"]
    with ThreadPoolExecutor(3) as pool:
        got = [t.result for t in pool.map(ts.step, calls)]
    assert got == ["0\n", "1\n", "4\n", "9\n", "1024"]
