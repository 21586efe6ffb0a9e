"""``-o`` respects what is at the path (tcli.io.target), through the real CLI.

A new or regular file is written under a temporary name and renamed over it; a device, FIFO or
/dev/stdout is written straight through and never replaced; a symlink keeps being a link while
its target is replaced; permission bits survive a replace and a new file gets 0666 & ~umask.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from conftest import REPO, failed, jsonl, run_tcli
from tcli.errors import TcliError, UsageError
from tcli.io import RecordReader, RecordWriter, write_atomic_bytes


def rollouts() -> list[dict]:
    return [{"schema": "tcli.rollout/1", "prompt_id": "p", "sample_id": i, "token_ids": t,
             "reward": r, "text": f"#### {i}", "answer": "1"}
            for i, (t, r) in enumerate([([5, 7, 9, 2], 1.0), ([5, 7, 8, 2], 0.0), ([4, 6, 2], 1.0)])]


@pytest.fixture
def src(tmp_path) -> Path:
    p = tmp_path / "in.jsonl"
    p.write_bytes(jsonl(rollouts()))
    return p


COMMANDS = {
    "build-tree": ["build-tree"],
    "advantages": ["advantages"],
    "verify": ["verify", "--task", "arith", "--workers", "0", "--quiet"],
}


def expected(cmd: str, src: Path) -> bytes:
    r = run_tcli([*COMMANDS[cmd], src])
    assert r.returncode == 0, r.stderr
    assert r.stdout
    return r.stdout


def leftovers(d: Path) -> list[str]:
    return sorted(n for n in os.listdir(d) if ".tmp-" in n)


# ----------------------------------------------------------------------------- devices

def _guard(path: str):
    """If a regression renamed a file over the system's ``path`` (a device node or the
    /dev/stdout link), put the original back before failing, so other work on the machine goes on."""
    before = os.lstat(path)
    link = os.readlink(path) if stat.S_ISLNK(before.st_mode) else None
    yield
    after = os.lstat(path)
    intact = (after.st_ino, after.st_mode, after.st_rdev) == (before.st_ino, before.st_mode,
                                                              before.st_rdev)
    if not intact:
        os.unlink(path)
        if link is not None:
            os.symlink(link, path)
        else:
            os.mknod(path, before.st_mode, before.st_rdev)
            os.chmod(path, stat.S_IMODE(before.st_mode))
    assert intact, f"{path} was replaced"


@pytest.fixture
def dev_null_guard():
    yield from _guard("/dev/null")


@pytest.fixture
def dev_stdout_guard():
    yield from _guard("/dev/stdout")


@pytest.mark.parametrize("cmd", COMMANDS)
def test_dev_null_is_written_not_replaced(cmd, src, dev_null_guard):
    r = run_tcli([*COMMANDS[cmd], src, "-o", "/dev/null"])
    assert r.returncode == 0, r.stderr
    assert r.stdout == b""
    assert not [n for n in os.listdir("/dev") if n.startswith("null.tmp-")]


# ----------------------------------------------------------------------------- -o onto an input

@pytest.mark.parametrize("cmd", COMMANDS)
def test_a_stream_stage_rewrites_its_own_input_in_place(cmd, src):
    """The input is read from the file opened at the start; the output replaces it at the end."""
    want = expected(cmd, src)
    r = run_tcli([*COMMANDS[cmd], src, "-o", src])
    assert r.returncode == 0, r.stderr
    assert src.read_bytes() == want
    assert leftovers(src.parent) == []


def test_eval_never_writes_over_its_data_or_one_output_over_the_other(tiny, tmp_path):
    data = tmp_path / "q.jsonl"
    data.write_bytes(jsonl([{"id": "a", "prompt": "2+2=?", "answer": "4"}]))
    before = data.read_bytes()
    link = tmp_path / "link.jsonl"
    link.symlink_to(data)
    new = tmp_path / "new.json"
    for outs, words in [
            (["-o", tmp_path / "." / "q.jsonl"], ("-o/--output", "is the --data file")),
            (["--summary", link], ("--summary", "is the --data file")),
            (["-o", data, "--summary", tmp_path / "x.json"], ("is the --data file",)),
            (["-o", new, "--summary", new], ("--summary", "is the -o/--output file"))]:
        r = run_tcli(["eval", "-m", tiny, "--data", data, "--max-new-tokens", "2", "-q", *outs])
        failed(r, 2, "refusing to write into it", *words)
        assert data.read_bytes() == before and not r.stdout
    assert sorted(os.listdir(tmp_path)) == ["link.jsonl", "q.jsonl"]


def test_train_step_metrics_never_go_into_its_input(tiny, src, tmp_path):
    before = src.read_bytes()
    r = run_tcli(["train-step", src, "-m", tiny, "-o", tmp_path / "ckpt", "--metrics", src])
    failed(r, 2, f"--metrics {src} is the INPUT file")
    assert src.read_bytes() == before and not (tmp_path / "ckpt").exists()


def scratch_device(tmp_path: Path, name: str, minor: int) -> str:
    """A memory device (/dev/null = 1,3, /dev/full = 1,7): as root a fresh node in ``tmp_path``,
    so a regression that renames over it cannot hurt the system's; otherwise /dev's own, which a
    user cannot replace anyway."""
    if os.geteuid() != 0:
        return f"/dev/{name}"
    node = tmp_path / name
    os.mknod(node, stat.S_IFCHR | 0o666, os.makedev(1, minor))
    return str(node)


@pytest.mark.skipif(os.geteuid() != 0, reason="mknod needs root")
def test_own_character_device_is_not_replaced(src, tmp_path):
    """A device node in a scratch directory, so a regression cannot hurt the system's."""
    node = Path(scratch_device(tmp_path, "null", 3))
    ino = node.stat().st_ino
    r = run_tcli(["build-tree", src, "-o", node])
    assert r.returncode == 0, r.stderr
    st = os.lstat(node)
    assert stat.S_ISCHR(st.st_mode) and st.st_ino == ino
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("cmd, fmt", [("build-tree", "jsonl"), ("advantages", "arrow"),
                                      ("verify", "jsonl")])
