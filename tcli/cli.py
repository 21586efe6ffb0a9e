"""The `tcli` command: option parsing and error reporting only; stages live in the library.

Each subcommand is a module in ``tcli/commands`` with a ``register(app)`` function. Command modules
import heavy libraries (torch, transformers, vllm) inside the command body, so ``tcli --help`` and
the CPU stages start fast.
"""

from __future__ import annotations

import os
import signal
import sys

import typer

from tcli.models.versions import version_line
from tcli.commands.repeated import repeated_option
from tcli.commands.report import failure, one_line, report, stdout_closed
from tcli.errors import EXIT_DATA, EXIT_USAGE, DataError

app = typer.Typer(
    name="tcli",
    help="RL with verifiable rewards and tree-structured credit assignment, as Unix tools.\n\n"
         "\b\n  tcli sample-tree | tcli verify | tcli build-tree | tcli advantages | tcli train-step\n"
         "  tcli eval     accuracy / pass@k on a benchmark\n"
         "  tcli loop     the whole loop in one process, with checkpoints and resume",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)

COMMAND_MODULES = ("streams", "verify", "sample", "expand", "train", "eval", "loop", "init_model",
                   "import_gguf", "critic", "merge_lora")


_registered = False


def _register_commands() -> None:
    global _registered
    import importlib

    if not _registered:
        _registered = True
        for name in COMMAND_MODULES:
            importlib.import_module(f"tcli.commands.{name}").register(app)


class Interrupted(BaseException):
    """SIGINT or SIGTERM, raised in the main thread so that cleanup (temporary files, worker
    processes) runs; a BaseException of our own, so no library turns it into success."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.exit_code = 128 + signum
        self.what = "interrupted" if signum == signal.SIGINT else "terminated"


def _on_signal(signum, frame) -> None:
    raise Interrupted(signum)


@app.callback(invoke_without_command=True)
def _root(version: bool = typer.Option(False, "--version", help="Print the version and exit.")):
    if version:
        typer.echo(version_line())
        raise typer.Exit(0)


def _run(argv: list[str]) -> int:
    """Run the command; control-flow exits (help, usage, interrupts) become exit codes."""
    try:  # typer >= 0.20 vendors click
        from typer._click import exceptions as click_exc
    except ImportError:  # pragma: no cover
        from click import exceptions as click_exc

    group = typer.main.get_command(app)  # built once: parsing and the checks share it
    try:
        repeated = repeated_option(group, argv)  # before any command body runs
        if repeated:
            raise click_exc.UsageError(repeated)
        rv = group.main(args=argv, prog_name="tcli", standalone_mode=False)
        if rv == 130:  # typer turns a KeyboardInterrupt raised by user code into a return value
            report("interrupted")
        return rv if isinstance(rv, int) else 0
    except typer.Exit as e:
        return e.exit_code
    except SystemExit as e:
        # click answers EPIPE (`| head` closed stdout) by wrapping the streams and exiting 1
        if type(sys.stdout).__name__.endswith("PacifyFlushWrapper"):
            stdout_closed()
            return 0
        return 0 if e.code is None else e.code if isinstance(e.code, int) else 1
    except (typer.Abort, KeyboardInterrupt):
        report("interrupted")
        return 130
    except Interrupted as e:
        report(e.what)
        return e.exit_code
    except click_exc.ClickException as e:
        if isinstance(e, getattr(click_exc, "NoArgsIsHelpError", ())):
            e.show()  # `tcli` alone: the help text is the answer
        else:
            cmd = next((a for a in argv if not a.startswith("-")), "")
            known = cmd in group.commands  # an unknown one has no help
            report(f"{one_line(e.format_message())} (see 'tcli {cmd + ' ' if known else ''}-h')")
        return EXIT_USAGE


def main(argv: list[str] | None = None) -> None:
    """Entry point: maps errors to exit codes (65 bad data, 2 usage, 1 runtime, 130/143
    interrupted) with one line on stderr."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("TCLI_DEBUG") == "1"
    argv = [a for a in argv if a != "--debug"]
    if sys.stdout is None:  # started with stdout closed (`>&-`): say so once, write nothing
        report("standard output is closed; redirect it or use -o FILE")
        sys.exit(EXIT_USAGE)
    previous = {sig: signal.signal(sig, _on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    _register_commands()
    try:
        code = _run(argv)
    except Exception as e:  # noqa: BLE001 - every failure is one line and an exit code
        code = failure(e, debug)
    finally:  # in-process callers (tests, notebooks) get their own handlers back
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        stdout_closed()
    sys.exit(code)


__all__ = ["app", "main", "DataError", "EXIT_DATA"]
