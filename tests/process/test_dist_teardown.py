"""The process group that :func:`tcli.train.dist.distributed` opens is gone when it closes: no
gloo thread outlives it. A thread left behind takes the GIL while the interpreter finalises and
can abort a rank that finished its work ("terminate called without an active exception"), so a
torchrun command would fail at random after doing everything right. DDP is what used to keep
the group alive (it imports torch.distributed.nn, whose defaults hold the world group)."""

from __future__ import annotations

import json

from conftest import run_torchrun

SCRIPT = '''
import json, os, sys

import torch

from tcli.train.dist import distributed


def threads():
    names = []
    for t in os.listdir("/proc/self/task"):
        try:
            names.append(open(f"/proc/self/task/{t}/comm").read().strip())
        except OSError:  # a thread that ended meanwhile
            pass
    return names


with distributed("cpu") as info:
    model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(4, 4))
    model(torch.randn(2, 4)).sum().backward()
    during = threads()
    del model
with open(os.path.join(sys.argv[1], f"rank{info.rank}.json"), "w") as f:  # one file each: two
    json.dump({"rank": info.rank, "during": during, "after": threads()}, f)  # ranks' prints mix
'''


def _gloo(names):
    return sorted(n for n in names if "gloo" in n)


def test_no_gloo_thread_outlives_the_process_group(tmp_path):
    script = tmp_path / "teardown.py"
    script.write_text(SCRIPT)
    r = run_torchrun([str(script), str(tmp_path)], nproc=2, timeout=300)
    assert r.returncode == 0, r.stderr.decode()[-2000:]
    rows = [json.loads((tmp_path / f"rank{k}.json").read_text()) for k in (0, 1)]
    assert sorted(row["rank"] for row in rows) == [0, 1]
    for row in rows:
        assert _gloo(row["during"]), row  # the check sees gloo's threads while they exist
        assert _gloo(row["after"]) == [], row
