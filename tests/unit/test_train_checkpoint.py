"""Checkpoint writes never destroy user data and never leave debris.

- ``save_pretrained_atomic`` (and every command that writes a checkpoint) refuses a target that is
  a regular file, a symbolic link or a non-empty directory that is not a checkpoint: exit 2, the
  target untouched, nothing created beside it.
- The leftovers of a killed write (``<name>.tmp-*`` with tcli's marker, its writer dead) are
  removed by the next checkpoint write into the same parent; look-alikes are never touched.
- An exception or interrupt at any point of a write leaves the previous checkpoint intact and no
  temporary directory; through the real CLI, SIGINT/SIGTERM during train-step exit 130/143.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from unittest import mock

import orjson
import pytest

from conftest import REPO, run_python, run_tcli

torch = pytest.importorskip("torch")


# ----------------------------------------------------------------------------- fixtures, helpers

@pytest.fixture(scope="module")
def pair(tiny):
    """(model, tokenizer) for direct save_pretrained_atomic calls."""
    from tcli.models.load import load_model, load_tokenizer

    return load_model(tiny), load_tokenizer(tiny)


def save(target, pair, **state):
    from tcli.models.checkpoint import save_pretrained_atomic

    model, tok = pair
    return save_pretrained_atomic(str(target), model, tok, state=state or {"v": 1})


def snapshot(path: Path) -> dict:
    """Every file under ``path`` (or the file itself) with a hash of its bytes."""
    if path.is_file() or path.is_symlink():
        return {".": (os.readlink(path) if path.is_symlink() else
                      hashlib.sha256(path.read_bytes()).hexdigest())}
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def rollouts() -> bytes:
    recs = [{"schema": "tcli.rollout/1", "prompt_id": f"p{g}", "sample_id": s,
             "prompt_token_ids": [21, 15, 21, 33], "token_ids": [30 + s, 40 + g, 1],
             "logprobs": [-4.5, -4.4, -4.6], "advantages": [0.5 - s / 2] * 3}
            for g in range(2) for s in range(3)]
    return b"".join(orjson.dumps(r) + b"\n" for r in recs)


def error_line(stderr: bytes) -> str:
    err = stderr.decode()
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tcli: error: "), err
    return lines[0]


# ----------------------------------------------------------------------------- refusing targets

def _user_file(tmp_path: Path) -> Path:
    p = tmp_path / "notes.txt"
    p.write_text("my thesis, no backup")
    return p


def _user_dir(tmp_path: Path) -> Path:
    d = tmp_path / "photos"
    (d / "2024").mkdir(parents=True)
    (d / "2024" / "a.jpg").write_bytes(b"\xff\xd8 not really")
    (d / "model.safetensors").write_bytes(b"a user's file that merely looks like weights")
    return d


def _symlink(tmp_path: Path) -> Path:
    real = tmp_path / "real"
    real.mkdir()
    (real / "config.json").write_text("{}")
    link = tmp_path / "link"
    link.symlink_to(real)
    return link


TARGETS = {"regular file": _user_file, "non-checkpoint directory": _user_dir,
           "symbolic link": _symlink}


@pytest.mark.parametrize("kind", list(TARGETS))
def test_save_refuses_a_target_that_is_not_a_checkpoint(kind, pair, tmp_path):
    from tcli.errors import UsageError

    target = TARGETS[kind](tmp_path)
    before, names = snapshot(target), sorted(os.listdir(tmp_path))
    with pytest.raises(UsageError, match="refusing to replace it") as ei:
        save(target, pair)
    assert ei.value.exit_code == 2 and str(target) in str(ei.value)
    assert snapshot(target) == before
    assert sorted(os.listdir(tmp_path)) == names  # no temporary directory either


@pytest.mark.parametrize("kind", list(TARGETS))
@pytest.mark.parametrize("cmd", ["train-step", "init-model"])
def test_cli_refuses_a_target_that_is_not_a_checkpoint(kind, cmd, tiny, tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_bytes(rollouts())
    tmp_path = tmp_path / "where"
    tmp_path.mkdir()
    target = TARGETS[kind](tmp_path)
    before, names = snapshot(target), sorted(os.listdir(tmp_path))
    argv = (["train-step", src, "-m", tiny, "-o", target] if cmd == "train-step"
            else ["init-model", target, "--hidden", "16", "--layers", "1"])
    r = run_tcli(argv)
    assert r.returncode == 2, r.stderr.decode()
    line = error_line(r.stderr)
    assert str(target) in line and "replac" in line, line
    assert snapshot(target) == before
    assert sorted(os.listdir(tmp_path)) == names and r.stdout == b""


def test_save_replaces_an_empty_directory_and_a_checkpoint(pair, tmp_path):
    from tcli.models.checkpoint import read_state

    target = tmp_path / "ck"
    target.mkdir()
    save(target, pair, v=1)
    assert read_state(str(target))["v"] == 1
    save(target, pair, v=2)
    assert read_state(str(target))["v"] == 2
    assert os.listdir(tmp_path) == ["ck"]
    # a directory with only tcli_state.json (weights lost) is still ours to replace
    (target / "config.json").unlink()
    save(target, pair, v=3)
    assert read_state(str(target))["v"] == 3


def test_sft_refuses_before_training(tiny, tmp_path):
    from tcli.errors import UsageError
    from tcli.sft import sft

    target = _user_dir(tmp_path)
    before = snapshot(target)
    with mock.patch("tcli.sft.response_loss", side_effect=AssertionError("trained")):
        with pytest.raises(UsageError, match="not a checkpoint"):
            sft(tiny, [("1+1=", "2")], str(target), steps=3)
    assert snapshot(target) == before


# ----------------------------------------------------------------------------- stale leftovers

KILLED_WRITER = r"""
import os, signal, sys
from unittest import mock
import tcli.models.checkpoint as ck
from tcli.models.load import load_model, load_tokenizer