def test_fifo_is_streamed_into(cmd, fmt, src, tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    got: list[bytes] = []

    def read():
        with open(fifo, "rb") as f:  # blocks until tcli opens the write end
            got.append(f.read())

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    r = run_tcli([*COMMANDS[cmd], src, "-o", fifo, "--format", fmt])
    reader.join(timeout=60)
    assert r.returncode == 0, r.stderr
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    assert leftovers(tmp_path) == []
    want = run_tcli([*COMMANDS[cmd], src, "--format", fmt]).stdout
    assert got == [want]


def test_dev_stdout_writes_to_the_pipe(src, tmp_path, dev_stdout_guard):
    link = tmp_path / "stdout"
    link.symlink_to("/proc/self/fd/1")  # what /dev/stdout is, in a place a regression cannot hurt
    for path in (link, "/proc/self/fd/1", "/dev/fd/1", "/dev/stdout"):
        r = run_tcli(["build-tree", src, "-o", path])
        assert r.returncode == 0, r.stderr
        assert r.stdout == expected("build-tree", src), path
    assert link.is_symlink() and leftovers(tmp_path) == []


def test_dev_stdout_redirected_to_a_file_appends_to_it(src, tmp_path, dev_stdout_guard):
    """/dev/stdout is this process's fd 1: written through it, not renamed over the file that
    fd 1 happens to be (which would lose what `>>` appended to)."""
    out = tmp_path / "log.jsonl"
    out.write_bytes(b"earlier\n")
    with open(out, "ab") as f:
        r = subprocess.run([sys.executable, "-m", "tcli", "advantages", str(src), "-o", "/dev/stdout"],
                           cwd=REPO, stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.PIPE,
                           timeout=120)
    assert r.returncode == 0, r.stderr
    assert out.read_bytes() == b"earlier\n" + expected("advantages", src)
    assert leftovers(tmp_path) == []


# ----------------------------------------------------------------------------- files and links

@pytest.mark.parametrize("cmd", COMMANDS)
def test_symlink_target_is_replaced_and_link_stays(cmd, src, tmp_path):
    real_dir = tmp_path / "data"
    real_dir.mkdir()
    target = real_dir / "out.jsonl"
    target.write_bytes(b"old\n")
    os.chmod(target, 0o640)
    link = tmp_path / "link.jsonl"
    link.symlink_to(os.path.relpath(target, tmp_path))
    r = run_tcli([*COMMANDS[cmd], src, "-o", link])
    assert r.returncode == 0, r.stderr
    assert link.is_symlink() and os.readlink(link) == os.path.relpath(target, tmp_path)
    assert target.read_bytes() == expected(cmd, src)
    assert stat.S_IMODE(target.stat().st_mode) == 0o640
    assert leftovers(tmp_path) == [] and leftovers(real_dir) == []


def test_chain_of_symlinks_and_dangling_link(src, tmp_path):
    target = tmp_path / "final.jsonl"
    (tmp_path / "b").symlink_to("final.jsonl")  # dangling until the command creates final.jsonl
    (tmp_path / "a").symlink_to(tmp_path / "b")
    r = run_tcli(["build-tree", src, "-o", tmp_path / "a"])
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "a").is_symlink() and (tmp_path / "b").is_symlink()
    assert target.read_bytes() == expected("build-tree", src)


