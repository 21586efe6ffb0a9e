"""`tcli eval`: accuracy / pass@k of a checkpoint on a prompt file or a shipped benchmark."""

from __future__ import annotations

import os
import stat
from typing import Annotated, Optional

import typer

from tcli.commands.common import (ModelOpt, QuietOpt, SeedOpt, checkpoint_sampling,
                                  group_progress, refuse_same_file, stderr_console)
from tcli.config.flags import Without, options_command
from tcli.config.stages import EvalOptions, PromptOptions, SampleOptions, VerifyOptions
from tcli.config.threads import ThreadOptions
from tcli.errors import TcliError, UsageError

# eval draws independent samples; n and temperature are EvalOptions' (greedy by default)
EvalSampling = Annotated[SampleOptions, Without("mode", "width", "depth", "segment_tokens", "n",
                                                "temperature", "min_new_tokens", "branch",
                                                "branch_entropy", "min_segment_tokens")]


def _check_target(path: str | None, flag: str) -> None:
    """A missing output directory is a usage error before any work (nothing written)."""
    if path and path != "-":
        d = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(d):
            raise UsageError(f"{flag}: directory does not exist: {d}")


def _check_distinct(data: str, output: str | None, summary: str | None) -> None:
    """The data file, the samples and the summary are three files: writing one over another
    loses it (the benchmark file replaced by samples, or the summary by the samples)."""
    from tcli.io import resolve_data

    path = resolve_data(data)
    refuse_same_file("-o/--output", output, "the --data file", path)
    refuse_same_file("--summary", summary, "the --data file", path)
    refuse_same_file("--summary", summary, "the -o/--output file", output)


def _check_fail_under(value: float | None) -> None:
    """Accuracy is a fraction: a percentage (50) would fail every run, after all its work."""
    if value is not None and not 0.0 <= value <= 1.0:
        raise UsageError(f"--fail-under is a fraction of the prompts, between 0 and 1 (for 50 %: "
                         f"--fail-under 0.5), got {value:g}")


def _is_stdout(path: str | None) -> bool:
    """``-`` or a name of the file or pipe on stdout (``/dev/stdout``); a terminal or
    ``/dev/null`` mixes nothing that a reader would parse."""
    if path in (None, "-"):
        return path == "-"
    try:
        st, out = os.stat(path), os.fstat(1)
    except OSError:
        return False
    return os.path.samestat(st, out) and (stat.S_ISREG(out.st_mode) or stat.S_ISFIFO(out.st_mode))


def _check_streams(output: str | None, summary: str | None) -> None:
    """Samples and summary on one stdout would be one stream that neither reader can parse."""
    if _is_stdout(output) and (summary is None or _is_stdout(summary)):
        raise UsageError(f"-o {output} writes the samples to stdout, where the summary goes by "
                         "default: give --summary FILE (or -o FILE)")


def _list_benchmarks(value: bool) -> None:
    """Eager: print the shipped benchmarks and exit before --model/--data are required."""
    if value:
        from tcli.io.benchmarks import benchmark_table

        typer.echo(benchmark_table(), nl=False)
        raise typer.Exit(0)


@options_command
def eval_cmd(
    *,
    model: ModelOpt,
    data: Annotated[str, typer.Option(
        "--data", "-d", metavar="<str>", help="Prompt records (JSONL/Arrow): id, prompt, answer, "
        "optional choices; or a shipped benchmark name (--list-benchmarks). An existing file or "
        "saved dataset wins over a name. One per eval.")],
    output: Annotated[Optional[str], typer.Option("-o", "--output", help="Write per-sample "
                      "records (with reward and verdict) here; - (stdout) needs --summary FILE.")
                      ] = None,
    summary: Annotated[Optional[str], typer.Option("--summary", help="Write the summary JSON here "
                       "(default: one JSON line on stdout).")] = None,
    ev: EvalOptions,
    sample: EvalSampling,
    verify: VerifyOptions,
    fields: PromptOptions,
    threads: ThreadOptions,
    fail_under: Annotated[Optional[float], typer.Option(help="Exit 1 when accuracy is below "
                          "this fraction, 0-1 (0.5 = 50 %).")] = None,
    seed: SeedOpt = 0,
    quiet: QuietOpt = False,
    list_benchmarks: Annotated[bool, typer.Option(
        "--list-benchmarks", is_eager=True, callback=_list_benchmarks, expose_value=False,
        help="Print the shipped benchmarks (name, rows, size, task) and exit.")] = False,
) -> None:
    """Sample (greedy by default), verify and report accuracy, pass@k, length and a 95% bootstrap CI."""
    import orjson

    from tcli.engines import open_engine
    from tcli.io import RecordWriter, output_format, write_atomic_bytes
    from tcli.prompts import read_prompts
    from tcli.stages.evaluate import eval_sampling, evaluate

    _check_fail_under(fail_under)
    _check_streams(output, summary)
    _check_target(output, "-o/--output")
    _check_target(summary, "--summary")
    _check_distinct(data, output, summary)
    output_format(output or "-", None)  # a name the samples' format would belie: before any work
    origin: dict = {}  # where each prompt was read: errors found while sampling name it
    prompts = read_prompts(data, ev.limit, fields, origin)
    sample = checkpoint_sampling(sample, model, quiet)
    threads.apply()
    engine = open_engine(model, eval_sampling(sample, ev), seed=seed)  # vllm: its logprobs_mode
    with group_progress("eval", quiet, total=len(prompts)) as on_group:
        records, summ = evaluate(engine, prompts, sample, verify, ev, seed=seed, on_group=on_group,
                                 origin=origin)
    summ = {"model": model, "data": data, "n": ev.n, "temperature": ev.temperature, **summ}
    blob = orjson.dumps(summ, option=orjson.OPT_INDENT_2 if summary else 0)
    if summary:
        write_atomic_bytes(summary, blob + b"\n")
    if output:
        with RecordWriter(output) as w:
            w.write_all(records)
    if not summary:
        typer.echo(blob.decode())
    _print_summary(summ, ev.ks, quiet)
    if fail_under is not None and summ["accuracy"] < fail_under:
        raise TcliError(f"accuracy {summ['accuracy']:.4f} is below --fail-under {fail_under}")


def _print_summary(summ: dict, ks: list[int], quiet: bool) -> None:
    console = stderr_console(quiet)
    if console is None:
        return
    lo, hi = summ.get("accuracy_ci95", [float("nan")] * 2)
    line = f"accuracy {summ['accuracy']:.3f} [{lo:.3f}, {hi:.3f}] on {summ['prompts']} prompts"
    line += "".join(f"  pass@{k} {summ[f'pass@{k}']:.3f}" for k in ks if f"pass@{k}" in summ)
    console.print(line, highlight=False)


def register(app: typer.Typer) -> None:
    app.command("eval")(eval_cmd)
