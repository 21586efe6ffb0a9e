"""`tcli verify`: add reward and verdict to every rollout (the stage is tcli.stages.verify)."""

from __future__ import annotations

import typer

from tcli.commands.common import (FormatOpt, InputArg, InputFormatOpt, OutputOpt, QuietOpt,
                                  input_total, progress_enabled, run_records, stderr_console)
from tcli.config.flags import options_command
from tcli.config.stages import VerifyOptions


@options_command
def verify(
    input: InputArg = "-",
    *,
    output: OutputOpt = "-",
    opts: VerifyOptions,
    format: FormatOpt = None,
    input_format: InputFormatOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Score each response against its record's answer: adds `reward` (1.0/0.0) and `verdict`
    (what was parsed, whether it was correct, and why not), in input order; with several -t,
    `reward` is their weighted sum and `rewards`/`verdicts` hold each one's. Fields computed from
    earlier rewards (advantages, returns, build-tree's values) are dropped, with one warning. A
    verifier that crashes fails the command (exit 1, no output file) unless
    --max-verifier-errors allows it."""
    from tcli.stages.verify import verify_records
    from tcli.verifiers.weighted import verdicts_of

    stats = {"n": 0, "reward": 0.0, "timeout": 0, "crashed": 0, "no_answer": 0}
    by_task: dict[str, float] = {}  # each task's own summed reward (several, or weighted)
    lines = None
    if not quiet and not progress_enabled(quiet):  # a log, not a terminal: plain lines
        from tcli.progress import LineProgress

        jsonl = input_format in (None, "auto", "jsonl")
        lines = LineProgress("verify", input_total(input) if jsonl else None, unit="records")

    def stage(records, name):
        for rec in verify_records(records, name, task=opts.task, timeout=opts.timeout,
                                  workers=opts.workers, weights=opts.weights,
                                  max_verifier_errors=opts.max_verifier_errors):
            stats["n"] += 1
            stats["reward"] += rec["reward"]
            for task, r in (rec.get("rewards") or {}).items():
                by_task[task] = by_task.get(task, 0.0) + r
            for v in verdicts_of(rec).values():  # several tasks: every verifier's answer
                stats["timeout"] += v.get("error") == "timeout"
                stats["crashed"] += v.get("crashed") is True
                stats["no_answer"] += v.get("reason") == "no answer found"
            if lines is not None:
                lines.advance()
            yield rec

    run_records(input, output, format, input_format, stage)
    if lines is not None:
        lines.note = f"mean reward {stats['reward'] / max(stats['n'], 1):.4f}"
        lines.finish()
    if progress_enabled(quiet):
        n = stats["n"]
        each = ", ".join(f"{t} {r / max(n, 1):.4f}" for t, r in by_task.items())
        stderr_console(quiet).print(
            f"verified {n} records: mean reward {stats['reward'] / max(n, 1):.4f}"
            f"{f' ({each})' if each else ''}, no answer {stats['no_answer']}, timeouts "
            f"{stats['timeout']}, verifier crashes {stats['crashed']}")


def register(app: typer.Typer) -> None:
    app.command("verify")(verify)