def test_failed_command_leaves_link_and_target_unchanged(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(jsonl(rollouts()[:1]) + b'{"prompt_id": "p", "token_ids": [1], "reward": "x"}\n')
    target = tmp_path / "out.jsonl"
    target.write_bytes(b"old\n")
    link = tmp_path / "link.jsonl"
    link.symlink_to("out.jsonl")
    r = run_tcli(["advantages", bad, "-o", link])
    assert r.returncode == 65
    assert link.is_symlink() and target.read_bytes() == b"old\n"
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("cmd, suffix, mode", [("build-tree", ".jsonl", 0o640),
                                                ("advantages", ".arrow", 0o604),
                                                ("verify", ".jsonl", 0o600)])
def test_replaced_file_keeps_its_mode(cmd, suffix, mode, src, tmp_path):
    out = tmp_path / f"out{suffix}"
    out.write_bytes(b"old\n")
    os.chmod(out, mode)
    r = run_tcli([*COMMANDS[cmd], src, "-o", out], preexec_fn=lambda: os.umask(0o022))
    assert r.returncode == 0, r.stderr
    assert stat.S_IMODE(out.stat().st_mode) == mode
    assert len(list(RecordReader(str(out)))) == 3


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_new_file_gets_the_umask_mode(umask, mode, src, tmp_path):
    out = tmp_path / "new.jsonl"
    r = run_tcli(["advantages", src, "-o", out], preexec_fn=lambda: os.umask(umask))
    assert r.returncode == 0, r.stderr
    assert stat.S_IMODE(out.stat().st_mode) == mode


def test_directory_as_output_is_a_usage_error(src, tmp_path):
    r = run_tcli(["build-tree", src, "-o", tmp_path])
    assert r.returncode == 2
    assert b"is a directory" in r.stderr and b"Traceback" not in r.stderr


def test_unwritable_directory_is_one_line(src, tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root may write anywhere")
    d = tmp_path / "ro"
    d.mkdir()
    os.chmod(d, 0o500)
    r = run_tcli(["build-tree", src, "-o", d / "out.jsonl"])
    assert r.returncode == 1
    assert r.stderr.decode().strip().startswith("tcli: error: cannot write")


# ----------------------------------------------------------------------------- library

def test_write_atomic_bytes_follows_links_and_keeps_mode(tmp_path, dev_null_guard):
    target = tmp_path / "metrics.jsonl"
    target.write_bytes(b"old\n")
    os.chmod(target, 0o640)
    link = tmp_path / "m"
    link.symlink_to("metrics.jsonl")
    write_atomic_bytes(str(link), b"new\n")
    assert link.is_symlink() and target.read_bytes() == b"new\n"
    assert stat.S_IMODE(target.stat().st_mode) == 0o640
    write_atomic_bytes("/dev/null", b"discarded\n")
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)
    assert leftovers(tmp_path) == []


def test_write_atomic_bytes_failure_leaves_nothing(tmp_path, monkeypatch):
    target = tmp_path / "state.json"
    target.write_bytes(b"old")

    def boom(*a):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", boom)
    with pytest.raises(OSError):
        write_atomic_bytes(str(target), b"new")
    assert target.read_bytes() == b"old" and os.listdir(tmp_path) == ["state.json"]


def test_writer_to_fifo_that_closes_early_is_a_broken_pipe(tmp_path):
    """A reader that goes away ends the writer as a closed stdout would (no 'cannot write')."""
    fifo = tmp_path / "p"
    os.mkfifo(fifo)

    def open_and_leave():  # reading would wait for bytes the writer sends only after the join
        with open(fifo, "rb"):
            pass

    t = threading.Thread(target=open_and_leave, daemon=True)
    t.start()
    with pytest.raises(BrokenPipeError):
        with RecordWriter(str(fifo)) as w:
            t.join(timeout=30)
            for _ in range(2000):
                w.write({"prompt_id": "x", "token_ids": list(range(500))})


def test_writer_errors(tmp_path):
    with pytest.raises(UsageError):
        RecordWriter(str(tmp_path / "missing" / "out.jsonl"))
    with pytest.raises(UsageError):
        RecordWriter(str(tmp_path))
    loop = tmp_path / "loop"
    loop.symlink_to("loop")
    with pytest.raises(UsageError):
        RecordWriter(str(loop))
    full = scratch_device(tmp_path, "full", 7)
    with pytest.raises(TcliError) as e:
        with RecordWriter(full) as w:
            w.write({"prompt_id": 1})
    assert f"cannot write {full}: No space left on device" in str(e.value)
    assert stat.S_ISCHR(os.stat(full).st_mode)


# ----------------------------------------------------------------------------- compression

def _compressed(kind: str, data: bytes) -> bytes:
    """``data`` compressed as ``kind`` (zstd and lz4: their magic bytes, which is all tcli reads)."""
    import bz2
    import gzip
    import io
    import lzma
    import zipfile

    if kind == "zip":
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as z:
            z.writestr("in.jsonl", data)
        return buf.getvalue()
    return {"gzip": gzip.compress, "bzip2": bz2.compress, "xz": lzma.compress,
            "zstd": lambda d: b"\x28\xb5\x2f\xfd" + d, "lz4": lambda d: b"\x04\x22\x4d\x18" + d,
            }[kind](data)


DECOMPRESS = {"gzip": "zcat", "bzip2": "bzcat", "xz": "xzcat", "zip": "unzip -p", "zstd": "zstdcat",
              "lz4": "lz4cat"}


@pytest.mark.parametrize("kind", sorted(DECOMPRESS))
@pytest.mark.parametrize("cmd", ["verify", "build-tree"])
def test_compressed_input_file_is_named_bad_data(tmp_path, kind, cmd):
    """A compressed file is refused as such (exit 65), with the file, the format and how to
    decompress it, not with a UTF-8 error about its first byte."""
    p = tmp_path / f"in.jsonl.{kind}"
    p.write_bytes(_compressed(kind, jsonl(rollouts())))
    r = run_tcli([*COMMANDS[cmd], p])
    line = failed(r, 65, f"{p}: {kind}-compressed input", "decompress it first",
                  f"{DECOMPRESS[kind]} {p} | tcli {cmd}")
    assert "UTF-8" not in line and r.stdout == b""


@pytest.mark.parametrize("forced", ["jsonl", "arrow", "parquet"])
def test_compressed_input_on_stdin_is_named_bad_data_whatever_the_format(forced):
    r = run_tcli(["build-tree", "--input-format", forced],
                 input=_compressed("gzip", jsonl(rollouts())))
    failed(r, 65, "<stdin>: gzip-compressed input", "| zcat | tcli build-tree")


def test_compressed_prompt_file_is_named_bad_data(tmp_path, tiny):
    data = tmp_path / "prompts.jsonl.xz"
    data.write_bytes(_compressed("xz", b'{"prompt_id": "a", "prompt": "1+1=", "answer": "2"}\n'))
    r = run_tcli(["sample-tree", data, "-m", tiny, "--max-new-tokens", "2", "-q"])
    failed(r, 65, f"{data}: xz-compressed input", "xzcat")


@pytest.mark.parametrize("name", ["out.jsonl.gz", "out.jsonl.GZ", "out.arrow.zst", "out.bz2",
                                  "out.xz", "out.zip", "out.jsonl.lz4"])
@pytest.mark.parametrize("cmd", ["verify", "build-tree"])
def test_output_named_as_compressed_is_refused_before_reading(tmp_path, name, cmd):
    """Uncompressed JSONL under a .gz name would mislead every reader: exit 2 before the input is
    read (a bad input is not even looked at) and nothing appears."""
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b"not json\n")
    r = run_tcli([*COMMANDS[cmd], bad, "-o", tmp_path / name])
    failed(r, 2, str(tmp_path / name), "uncompressed", f"(e.g. tcli {cmd} ... | ")
    assert sorted(os.listdir(tmp_path)) == ["bad.jsonl"]


