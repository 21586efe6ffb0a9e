"""bench/bench_gpu.py runs on a CPU with tiny shapes (the graph rows and targets skipped), so the
script the GPU check runs is known to work before a GPU sees it."""

from __future__ import annotations

import re

from conftest import REPO, run_python


def test_bench_gpu_runs_small_on_cpu():
    r = run_python("import runpy, sys; sys.argv = ['bench_gpu.py', '--device', 'cpu', '--small'];"
                   f" runpy.run_path({str(REPO / 'bench' / 'bench_gpu.py')!r}, run_name='__main__')",
                   fresh=True, timeout=120)
    out = r.stdout.decode()
    assert r.returncode == 0, r.stderr.decode()[-2000:]
    for row in ("decode small batch 4: eager", "per leaf: independent", "train-step: per-sequence",
                "entropy tree per leaf: eager ", "loop step, demo.toml micro-batch tokens: ",
                "loop step grpo: ", "loop step tempo-entropy-expand: ",
                "loop step per sampled token, tempo-entropy-expand / grpo: x"):
        assert row in out, out
    assert "target" not in out and "graphed" not in out
    assert re.search(r"loop step, demo.toml micro-batch tokens: [0-9.]+ s \(sample [0-9.]+, "
                     r"verify [0-9.]+", out), out
