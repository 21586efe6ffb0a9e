"""`tcli loop` (every setting a flag, generated from tcli.config) and `tcli plot`."""

from __future__ import annotations

import inspect
import os
from contextlib import contextmanager
from typing import Annotated, List, Optional

import typer

from tcli.config.flags import typer_parameter
from tcli.config.loop import loop_flags
from tcli.config.spec import settings_of

_OWN = [
    ("config", Annotated[Optional[str], typer.Option("--config", "-c", help="TOML file: top-level "
     "run settings and [sample], [verify], [advantages], [train], [eval] tables (flags override "
     "it).")]),
    ("resume", Annotated[Optional[str], typer.Option("--resume", help="Continue RUN_DIR from its "
     "last complete step (its config.toml; flags override it); a run with no complete "
     "checkpoint starts again from step 1.")]),
    ("overwrite", Annotated[Optional[bool], typer.Option("--overwrite", help="Start a new run in "
     "a run_dir that holds a previous tcli run, removing what that run wrote (refused when the "
     "directory holds anything else).")]),
    ("quiet", Annotated[Optional[bool], typer.Option("--quiet", "-q", help="No logs on stderr.")]),
]


def loop(**kw) -> None:
    """Train: sample -> verify -> advantages -> train-step, with periodic eval, checkpoints,
    metrics.jsonl and metrics.png; --resume continues a run. Under `torchrun --nproc-per-node N`
    every rank samples its share of the prompts and trains with DDP (or FSDP: --parallel fsdp);
    rank 0 writes the run directory."""
    from tcli.train.dist import distributed

    config, resume, quiet = kw.pop("config"), kw.pop("resume"), kw.pop("quiet")
    overwrite = bool(kw.pop("overwrite"))
    if config and resume:
        raise typer.BadParameter("give --config or --resume, not both")
    if overwrite and resume:
        raise typer.BadParameter("give --overwrite (a new run) or --resume (the same run), "
                                 "not both")
    cfg = _load(config, resume, kw)  # under torchrun every rank reads the same files and flags
    with distributed(cfg.train.device) as info:
        try:
            _run(cfg, bool(resume), overwrite, quiet or not info.is_main, info)
        except Exception as e:
            if not getattr(e, "tcli_agreed", False):
                raise
            raise typer.Exit(_report_once(e, info)) from None


def _report_once(e: Exception, info) -> int:
    """An error every rank raised together: rank 0 prints its one line, then all ranks leave
    together (torchrun stops the others as soon as one exits, which could cut rank 0 short)."""
    import torch.distributed as dist

    from tcli.commands.report import failure

    code = failure(e, os.environ.get("TCLI_DEBUG") == "1") if info.is_main else \
        int(getattr(e, "exit_code", 1))
    dist.barrier()
    return code


def _load(config, resume, kw):
    from tcli.config.loop import load_config
    from tcli.loop import resume_config

    return resume_config(resume, kw) if resume else load_config(config, kw)


def _run(cfg, resume: bool, overwrite: bool, quiet: bool, info) -> None:
    from tcli.loop import run_loop

    from tcli.config.loop import changed_on_resume

    with _reporting(cfg.run.steps, quiet) as (log, on_step):
        changed = changed_on_resume(cfg) if resume else []
        if changed:
            log("resuming with, for this invocation only: " + ", ".join(changed)
                + " (recorded in resumes.jsonl)")
        result = run_loop(cfg, resume=resume, log=log, on_step=on_step, dist=info,
                          overwrite=overwrite)
    best = result["best_accuracy"]  # -1 when nothing was evaluated
    log(f"run directory: {cfg.run.run_dir}  " + (f"best eval accuracy: {best:.3f}" if best >= 0
                                                 else "no evaluation"))


@contextmanager
def _reporting(steps: int, quiet: bool):
    """(log, on_step): one line per step on stderr, and a live progress bar on a terminal."""
    from rich.console import Console

    console = Console(stderr=True)
    if quiet:
        yield (lambda s: None), None
        return
    if not console.is_terminal:  # a log: the step lines, and k/N with ETA at a bounded rate
        from tcli.progress import LineProgress

        print_ = lambda s: console.print(s, highlight=False, markup=False, soft_wrap=True)  # noqa: E731
        lines = LineProgress("loop", steps, unit="steps", write=print_)

        def on_plain_step(records: list[dict]) -> None:
            if not lines.done:  # a resumed run starts past step 1
                lines.done = lines.start = records[0]["step"] - 1
            ev = next((m for m in records if m["kind"] == "eval"), None)
            note = f"last eval acc {ev['accuracy']:.3f} (step {ev['step']})" if ev else None
            lines.advance(1, note=note)

        yield print_, on_plain_step
        lines.finish()
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    bar = Progress(TextColumn("loop"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   TextColumn("{task.fields[status]}"), console=console, transient=True)
    task = bar.add_task("loop", total=steps, status="")

    def on_step(records: list[dict]) -> None:
        m = records[0]
        bar.update(task, completed=m["step"], status=f"reward {m['reward_mean']:.3f}")

    with bar:
        yield (lambda s: bar.console.print(s, highlight=False, markup=False)), on_step


def _loop_signature() -> inspect.Signature:
    params = [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=a)
              for n, a in _OWN]
    for lf in loop_flags():
        f = next(f for f in settings_of(lf.cls) if f.name == lf.name)
        params.append(typer_parameter(lf.cls, f, overrides=True, flag=lf.flag))
    return inspect.Signature(params)


loop.__signature__ = _loop_signature()


def plot(
    run_dirs: Annotated[List[str], typer.Argument(help="Run directories to draw (one line each).")],
    output: Annotated[str, typer.Option("-o", "--output", help="Figure path: .png, .pdf or "
                      ".svg (default: metrics.png in the current directory; each run directory "
                      "already holds its own).")] = "metrics.png",
) -> None:
    """Plot reward and eval accuracy vs step and vs wall time for one or more runs."""
    import os
    import sys

    from tcli.errors import DataError, UsageError
    from tcli.plot import FORMATS, plot_runs

    ext = os.path.splitext(output)[1].lower()
    if ext not in FORMATS:
        raise UsageError(f"-o/--output {output}: give a .png, .pdf or .svg file")
    parent = os.path.dirname(os.path.abspath(output))
    if not os.path.isdir(parent):
        raise UsageError(f"output directory does not exist: {parent}")
    for d in run_dirs:
        if not os.path.exists(os.path.join(d, "metrics.jsonl")):
            raise UsageError(f"{d} is not a run directory (no metrics.jsonl)")
    def warn(line: str) -> None:
        print(f"tcli: warning: {line}", file=sys.stderr)

    if not plot_runs(run_dirs, output, warn=warn):
        raise DataError(f"nothing to plot: no train reward_mean or eval accuracy with a step in "
                        f"{', '.join(os.path.join(d, 'metrics.jsonl') for d in run_dirs)}")
    print(f"plot: {os.path.abspath(output)}", file=sys.stderr)


def register(app: typer.Typer) -> None:
    app.command("loop")(loop)
    app.command("plot")(plot)
