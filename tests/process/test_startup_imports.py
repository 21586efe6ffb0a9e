"""What a command imports at start-up, in a fresh interpreter: the CPU-only paths (help texts,
the stream stages, verify) never import torch, transformers or vllm, and neither do the training
modules until a model is used."""

from __future__ import annotations

import subprocess
import sys

import orjson
import pytest

from conftest import HEAVY, REPO, imported_modules, jsonl, oracle_records


@pytest.mark.parametrize("args", [["--help"], ["advantages", "--help"], ["build-tree"], ["advantages"]])
def test_cpu_stages_do_not_import_torch(args):
    src = jsonl(oracle_records())
    r = subprocess.run([sys.executable, "-X", "importtime", "-m", "tcli", *args], cwd=REPO,
                       input=src, capture_output=True, timeout=60)
    assert r.returncode == 0, r.stderr[-500:]
    mods = imported_modules(r.stderr)
    assert "tcli" in mods
    if args[-1] != "--help":
        assert "numpy" in mods  # the stage really ran
    assert not mods & set(HEAVY), sorted(mods & set(HEAVY))


@pytest.mark.parametrize("args", [["sample-tree", "--help"], ["loop", "--help"],
                                  ["expand-tree", "--help"], ["verify", "--task", "arith"]])
def test_cpu_only_paths_do_not_import_torch(args):
    src = b'{"text": "#### 4", "answer": "4"}\n'
    r = subprocess.run([sys.executable, "-X", "importtime", "-m", "tcli", *args], cwd=REPO,
                       input=src, capture_output=True, timeout=60)
    assert r.returncode == 0, r.stderr[-500:]
    if args[0] == "verify":
        assert orjson.loads(r.stdout)["reward"] == 1.0
    else:
        assert b"--threads" in r.stdout
    assert not imported_modules(r.stderr) & set(HEAVY)


def test_train_modules_do_not_import_torch():
    code = ("import sys, tcli.commands.train, tcli.train.trainer, tcli.train.samples, "
            "tcli.models.load, tcli.models.checkpoint, tcli.sft; "
            "print(sorted(m for m in ('torch', 'transformers', 'safetensors') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, timeout=60)
    assert r.returncode == 0, r.stderr.decode()
    assert r.stdout.strip() == b"[]"


def test_version_names_the_libraries_without_importing_them():
    """``tcli --version`` is what a bug report quotes: tcli, python, torch and transformers."""
    r = subprocess.run([sys.executable, "-X", "importtime", "-m", "tcli", "--version"], cwd=REPO,
                       capture_output=True, timeout=60)
    assert r.returncode == 0, r.stderr[-500:]
    line = r.stdout.decode().strip()
    assert line.startswith("tcli ") and " torch " in line and " transformers " in line, line
    assert sys.version.split()[0] in line
    assert not imported_modules(r.stderr) & set(HEAVY)
