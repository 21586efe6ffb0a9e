"""TensorBoard event files, through PyTorch's writer (``--tensorboard DIR``, or ``trackers =
["tensorboard"]``: RUN_DIR/trackers/tensorboard)."""

from __future__ import annotations

import json
import os

from tcli.trackers.base import TRACKERS, Tracker


@TRACKERS.register("tensorboard")
class TensorBoardTracker(Tracker):
    """Every number of a metrics record becomes the scalar ``kind/field`` at its step."""

    name = "tensorboard"
    package = "tensorboard"

    def start(self, config: dict, commit: str | None, first_step: int) -> None:
        from torch.utils.tensorboard import SummaryWriter

        log_dir = self.where or os.path.join(self.dir, "tensorboard")
        new = not (os.path.isdir(log_dir) and os.listdir(log_dir))
        # a resumed loop repeats the steps after its last checkpoint: hide their old events
        self.writer = SummaryWriter(log_dir=log_dir,
                                    purge_step=first_step if first_step > 1 else None)
        if new:
            self.writer.add_text("config", "    " + json.dumps(config, indent=2)
                                 .replace("\n", "\n    "), 0)
            self.writer.add_text("git_commit", str(commit), 0)

    def log(self, metrics: dict[str, float], step: int) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def finish(self, ok: bool = True) -> None:
        self.writer.close()