model_dir, target = sys.argv[1:]
def die(path):  # the weights are written, the rest is not: SIGKILL, no cleanup can run
    os.kill(os.getpid(), signal.SIGKILL)
with mock.patch.object(ck, "_fsync_tree", die):
    ck.save_pretrained_atomic(target, load_model(model_dir), load_tokenizer(model_dir))
"""

HOLDING_WRITER = r"""
import sys, time
import tcli.models.checkpoint as ck
tmp = ck._Temp.create(sys.argv[1], "busy")
print(tmp.path, flush=True)
time.sleep(60)
"""


def _killed_write(tiny: str, target: Path) -> Path:
    r = run_python(KILLED_WRITER, [tiny, target], fresh=True)  # it SIGKILLs itself
    assert r.returncode == -signal.SIGKILL, r.stderr.decode()
    left = [p for p in target.parent.iterdir() if p.name.startswith(target.name + ".tmp-")]
    assert len(left) == 1 and (left[0] / "model.safetensors").exists()
    return left[0]


def test_stale_leftovers_are_removed_and_nothing_else(tiny, pair, tmp_path):
    from tcli.models.checkpoint import MARKER

    parent = tmp_path / "checkpoints"
    parent.mkdir()
    stale = _killed_write(tiny, parent / "step_1")
    assert (stale / MARKER).exists()

    # look-alikes that are not ours, or not dead
    no_marker = parent / "mine.tmp-abcdefgh"
    no_marker.mkdir()
    (no_marker / "data.bin").write_bytes(b"user data")
    wrong_marker = parent / "other.tmp-abcdefgh"
    wrong_marker.mkdir()
    (wrong_marker / MARKER).write_text("someone else's file with the same name")
    record_tmp = parent / "out.jsonl.tmp-abcdefgh"          # a record writer's temp file
    record_tmp.write_bytes(b"{}\n")
    outside = tmp_path / "outside.tmp-abcdefgh"             # another parent: never looked at
    outside.mkdir()
    (outside / MARKER).write_bytes(stale.joinpath(MARKER).read_bytes())
    link = parent / "link.tmp-abcdefgh"                     # a symlink to a marked directory
    link.symlink_to(outside)
    busy = subprocess.Popen([sys.executable, "-c", HOLDING_WRITER, str(parent)], cwd=REPO,
                            stdout=subprocess.PIPE)
    try:
        live = Path(busy.stdout.readline().decode().strip())  # a writer still at work
        assert live.is_dir() and (live / MARKER).exists()
        keep = {p: snapshot(p) for p in (no_marker, wrong_marker, record_tmp, outside, live)}

        save(parent / "step_2", pair)

        assert not stale.exists()
        assert {p: snapshot(p) for p in keep} == keep
        assert link.is_symlink() and outside.exists()
        assert sorted(os.listdir(parent)) == sorted(
            ["step_2", no_marker.name, wrong_marker.name, record_tmp.name, link.name, live.name])
    finally:
        busy.kill()
        busy.wait()
    # its writer is gone now: the next write cleans it up as well
    save(parent / "step_3", pair)
    assert not live.exists() and (parent / "step_2").exists()


def test_a_killed_write_keeps_the_previous_checkpoint(tiny, pair, tmp_path):
    from tcli.models.checkpoint import read_state

    target = tmp_path / "ck"
    save(target, pair, v=1)
    before = snapshot(target)
    _killed_write(tiny, target)
    assert snapshot(target) == before
    save(target, pair, v=2)
    assert read_state(str(target))["v"] == 2 and os.listdir(tmp_path) == ["ck"]


# ----------------------------------------------------------------------------- interrupts (library)

@pytest.mark.parametrize("exc", [KeyboardInterrupt, SystemExit, RuntimeError])
@pytest.mark.parametrize("where", ["weights", "tokenizer"])
def test_exception_mid_write_leaves_previous_checkpoint(exc, where, pair, tmp_path):
    model, tok = pair
    target = tmp_path / "ck"
    save(target, pair, v=1)
    before = snapshot(target)
    obj, name = (model, "save_pretrained") if where == "weights" else (tok, "save_pretrained")
    real = getattr(obj, name)

    def half(path, *a, **kw):
        real(path, *a, **kw)
        raise exc("stop")

    with mock.patch.object(obj, name, half):
        with pytest.raises(exc):
            save(target, pair, v=2)
    assert snapshot(target) == before
    assert os.listdir(tmp_path) == ["ck"]


@pytest.mark.parametrize("swap", ["exchange", "two renames"])
def test_signal_just_before_the_swap_cancels_it(swap, pair, tmp_path):
    """SIGINT while the finished checkpoint is about to be renamed: the rename is not done
    half-way; the signal is delivered after it was called off, the target is unchanged."""
    import tcli.models.checkpoint as ck

    target = tmp_path / "ck"
    save(target, pair, v=1)
    before = snapshot(target)
    real = ck._Temp.unmark

    def unmark(self):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)  # the handler would have run by now were it not deferred
        real(self)

    with mock.patch.object(ck._Temp, "unmark", unmark), \
            mock.patch.object(ck, "_exchange", return_value=False) if swap == "two renames" \
            else mock.patch.object(ck, "fsync_dir"):
        with pytest.raises(KeyboardInterrupt):
            save(target, pair, v=2)
    assert snapshot(target) == before and os.listdir(tmp_path) == ["ck"]


@pytest.mark.parametrize("swap", ["exchange", "two renames"])
def test_signal_during_the_swap_completes_it(swap, pair, tmp_path):
    """SIGINT in the middle of the renames: they finish (the new checkpoint is whole at the
    target), then the interrupt is raised and the old checkpoint is removed."""
    import tcli.models.checkpoint as ck

    target = tmp_path / "ck"
    save(target, pair, v=1)
    real_exchange, real_rename = ck._exchange, os.rename

    def hit():
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)  # the handler would have run by now were it not deferred

    def exchange(a, b):
        hit()
        return real_exchange(a, b)

    def rename(a, b):
        if ".old-" in str(b):  # the first of the two renames
            hit()
        real_rename(a, b)

    patch = mock.patch.object(ck, "_exchange", exchange) if swap == "exchange" else \
        mock.patch.multiple(ck, _exchange=mock.Mock(return_value=False))
    with patch, mock.patch.object(os, "rename", rename):
        with pytest.raises(KeyboardInterrupt):
            save(target, pair, v=2)
    from tcli.models.checkpoint import read_state

    assert read_state(str(target))["v"] == 2 and (target / "model.safetensors").exists()
    assert os.listdir(tmp_path) == ["ck"]


SIGTERM_DEFAULT = r"""
import os, signal, sys
from unittest import mock
import tcli.models.checkpoint as ck
from tcli.models.load import load_model, load_tokenizer

