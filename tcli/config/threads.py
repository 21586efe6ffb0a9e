"""CPU threads of the stages that run a model, declared once (sample-tree, eval, train-step, loop)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from tcli.config.spec import Options, at_least, setting


def _cores() -> int:
    """$OMP_NUM_THREADS when set to a positive integer (torchrun sets it per rank), else the cores
    this process may run on."""
    import os

    env = os.environ.get("OMP_NUM_THREADS", "")
    if env.strip().isdigit() and int(env) > 0:
        return int(env)
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        return max(1, os.cpu_count() or 1)


@dataclass(frozen=True)
class ThreadOptions(Options):
    """CPU threads of the stages that run a model (sample-tree, eval, train-step, loop)."""

    threads: Optional[int] = setting(None, "Torch CPU threads (intra-op, and inter-op where torch "
                                     "still allows it), set before the model runs. Default: "
                                     "$OMP_NUM_THREADS when set, else the cores this process may "
                                     "run on. On a busy machine fewer are often faster (2 shared "
                                     "cores: 1 thread was up to 10x faster than 2).",
                                     check=at_least(1))

    def apply(self) -> int:
        """Set torch's thread counts; return the number used."""
        import torch

        n = self.threads or _cores()
        torch.set_num_threads(n)
        try:
            torch.set_num_interop_threads(n)
        except RuntimeError:  # legal only before the first inter-op work: keep what torch has
            pass
        return n
