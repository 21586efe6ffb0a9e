"""Interrupts and misbehaving `python:module:function` verifiers, through the real `tcli verify`.

Ctrl-C (SIGINT to the process group, as a terminal sends it) ends the command with 130 and one
line from the parent; SIGTERM to the parent ends it with 143; either way no worker process is left
and no worker prints a traceback. A verifier that exits or raises SystemExit/KeyboardInterrupt
has crashed on that record, with workers and in-process (--workers 0): within
--max-verifier-errors only that record fails, and a real Ctrl-C is never taken for a crash.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import orjson
import pytest

from conftest import REPO
from tcli.stages.verify import VerifierCrashed, verify_records

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc, sessions")

PLUGIN = textwrap.dedent('''
    import os, sys, time

    def slow(text, answer, record):
        open(os.path.join(os.environ["MARK_DIR"], f"started-{os.getpid()}"), "w").close()
        time.sleep(0.2)
        return float(text == answer), {}

    def rude(text, answer, record):
        if text == "sys.exit(0)":
            sys.exit(0)
        if text == "sys.exit(3)":
            sys.exit(3)
        if text == "raise SystemExit":
            raise SystemExit
        if text == "raise KeyboardInterrupt":
            raise KeyboardInterrupt
        if text == "os._exit(0)":
            os._exit(0)
        if text == "os._exit(7)":
            os._exit(7)
        return float(text == answer), {"parsed": text}
''')


@pytest.fixture
def plugin(tmp_path):
    mod = f"tcli_test_rude_{tmp_path.name.replace('-', '_')}"
    (tmp_path / f"{mod}.py").write_text(PLUGIN)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO)]),
           "MARK_DIR": str(tmp_path), "OMP_NUM_THREADS": "1"}
    env.pop("TCLI_DEBUG", None)
    return mod, env, tmp_path


def session_processes(sid: int) -> list[str]:
    """Live processes of session ``sid`` (our `tcli` ran as its leader) or named tcli-verify
    with it as parent: anything left behind."""
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            stat = Path(f"/proc/{d}/stat").read_text()
        except OSError:
            continue
        name = stat[stat.index("(") + 1:stat.rindex(")")]
        fields = stat.rsplit(")", 1)[1].split()
        state, ppid, sess = fields[0], int(fields[1]), int(fields[3])
        if state not in "ZX" and (sess == sid or (name == "tcli-verify" and ppid == sid)):
            out.append(f"{d} {name} {state}")
    return out


def no_leftovers(sid: int, wait: float = 5.0) -> list[str]:
    deadline = time.monotonic() + wait
    left = session_processes(sid)
    while left and time.monotonic() < deadline:
        time.sleep(0.05)
        left = session_processes(sid)
    return left


def start_verify(args, env, src: Path):
    return subprocess.Popen([sys.executable, "-m", "tcli", "verify", *args], cwd=REPO, env=env,
                            stdin=open(src, "rb"), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)


@pytest.mark.parametrize("workers", ["2", "0"])
@pytest.mark.parametrize("how", ["ctrl-c", "sigterm"])
def test_interrupt_ends_with_130_or_143_and_leaves_nothing(plugin, workers, how):
    mod, env, tmp = plugin
    src = tmp / "in.jsonl"
    src.write_bytes(b"".join(b'{"text": "%d", "answer": "%d"}\n' % (i, i) for i in range(500)))
    p = start_verify(["--task", f"python:{mod}:slow", "--workers", workers, "-q"], env, src)
    try:
        deadline = time.monotonic() + 60
        while not list(tmp.glob("started-*")) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert list(tmp.glob("started-*")), "the verifier never ran"
        time.sleep(0.3)  # in the middle of verifying (in-process: inside the verifier's sleep)
        if how == "ctrl-c":
            os.killpg(p.pid, signal.SIGINT)  # what a terminal does: the whole process group
        else:
            os.kill(p.pid, signal.SIGTERM)
        out, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    if how == "ctrl-c":
        assert (p.returncode, err) == (130, b"tcli: error: interrupted\n")
    else:
        assert p.returncode == 143, err
        assert len(err.splitlines()) == 1 and err.startswith(b"tcli: error:"), err
    assert no_leftovers(p.pid) == []
    n = len(out.splitlines())
    assert n < 500  # it did stop early


@pytest.mark.parametrize("workers", ["2", "0"])
def test_exiting_and_interrupting_verifiers_only_fail_their_record_when_allowed(plugin, workers):
    mod, env, tmp = plugin
    rude = ["sys.exit(0)", "sys.exit(3)", "raise SystemExit", "raise KeyboardInterrupt",
            "os._exit(0)", "os._exit(7)"]
    texts = []
    for i, r in enumerate(rude):
        texts += [str(i), r]
    texts.append("last")
    src = tmp / "in.jsonl"
    src.write_bytes(b"".join(orjson.dumps({"i": i, "text": t, "answer": t}) + b"\n"
                             for i, t in enumerate(texts)))
    p = start_verify(["--task", f"python:{mod}:rude", "--workers", workers, "--timeout", "20",
                      "--max-verifier-errors", "0.5"], env, src)
    stdout, stderr = p.communicate(timeout=120)
    assert p.returncode == 0, stderr
    assert b"Traceback" not in stderr and b"Process tcli-verify" not in stderr, stderr
    assert no_leftovers(p.pid) == []
    out = [orjson.loads(x) for x in stdout.splitlines()]
    assert [r["i"] for r in out] == list(range(len(texts)))  # nothing lost, nothing added
    by = {r["text"]: r for r in out}
    for t in texts:
        if t not in rude:
            assert by[t]["reward"] == 1.0, by[t]
    for t in rude:
        assert by[t]["reward"] == 0.0 and by[t]["verdict"]["correct"] is False, by[t]
        assert by[t]["verdict"]["crashed"] is True, by[t]
    err = {t: by[t]["verdict"]["error"] for t in rude}
    assert err["sys.exit(0)"] == "verifier called sys.exit(0)"
    assert err["sys.exit(3)"] == "verifier called sys.exit(3)"
    assert err["raise SystemExit"] == "verifier called sys.exit(None)"
    assert err["raise KeyboardInterrupt"] == "verifier raised KeyboardInterrupt"
    if workers == "0":
        assert err["os._exit(0)"] == "verifier called os._exit(0)"
        assert err["os._exit(7)"] == "verifier called os._exit(7)"
    else:  # the worker really ended: the pool says how, and a fresh worker takes over
        assert err["os._exit(0)"] == "verifier worker died (exit code 0)"
        assert err["os._exit(7)"] == "verifier worker died (exit code 7)"


# ----------------------------------------------------------------------------- in-process, library

def _raise_kbint(text, answer, record):
    raise KeyboardInterrupt


def _real_sigint(text, answer, record):
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(5)  # the signal arrives during this sleep
    return 1.0, {}


def _os_exit(text, answer, record):
    os._exit(5)


def test_in_process_tells_a_real_ctrl_c_from_a_verifier_raising_one(monkeypatch):
    from tcli.verifiers import tasks

    monkeypatch.setattr(tasks, "load_plugin", lambda spec: {
        "python:t:kbint": _raise_kbint, "python:t:sigint": _real_sigint,
        "python:t:exit": _os_exit}[spec])
    recs = [(i, {"text": "x", "answer": "1"}) for i in (1, 2, 3)]
    real_exit, handler = os._exit, signal.getsignal(signal.SIGINT)
    with pytest.raises(VerifierCrashed, match="<t>:1: verifier raised KeyboardInterrupt"):
        list(verify_records(iter(recs), "<t>", task="python:t:kbint", workers=0))
    with pytest.raises(VerifierCrashed, match=r"<t>:1: verifier called os\._exit\(5\)"):
        list(verify_records(iter(recs), "<t>", task="python:t:exit", workers=0))
    assert os._exit is real_exit and signal.getsignal(signal.SIGINT) is handler
    t0 = time.monotonic()
    with pytest.raises(KeyboardInterrupt):  # a real Ctrl-C is not a verifier failure
        list(verify_records(iter(recs), "<t>", task="python:t:sigint", workers=0))
    assert time.monotonic() - t0 < 4
    assert os._exit is real_exit and signal.getsignal(signal.SIGINT) is handler
