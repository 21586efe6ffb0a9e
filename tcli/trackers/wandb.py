"""Weights & Biases (``pip install 'tcli[wandb]'``). Its files live in RUN_DIR/trackers/wandb;
with ``WANDB_MODE=offline`` nothing goes over the network and ``wandb sync`` uploads them later.
The run id is kept in the run directory, so ``--resume`` continues the same W&B run."""

from __future__ import annotations

import os
import secrets

from tcli.errors import TcliError
from tcli.trackers.base import TRACKERS, Tracker


@TRACKERS.register("wandb")
class WandbTracker(Tracker):
    name = "wandb"
    package = "wandb"

    def start(self, config: dict, commit: str | None, first_step: int) -> None:
        import wandb

        run_id = self.stored_id()
        new = run_id is None
        if new:  # stored before the run opens: a kill during step 1 resumes this same run
            run_id = secrets.token_hex(6)  # W&B ids: lower-case letters and digits
            self.store_id(run_id)
        os.makedirs(self.dir, exist_ok=True)
        try:
            self.run = wandb.init(
                project=os.environ.get("WANDB_PROJECT") or "tcli", id=run_id, resume="allow",
                name=os.path.basename(os.path.abspath(self.run_dir)), dir=self.dir,
                config={**config, "git_commit": commit} if new else None,
                settings=wandb.Settings(console="off", silent=True))
        except Exception as e:  # noqa: BLE001 - no credentials, no network: one line, exit 1
            raise TcliError(f"wandb: {e} (WANDB_MODE=offline keeps the run local)") from None

    def log(self, metrics: dict[str, float], step: int) -> None:
        if step < self.run.step:  # logged before the kill; a resumed run repeats it exactly
            return
        self.run.log(metrics, step=step)

    def finish(self, ok: bool = True) -> None:
        import wandb

        self.run.finish(exit_code=0 if ok else 1)
        wandb.teardown()  # its service process and threads end with the run
