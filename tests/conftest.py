"""Shared test helpers: run the real `tcli` command in a subprocess from the repository root."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# Real data lives beside the checkout (CI: <clone>/../shared/data); /work/shared/data in dev sessions.
DATA = REPO.parent / "shared" / "data"
if not DATA.is_dir():
    DATA = Path("/work/shared/data")
if str(REPO) not in sys.path:  # the package is used from the checkout, not installed
    sys.path.insert(0, str(REPO))


def run_tcli(args, input: bytes | None = None, timeout: float = 120, env: dict | None = None,
             **kwargs) -> subprocess.CompletedProcess:
    """``python -m tcli *args`` with cwd = repo root; stdin gets ``input`` (or /dev/null), output
    is captured as bytes. Returns the CompletedProcess (check ``returncode`` yourself)."""
    full_env = dict(os.environ)
    full_env.pop("TCLI_DEBUG", None)
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "tcli", *map(str, args)], cwd=REPO,
                          input=input, stdin=None if input is not None else subprocess.DEVNULL,
                          capture_output=True, timeout=timeout, env=full_env, **kwargs)


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