def test_output_named_as_compressed_is_refused_with_explicit_format(tmp_path, src):
    for fmt in ("jsonl", "arrow"):
        with pytest.raises(UsageError, match="uncompressed records, not gzip"):
            RecordWriter(str(tmp_path / "x.arrow.gz"), fmt)
    assert sorted(os.listdir(tmp_path)) == ["in.jsonl"]
    ok = tmp_path / "gz.jsonl"  # only the suffix counts
    assert run_tcli(["build-tree", src, "-o", ok]).returncode == 0 and ok.stat().st_size > 0


@pytest.mark.parametrize("cmd", ["sample-tree", "eval"])
def test_sampling_commands_refuse_a_compressed_output_name_before_the_model(tmp_path, cmd):
    """sample-tree and eval refuse the name before anything slow: the model (here none at all)
    is never looked at, the prompts are not read and nothing appears."""
    prompts = tmp_path / "p.jsonl"
    prompts.write_bytes(b'{"id": "a", "prompt": "1+1=", "answer": "2"}\n')
    args = [prompts] if cmd == "sample-tree" else ["--data", prompts]
    r = run_tcli([cmd, *args, "--model", tmp_path / "no-model", "-o", tmp_path / "s.jsonl.gz"])
    failed(r, 2, str(tmp_path / "s.jsonl.gz"), "uncompressed")
    assert sorted(os.listdir(tmp_path)) == ["p.jsonl"]
