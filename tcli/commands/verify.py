"""`tcli verify`: add reward and verdict to every rollout (options only; the stage is tcli.stages.verify)."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from tcli.commands.common import (FormatOpt, InputArg, InputFormatOpt, OutputOpt, QuietOpt,
                                  SeedOpt, progress_enabled, run_records, stderr_console)

TASK_HELP = ("Verifier: auto (per record: choices -> choice; GSM8K/GSM-Hard source -> gsm8k; "
             "tcli-arith -> arith; else math) | math | gsm8k | choice | arith | "
             "python:module:function.")


def verify(
    input: InputArg = "-",
    output: OutputOpt = "-",
    task: Annotated[str, typer.Option("--task", "-t", help=TASK_HELP)] = "auto",
    timeout: Annotated[float, typer.Option("--timeout", help="Hard limit per record in seconds: "
                       "a verifier still running is killed and the record scores 0 with "
                       "verdict.error = 'timeout'.")] = 5.0,
    workers: Annotated[Optional[int], typer.Option("--workers", "-j", help="Verifier processes "
                       "(default: all cores). 0 = in this process, no timeout (for debugging).")
                       ] = None,
    format: FormatOpt = None,
    input_format: InputFormatOpt = None,
    seed: SeedOpt = 0,
    quiet: QuietOpt = False,
) -> None:
    """Score each response against its record's answer: adds `reward` (1.0/0.0) and `verdict`
    (what was parsed, whether it was correct, and why not), in input order."""
    from tcli.errors import UsageError
    from tcli.verifiers import check_task
    from tcli.stages.verify import verify_records

    check_task(task)  # exit 2 with the valid names before reading any input
    if not timeout > 0:
        raise UsageError(f"--timeout must be > 0, got {timeout}")
    if workers is not None and workers < 0:
        raise UsageError(f"--workers must be >= 0, got {workers}")
    stats = {"n": 0, "reward": 0.0, "timeout": 0, "error": 0, "no_answer": 0}

    def stage(records, name):
        for rec in verify_records(records, name, task=task, timeout=timeout, workers=workers):
            v = rec["verdict"]
            stats["n"] += 1
            stats["reward"] += rec["reward"]
            err = v.get("error")
            stats["timeout"] += err == "timeout"
            stats["error"] += bool(err) and err != "timeout"
            stats["no_answer"] += v.get("reason") == "no answer found"
            yield rec

    run_records(input, output, format, input_format, stage)
    if progress_enabled(quiet):
        n = stats["n"]
        mean = stats["reward"] / n if n else 0.0
        stderr_console(quiet).print(
            f"verified {n} records: mean reward {mean:.4f}, no answer {stats['no_answer']}, "
            f"timeouts {stats['timeout']}, errors {stats['error']}")


def register(app: typer.Typer) -> None:
    app.command("verify")(verify)
