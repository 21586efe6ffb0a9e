"""Same inputs + same seed = same bytes, across processes.

Two separate Python processes (different PYTHONHASHSEED) run the same tcli commands: sample-tree
in independent and tree mode, to JSONL and to Arrow, and two chained train-steps (the second
resumes the first one's optimizer state). Rollout files must be byte-identical and checkpoints
must hold identical tensors and optimizer state; another seed must change what sample-tree draws.
Each process runs all its commands through ``tcli.cli.main`` so torch is imported once per process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import orjson
import pytest

from conftest import REPO, jsonl, prompts

torch = pytest.importorskip("torch")

RUNNER = r"""
import json, sys
import tcli.cli as cli
cli._register_commands()
cli._register_commands = lambda: None   # main() would register the commands again per call
for argv in json.loads(sys.argv[1]):
    try:
        cli.main(argv)
    except SystemExit as e:
        if e.code:
            sys.exit(f"tcli {' '.join(argv)} exited {e.code}")
"""

SAMPLE = {
    "ind": ["--mode", "independent", "--n", "3", "--max-new-tokens", "12", "--temperature", "1.0"],
    "tree": ["--mode", "tree", "--width", "2", "--depth", "3", "--segment-tokens", "3",
             "--max-new-tokens", "10", "--top-p", "0.9"],
}


def commands(d: Path, tiny: str, data: Path, adv: Path) -> list[list[str]]:
    cmds = []
    for mode, args in SAMPLE.items():
        for fmt in ("jsonl", "arrow"):
            cmds.append(["sample-tree", str(data), "-m", tiny, *args, "--seed", "7",
                         "-o", str(d / f"{mode}.{fmt}")])
        cmds.append(["sample-tree", str(data), "-m", tiny, *args, "--seed", "8",
                     "-o", str(d / f"{mode}.seed8.jsonl")])
    train = ["--lr", "1e-3", "--mini-batches", "2", "--micro-batch-tokens", "64", "--seed", "3",
             "--device", "cpu"]
    cmds.append(["train-step", str(adv), "-m", tiny, *train, "-o", str(d / "ck1")])
    cmds.append(["train-step", str(adv), "-m", str(d / "ck1"), *train, "-o", str(d / "ck2")])
    return cmds


def advantaged_rollouts(n: int = 10) -> list[dict]:
    """Fixed rollouts with non-zero advantages (so a step really moves weights and Adam state)."""
    rng = np.random.default_rng(0)
    recs = []
    for i in range(n):
        t = int(rng.integers(2, 9))
        recs.append({"schema": "tcli.rollout/1", "prompt_id": i // 5, "sample_id": i % 5,
                     "prompt_token_ids": rng.integers(3, 90, size=int(rng.integers(2, 7))).tolist(),
                     "token_ids": rng.integers(3, 90, size=t).tolist(),
                     "logprobs": (-4.6 + 0.3 * rng.standard_normal(t)).clip(max=-0.1).tolist(),
                     "advantages": [1.0 if i % 2 else -1.0] * t})
    return recs


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny):
    """Run the command list in two separate processes; returns their output directories."""
    root = tmp_path_factory.mktemp("det")
    data = root / "prompts.jsonl"
    data.write_bytes(jsonl(prompts()))
    adv = root / "adv.jsonl"
    adv.write_bytes(jsonl(advantaged_rollouts()))
    procs, dirs = [], []
    for name, hashseed in (("a", "1"), ("b", "2")):
        d = root / name
        d.mkdir()
        env = dict(os.environ, PYTHONHASHSEED=hashseed, PYTHONPATH=str(REPO))
        env.pop("TCLI_DEBUG", None)
        procs.append(subprocess.Popen(
            [sys.executable, "-c", RUNNER, json.dumps(commands(d, tiny, data, adv))], cwd=REPO,
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE))
        dirs.append(d)
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err.decode()[-2000:]
    return dirs[0], dirs[1], tiny


@pytest.mark.parametrize("name", ["ind.jsonl", "ind.arrow", "tree.jsonl", "tree.arrow"])
def test_rollouts_are_byte_identical(runs, name):
    a, b, _ = runs
    da, db = (a / name).read_bytes(), (b / name).read_bytes()
    assert da == db
    from tcli.io import RecordReader

    recs = [r for _, r in RecordReader(str(a / name))]
    mode = name.split(".")[0]
    assert len(recs) >= 3 * len(prompts()) if mode == "ind" else len(recs) > len(prompts())
    assert all(r["token_ids"] and len(r["logprobs"]) == len(r["token_ids"]) for r in recs)
    if mode == "tree":
        assert all(r["node_path"] for r in recs)
    # the Arrow file holds the very records of the JSONL file
    if name.endswith(".arrow"):
        assert recs == [orjson.loads(line) for line in (a / f"{mode}.jsonl").read_bytes().splitlines()]


@pytest.mark.parametrize("mode", ["ind", "tree"])
def test_another_seed_changes_the_samples(runs, mode):
    a, b, _ = runs
    seven = [orjson.loads(x)["token_ids"] for x in (a / f"{mode}.jsonl").read_bytes().splitlines()]
    eight = [orjson.loads(x)["token_ids"] for x in (a / f"{mode}.seed8.jsonl").read_bytes().splitlines()]
    assert seven != eight
    assert (a / f"{mode}.seed8.jsonl").read_bytes() == (b / f"{mode}.seed8.jsonl").read_bytes()


def _same(x, y, path="") -> None:
    """Recursive equality with exact tensor comparison."""
    if isinstance(x, torch.Tensor):
        assert isinstance(y, torch.Tensor) and x.dtype == y.dtype and x.shape == y.shape, path
        assert torch.equal(x, y), f"tensor {path} differs"
    elif isinstance(x, dict):
        assert isinstance(y, dict) and x.keys() == y.keys(), path
        for k in x:
            _same(x[k], y[k], f"{path}/{k}")
    elif isinstance(x, (list, tuple)):
        assert type(x) is type(y) and len(x) == len(y), path
        for i, (u, v) in enumerate(zip(x, y)):
            _same(u, v, f"{path}[{i}]")
    else:
        assert x == y, f"{path}: {x!r} != {y!r}"


@pytest.mark.parametrize("ck", ["ck1", "ck2"])
def test_checkpoints_are_identical(runs, ck):
    from safetensors.torch import load_file

    a, b, tiny = runs
    wa, wb = load_file(str(a / ck / "model.safetensors")), load_file(str(b / ck / "model.safetensors"))
    _same(wa, wb, "weights")
    oa = torch.load(a / ck / "optimizer.pt", weights_only=True)
    ob = torch.load(b / ck / "optimizer.pt", weights_only=True)
    _same(oa, ob, "optimizer")
    sa = orjson.loads((a / ck / "tcli_state.json").read_bytes())
    sb = orjson.loads((b / ck / "tcli_state.json").read_bytes())
    assert sa.pop("parent") != sb.pop("parent") or ck == "ck1"  # the only path recorded
    assert sa == sb
    # not trivially equal: the step moved the weights and filled Adam's moments
    w0 = load_file(os.path.join(tiny, "model.safetensors"))
    assert any(not torch.equal(wa[k], w0[k]) for k in w0)
    assert oa["state"] and any(float(s["exp_avg"].abs().sum()) > 0 for s in oa["state"].values())
    assert sa["optimizer_steps"] == (2 if ck == "ck1" else 4)
