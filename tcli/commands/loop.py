"""`tcli loop` (every LoopConfig key is also a flag) and `tcli plot`."""

from __future__ import annotations

import inspect
from dataclasses import fields
from typing import Annotated, List, Optional

import typer

from tcli.config import LoopConfig

_HELP = {
    "model": "Start checkpoint (HF causal LM directory).",
    "train_data": "Prompt records to train on (JSONL, the ../shared/data format).",
    "eval_data": "Held-out prompt records for evaluation.",
    "run_dir": "Run directory (checkpoints/, rollouts/, metrics.jsonl, metrics.png).",
    "estimator": "Advantage estimator: grpo | dr_grpo | rloo | tempo | treerpo.",
    "mode": "Sampling: independent | tree.",
    "filter_groups": "Dynamic sampling: drop groups whose rewards are all equal.",
    "max_wall_seconds": "Stop after this much wall time (0 = off).",
    "max_sampled_tokens": "Stop after sampling this many tokens (0 = off).",
}


def _loop_impl(config: Optional[str], resume: Optional[str], quiet: bool, **overrides) -> None:
    from rich.console import Console

    from tcli.config import load_config
    from tcli.loop import resume_config, run_loop

    console = Console(stderr=True)
    log = (lambda s: None) if quiet else (lambda s: console.print(s, highlight=False))
    if resume:
        cfg = resume_config(resume, overrides)
    else:
        cfg = load_config(config, overrides)
    result = run_loop(cfg, resume=bool(resume), log=log)
    if not quiet:
        console.print(f"run directory: {cfg.run_dir}  best eval accuracy: {result['best_accuracy']:.3f}")


def _build_loop_command():
    params = [
        inspect.Parameter("config", inspect.Parameter.KEYWORD_ONLY, default=None,
                          annotation=Annotated[Optional[str], typer.Option("--config", "-c",
                                              help="TOML file with loop settings (flags override it).")]),
        inspect.Parameter("resume", inspect.Parameter.KEYWORD_ONLY, default=None,
                          annotation=Annotated[Optional[str], typer.Option("--resume",
                                              help="Continue RUN_DIR from its last complete step.")]),
        inspect.Parameter("quiet", inspect.Parameter.KEYWORD_ONLY, default=False,
                          annotation=Annotated[bool, typer.Option("--quiet", "-q", help="No logs on stderr.")]),
    ]
    for f in fields(LoopConfig):
        default = getattr(LoopConfig(), f.name)
        typ = type(default) if default is not None else bool
        flag = "--" + f.name.replace("_", "-")
        decl = (f"{flag}/--no-{f.name.replace('_', '-')}",) if typ is bool else (flag,)
        help_ = _HELP.get(f.name, f"Config key `{f.name}` (default {default!r}).")
        params.append(inspect.Parameter(
            f.name, inspect.Parameter.KEYWORD_ONLY, default=None,
            annotation=Annotated[Optional[typ], typer.Option(*decl, help=help_, show_default=False)]))

    def loop(**kw):
        """Train in one process: sample -> verify -> build-tree -> advantages -> train-step, with
        periodic eval, checkpoints, metrics.jsonl and metrics.png; --resume continues a run."""
        config, resume, quiet = kw.pop("config"), kw.pop("resume"), kw.pop("quiet")
        _loop_impl(config, resume, quiet, **kw)

    loop.__signature__ = inspect.Signature(params)
    return loop


def plot(
    run_dirs: Annotated[List[str], typer.Argument(help="Run directories to draw (one line each).")],
    output: Annotated[str, typer.Option("-o", "--output", help="PNG path.")] = "metrics.png",
    seed: Annotated[int, typer.Option("--seed", help="Unused; accepted for uniformity.")] = 0,
) -> None:
    """Plot reward and eval accuracy vs step and vs wall time for one or more runs."""
    import os

    from tcli.errors import UsageError
    from tcli.plot import plot_runs

    for d in run_dirs:
        if not os.path.exists(os.path.join(d, "metrics.jsonl")):
            raise UsageError(f"{d} is not a run directory (no metrics.jsonl)")
    plot_runs(run_dirs, output)


def register(app: typer.Typer) -> None:
    app.command("loop")(_build_loop_command())
    app.command("plot")(plot)
