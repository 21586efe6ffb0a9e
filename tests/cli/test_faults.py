"""Faults: kill -9 in the middle of writing, a full disk, and hostile pickles.

- A checkpoint being written by ``save_pretrained_atomic`` and a record file being written by
  ``tcli advantages -o`` are killed with SIGKILL at random moments: the target is then the old
  complete one or the new complete one (never a mix, never partial); leftovers are named
  ``*.tmp-*`` and the loop never takes them for checkpoints.
- A full disk (a real 1.6 MB tmpfs when this runs as root, else a writer patched to raise
  ENOSPC) gives one clear line, exit 1, and leaves the previous checkpoint / output file intact.
- Optimizer state is loaded with weights_only=True: a pickle that runs code is refused by
  ``tcli train-step`` and ``tcli loop --resume`` before it can run.
"""

from __future__ import annotations

import contextlib
import errno
import os
import pickle
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from unittest import mock

import orjson
import pytest

from conftest import REPO, cli, jsonl, one_error_line, prompts, rollouts

torch = pytest.importorskip("torch")


# ----------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def trio(tiny):
    """(model, tokenizer, AdamW with state) for direct save_pretrained_atomic calls."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tcli.models.quiet import quiet_transformers

    quiet_transformers()
    model = AutoModelForCausalLM.from_pretrained(tiny)
    tok = AutoTokenizer.from_pretrained(tiny)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(input_ids=torch.tensor([[3, 4, 5]])).logits.sum().backward()
    opt.step()
    return model, tok, opt


def mark(model, opt, version: int) -> None:
    """Stamp a version into the weights and the optimizer state (to spot mixed checkpoints)."""
    with torch.no_grad():
        model.model.norm.weight.fill_(float(version))
    for st in opt.state.values():
        st["exp_avg"].fill_(float(version))


def save(target, trio, version: int) -> None:
    from tcli.models.checkpoint import save_pretrained_atomic

    model, tok, opt = trio
    mark(model, opt, version)
    save_pretrained_atomic(str(target), model, tok, state={"version": version}, optimizer=opt)


def loaded_version(ckpt: Path) -> int:
    """The version of a complete checkpoint; AssertionError if any part disagrees or is missing."""
    from safetensors.torch import load_file

    from tcli.models.checkpoint import read_state

    v = read_state(str(ckpt))["version"]
    w = load_file(str(ckpt / "model.safetensors"))["model.norm.weight"]
    assert torch.all(w == v), f"weights of another version in {ckpt} (state says {v})"
    sd = torch.load(ckpt / "optimizer.pt", weights_only=True)
    assert sd["state"] and all(torch.all(s["exp_avg"] == v) for s in sd["state"].values())
    assert orjson.loads((ckpt / "config.json").read_bytes())["model_type"] == "qwen3"
    assert orjson.loads((ckpt / "tokenizer.json").read_bytes())["model"]
    return v


# ----------------------------------------------------------------------------- kill -9

@pytest.mark.parametrize("swap", ["exchange", "two renames"])
def test_kill_during_checkpoint_write(trio, tmp_path, swap):
    """A child process saves versions 1, 2, 3, ... over the same directory in a loop and is
    SIGKILLed after a random delay, 30 times. After every kill the directory is a complete
    checkpoint of one version, never older than the last one seen; the fallback without
    renameat2 ("two renames", other systems) may also leave it absent for a moment."""
    from tcli.loop import RunDir

    run = tmp_path / "run"
    target = run / "checkpoints" / "step_3"
    save(target, trio, 1)
    last, rng, absent, leftovers = 1, random.Random(0), 0, set()
    for trial in range(30):
        pid = os.fork()
        if pid == 0:  # child: write forever, never returns into pytest
            try:
                patch = mock.patch("tcli.models.checkpoint._exchange", return_value=False) \
                    if swap == "two renames" else contextlib.nullcontext()
                with patch:
                    v = (trial + 1) * 1000
                    while True:
                        v += 1
                        save(target, trio, v)
            finally:
                os._exit(0)
        time.sleep(rng.uniform(0.0, 0.3))  # a save takes 20-200 ms here, more on a busy machine
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        if not target.exists():
            assert swap == "two renames", "the checkpoint vanished although it was swapped in place"
            absent += 1
            continue
        v = loaded_version(target)
        assert v >= last
        last = v
        names = os.listdir(target.parent)
        assert all(n == "step_3" or n.startswith(("step_3.tmp-", "step_3.old-")) for n in names), names
        assert RunDir(str(run)).complete_steps() == [3]  # leftovers are never taken for steps
        leftovers.update(n for n in names if n != "step_3")
    # the kills really landed at random points: after complete saves and in the middle of writes
    assert last > 1000 and len(leftovers) >= 10, (last, len(leftovers))


def test_kill_while_writing_records(tmp_path):
    """`tcli advantages -o` killed at random moments: the output file is absent, the previous
    complete file or the new complete file (JSONL and Arrow)."""
    sys.path.insert(0, str(REPO / "bench"))
    from bench_memory import generate

    src = tmp_path / "in.jsonl"
    with open(src, "wb") as f:
        generate(6000, out=f)
    rng = random.Random(1)
    for suffix in (".jsonl", ".arrow"):
        out = tmp_path / f"out{suffix}"
        expected = {}
        for est in ("grpo", "tempo"):
            r = cli(["advantages", src, "-e", est, "-o", out])
            assert r.code == 0, r.err
            expected[est] = out.read_bytes()
        assert expected["grpo"] != expected["tempo"]
        for trial in range(3):
            est = ("grpo", "tempo")[trial % 2]
            p = subprocess.Popen([sys.executable, "-m", "tcli", "advantages", str(src), "-e", est,
                                  "-o", str(out)], cwd=REPO, stderr=subprocess.DEVNULL)
            time.sleep(rng.uniform(0.2, 0.8))
            p.send_signal(signal.SIGKILL)
            p.wait()
            assert out.read_bytes() in expected.values()
        names = set(os.listdir(tmp_path)) - {"in.jsonl"}
        assert {n for n in names if ".tmp-" not in n} <= {"out.jsonl", "out.arrow"}, names


# ----------------------------------------------------------------------------- disk full

@pytest.fixture
def small_fs(tmp_path):
    """mount(size_kb) -> a fresh tmpfs of that size (skips unless root and mount works)."""
    mounted = []

    def mount(size_kb: int) -> Path:
        if os.geteuid() != 0 or not shutil.which("mount"):
            pytest.skip("a real full disk needs root to mount a tmpfs")
        mnt = tmp_path / f"fs{len(mounted)}"
        mnt.mkdir()
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", str(mnt)],
                           capture_output=True)
        if r.returncode:
            pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip()}")
        mounted.append(mnt)
        return mnt

    yield mount
    for mnt in mounted:
        if subprocess.run(["umount", str(mnt)], capture_output=True).returncode:
            subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_disk_full_checkpoint_real(trio, small_fs, tiny, tmp_path):
    """1.6 MB tmpfs: one checkpoint (~1 MB) fits, a second copy does not."""
    from tcli.errors import TcliError

    mnt = small_fs(1600)
    target = mnt / "ckpt"
    save(target, trio, 1)
    with pytest.raises(TcliError, match="no space left on device; the previous checkpoint is unchanged"):
        save(target, trio, 2)
    assert loaded_version(target) == 1
    assert os.listdir(mnt) == ["ckpt"]  # the partial temporary directory is gone

    src = tmp_path / "adv.jsonl"
    src.write_bytes(jsonl(rollouts()))
    r = cli(["train-step", src, "-m", tiny, "-o", target])
    assert r.code == 1
    msg = one_error_line(r.err)
    assert f"cannot write checkpoint {target}: no space left on device" in msg
    assert r.out == b""
    assert loaded_version(target) == 1 and os.listdir(mnt) == ["ckpt"]


def test_disk_full_checkpoint_patched(trio, tmp_path):
    """Without root: the optimizer writer raises ENOSPC half-way."""
    from tcli.errors import TcliError

    target = tmp_path / "ckpt"
    save(target, trio, 1)
    real_save = torch.save

    def full(obj, f, *a, **kw):
        f.write(b"x" * 100)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with mock.patch.object(torch, "save", full):
        with pytest.raises(TcliError, match="no space left on device"):
            save(target, trio, 2)
    assert torch.save is real_save
    assert loaded_version(target) == 1
    assert os.listdir(tmp_path) == ["ckpt"]
    with pytest.raises(PermissionError):  # other write errors are not called a full disk
        with mock.patch.object(torch, "save", side_effect=PermissionError(errno.EACCES, "denied")):
            save(target, trio, 3)
    assert loaded_version(target) == 1


@pytest.mark.parametrize("cmd", ["build-tree", "advantages"])
@pytest.mark.parametrize("suffix", [".jsonl", ".arrow"])
def test_disk_full_record_output_real(cmd, suffix, small_fs, tmp_path):
    sys.path.insert(0, str(REPO / "bench"))
    from bench_memory import generate

    mnt = small_fs(64)
    src = tmp_path / "in.jsonl"
    with open(src, "wb") as f:
        generate(2000, out=f)  # ~0.7 MB of output: does not fit
    out = mnt / f"out{suffix}"
    out.write_bytes(b"previous result\n")
    r = cli([cmd, src, "-o", out])
    assert r.code == 1
    msg = one_error_line(r.err)
    assert f"cannot write {out}: No space left on device" in msg
    assert out.read_bytes() == b"previous result\n"
    assert os.listdir(mnt) == [out.name]


@pytest.mark.parametrize("where", ["write", "commit"])
def test_disk_full_record_output_patched(where, tmp_path):
    """Without root: the sink fails while writing or on the final flush (commit)."""
    src = tmp_path / "in.jsonl"
    src.write_bytes(jsonl(rollouts()))
    out = tmp_path / "out.jsonl"
    out.write_bytes(b"previous result\n")
    target = "tcli.io.write.JsonlSink." + ("write" if where == "write" else "close")
    with mock.patch(target, side_effect=OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))):
        r = cli(["advantages", src, "-o", out])
    assert r.code == 1
    line = one_error_line(r.err)
    assert f"cannot write {out}: No space left on device; nothing was written" in line
    assert out.read_bytes() == b"previous result\n"
    assert sorted(os.listdir(tmp_path)) == ["in.jsonl", "out.jsonl"]


# ----------------------------------------------------------------------------- hostile pickles

class _Payload:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _evil_checkpoint(tiny: str, where: Path, marker: Path) -> Path:
    shutil.copytree(tiny, where)
    torch.save({"state": {}, "param_groups": [], "x": _Payload(str(marker))}, where / "optimizer.pt")
    return where


def test_train_step_refuses_malicious_optimizer_state(tiny, tmp_path):
    marker = tmp_path / "pwned"
    evil = _evil_checkpoint(tiny, tmp_path / "evil", marker)
    src = tmp_path / "adv.jsonl"
    src.write_bytes(jsonl(rollouts()))
    r = cli(["train-step", src, "-m", evil, "-o", tmp_path / "new"])
    assert r.code == 1, r.err
    assert "refusing to load optimizer state" in one_error_line(r.err)
    assert not marker.exists() and not (tmp_path / "new").exists()
    # a plain (non-zip) pickle as well
    (evil / "optimizer.pt").write_bytes(pickle.dumps(_Payload(str(marker)), protocol=2))
    r = cli(["train-step", src, "-m", evil, "-o", tmp_path / "new"])
    assert r.code == 1 and "optimizer" in one_error_line(r.err)
    assert not marker.exists()


def test_loop_resume_refuses_malicious_optimizer_state(tiny, tmp_path):
    """The last complete step of a run directory carries a hostile optimizer.pt."""
    from tcli.config.loop import LoopConfig, LoopEvalOptions, RunOptions, dump_toml
    from tcli.config.stages import VerifyOptions

    marker = tmp_path / "pwned"
    run = tmp_path / "run"
    data = tmp_path / "train.jsonl"
    data.write_bytes(jsonl(prompts()))
    (run / "checkpoints").mkdir(parents=True)
    cfg = LoopConfig(run=RunOptions(model=tiny, train_data=str(data), run_dir=str(run), steps=2),
                     verify=VerifyOptions(task="arith"), eval=LoopEvalOptions(every=0))
    (run / "config.toml").write_text(dump_toml(cfg))
    step1 = _evil_checkpoint(tiny, run / "checkpoints" / "step_1", marker)
    (step1 / "tcli_state.json").write_bytes(orjson.dumps({"step": 1, "policy_version": 1}))
    r = cli(["loop", "--resume", run, "--quiet"])
    assert r.code == 1, r.err
    assert "refusing to load optimizer state" in one_error_line(r.err)
    assert not marker.exists()
    assert not (run / "checkpoints" / "step_2").exists()


def test_pickled_weights_are_refused(tiny, tmp_path):
    """Weights as a pickle (pytorch_model.bin) that would run code: transformers loads it with
    weights_only=True, so the code never runs."""
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil"
    shutil.copytree(tiny, evil)
    os.unlink(evil / "model.safetensors")
    torch.save({"model.embed_tokens.weight": torch.zeros(3), "x": _Payload(str(marker))},
               evil / "pytorch_model.bin")
    src = tmp_path / "p.jsonl"
    src.write_bytes(jsonl(prompts()))
    r = cli(["sample-tree", src, "-m", evil, "-o", tmp_path / "out.jsonl"])
    assert r.code == 65 and "Weights only load failed" in r.err and "Traceback" not in r.err
    assert not marker.exists() and not (tmp_path / "out.jsonl").exists()


def test_pickled_weights_error_is_one_line(tiny, tmp_path):
    evil = tmp_path / "evil"
    shutil.copytree(tiny, evil)
    os.unlink(evil / "model.safetensors")
    torch.save({"x": _Payload(str(tmp_path / "pwned"))}, evil / "pytorch_model.bin")
    src = tmp_path / "p.jsonl"
    src.write_bytes(jsonl(prompts()))
    r = cli(["sample-tree", src, "-m", evil, "-o", tmp_path / "out.jsonl"])
    one_error_line(r.err)
