"""Peak host memory per rank of an FSDP2 load: every rank reading the whole model, then sharding
(the path before), vs rank 0 alone reading it and the others receiving their shards
(``tcli.train.parallel.shard_from_rank0``).

    python bench/bench_fsdp_load.py --model runs/demo-real/model --repeat 2

Each run is ``torchrun --nproc-per-node 2`` (gloo, one thread) of this file as the worker, which
loads the policy the way the Trainer does and reports its peak RSS (``ru_maxrss``) and its RSS
before loading (after building the model once on the meta device, so that importing the model's
code, ~100 MB, is not counted as weights); the two modes are interleaved. The target line: a
rank > 0's load adds less than the model's own size (it holds its shard and one tensor in flight,
never a whole model).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)


def _mb(kb: float) -> float:
    return kb / 1024.0


def _rss_kb() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024


def worker(model_dir: str, mode: str, out_dir: str) -> None:
    """Load and shard the policy (mode: every | rank0), write this rank's memory as JSON."""
    import torch
    import torch.distributed as dist
    from tcli.models.load import load_model
    from tcli.train import parallel

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    del_me = load_model(model_dir, train=True, meta=True)  # imports the model's code
    model_mb = sum(p.numel() for p in del_me.parameters()) * 4 / 2**20
    del del_me
    before = _rss_kb()
    cpu = torch.device("cpu")
    if mode == "every":
        model = parallel.shard_model(load_model(model_dir, train=True), cpu)
    else:
        model = load_model(model_dir, train=True, meta=rank != 0)
        parallel.shard_from_rank0(model, cpu)
    dist.barrier()
    shard_mb = parallel.local_numel(model) * 4 / 2**20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump({"rank": rank, "mode": mode, "before_mb": _mb(before), "peak_mb": _mb(peak),
                   "after_mb": _mb(_rss_kb()), "shard_mb": shard_mb, "model_mb": model_mb}, f)
    dist.destroy_process_group()


def launch(model_dir: str, mode: str, nproc: int) -> list[dict]:
    import tempfile

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with tempfile.TemporaryDirectory(prefix="bench-fsdp-load-") as out:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
               str(nproc), os.path.abspath(__file__), "--worker", mode, "--model", model_dir,
               "--out", out]
        r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env, timeout=1800)
        if r.returncode:
            sys.exit(f"torchrun failed:\n{r.stderr[-3000:]}")
        return [json.load(open(os.path.join(out, f"rank{i}.json"))) for i in range(nproc)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=os.path.join(REPO, "runs/demo-real/model"))
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--worker", choices=("every", "rank0"), help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        return worker(a.model, a.worker, a.out)
    added: dict = {"every": [], "rank0": []}
    for i in range(a.repeat):
        for mode in ("every", "rank0"):
            for row in launch(a.model, mode, a.nproc):
                grow = row["peak_mb"] - row["before_mb"]
                print(f"run {i} {mode:5s} rank {row['rank']}: RSS before load "
                      f"{row['before_mb']:.0f} MB, peak {row['peak_mb']:.0f} MB (+{grow:.0f}), "
                      f"after {row['after_mb']:.0f} MB, shard {row['shard_mb']:.0f} MB")
                if row["rank"] > 0:
                    added[mode].append(grow)
    model_mb = row["model_mb"]
    worst = max(added["rank0"])
    print(f"rank>0 peak RSS added by the load: every rank loading {min(added['every']):.0f}-"
          f"{max(added['every']):.0f} MB, rank 0 only {min(added['rank0']):.0f}-{worst:.0f} MB "
          f"(ratio {worst / min(added['every']):.2f}); model {model_mb:.0f} MB")
    verdict = "PASS" if worst < model_mb else "FAIL"
    print(f"target rank>0 load adds less than one model ({model_mb:.0f} MB): {worst:.0f} MB "
          f"{verdict}")


if __name__ == "__main__":
    main()