model_dir, target = sys.argv[1:]
assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
real = ck._write
def write(tmp, model, *a):
    model.save_pretrained(tmp)
    os.kill(os.getpid(), signal.SIGTERM)
    real(tmp, model, *a)
with mock.patch.object(ck, "_write", write):
    ck.save_pretrained_atomic(target, load_model(model_dir), load_tokenizer(model_dir),
                              state={"v": 2})
"""


def test_sigterm_with_default_handler_still_cleans_up(tiny, pair, tmp_path):
    """A library caller that never installed a SIGTERM handler: the write still cleans up
    (SystemExit 143) instead of dying with its temporary directory on disk."""
    target = tmp_path / "ck"
    save(target, pair, v=1)
    before = snapshot(target)
    r = run_python(SIGTERM_DEFAULT, [tiny, target], fresh=True)  # SIGTERM, default handler
    assert r.returncode == 143, r.stderr.decode()
    assert snapshot(target) == before and os.listdir(tmp_path) == ["ck"]


# ----------------------------------------------------------------------------- interrupts (CLI)

CLI_DRIVER = r"""
import os, signal, sys, time
from unittest import mock
import tcli.models.checkpoint as ck
import tcli.train.trainer as tr
from tcli.cli import main

where, sig, argv = sys.argv[1], getattr(signal, sys.argv[2]), sys.argv[3:]

