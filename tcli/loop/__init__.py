"""`tcli loop`: the training loop (``loop``), what a step is (``steps``), its rounds with refill
(``refill``), its run directory (``rundir``) and what torchrun's ranks add (``ranks``)."""

from tcli.config.loop import resume_config  # noqa: F401
from tcli.loop.loop import Loop, run_loop  # noqa: F401
from tcli.loop.rundir import RunDir  # noqa: F401
from tcli.loop.steps import step_prompts  # noqa: F401
