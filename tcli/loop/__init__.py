"""`tcli loop`: the training loop in one process (``loop``) and its run directory (``rundir``)."""

from tcli.loop.loop import Loop, run_loop, resume_config, step_prompts  # noqa: F401
from tcli.loop.rundir import RunDir  # noqa: F401