def hit():
    os.kill(os.getpid(), sig)
    time.sleep(0.05)

def wrap(obj, name, before=True):
    real = getattr(obj, name)
    def f(*a, **kw):
        if before:
            hit()
        out = real(*a, **kw)
        if not before:
            hit()
        return out
    return mock.patch.object(obj, name, f)

patch = {"step": lambda: wrap(tr.Trainer, "step"),
         "weights": lambda: wrap(ck, "_write", before=False),
         "swap": lambda: wrap(ck._Temp, "unmark")}[where]
with patch():
    main(argv)
"""


@pytest.mark.parametrize("sig, code", [("SIGINT", 130), ("SIGTERM", 143)])
@pytest.mark.parametrize("where", ["step", "weights", "swap"])
def test_cli_interrupt_keeps_checkpoints(where, sig, code, tiny, tmp_path):
    """train-step interrupted while training, after the weights were written and just before the
    swap: exit 130/143, the input checkpoint and the existing -o checkpoint unchanged, no
    temporary directory, no metrics."""
    import shutil

    src = tmp_path / "in.jsonl"
    src.write_bytes(rollouts())
    model = tmp_path / "model"
    shutil.copytree(tiny, model)
    out = tmp_path / "out"
    shutil.copytree(tiny, out)
    (out / "tcli_state.json").write_bytes(b'{"step": 7}')
    before = {p: snapshot(p) for p in (model, out)}
    r = run_python(CLI_DRIVER, [where, sig, "train-step", src, "-m", model, "-o", out,
                                "--lr", "1e-3"])
    assert r.returncode == code, r.stderr.decode()
    assert r.stdout == b""
    assert "Traceback" not in r.stderr.decode()
    assert {p: snapshot(p) for p in (model, out)} == before
    assert sorted(os.listdir(tmp_path)) == ["in.jsonl", "model", "out"]
