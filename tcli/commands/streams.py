"""CPU-only stream stages: build-tree, advantages, show-tree (no torch, no transformers)."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from tcli.commands.common import (FormatOpt, InputArg, InputFormatOpt, OutputOpt, QuietOpt,
                                  located, run_groups, stderr_console)
from tcli.config.flags import options_command
from tcli.config.stages import AdvantageOptions
from tcli.errors import DataError, UsageError


def build_tree(
    input: InputArg = "-",
    output: OutputOpt = "-",
    format: FormatOpt = None,
    input_format: InputFormatOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Add P2T prefix-tree values V(s_t) and branch flags to every rollout (per prompt group)."""
    from tcli.stages.tree import build_tree_group

    run_groups(input, output, format, input_format, build_tree_group)


@options_command
def advantages(
    input: InputArg = "-",
    *,
    output: OutputOpt = "-",
    opts: AdvantageOptions,
    stats: Annotated[bool, typer.Option("--stats", help="Print a summary on stderr: zero-variance "
                                        "groups, branching tokens, mean |A|.")] = False,
    format: FormatOpt = None,
    input_format: InputFormatOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Add per-token advantages with a registered estimator (docs/design.md §4). Stored
    `values` from build-tree must match the records' tokens and rewards (exit 65 when stale)."""
    from tcli.stages.advantages import AdvantageStats, batch_wide, stage_end, stage_group

    opts.check_read()
    acc = AdvantageStats(branch=stats)
    held: list[dict] = []  # whitening needs every token before the first record is written
    hold = batch_wide(opts)

    def one(recs: list[dict]) -> list[dict]:
        out = stage_group(recs, opts, acc).records
        if not hold:
            return out
        held.extend(out)
        return []

    run_groups(input, output, format, input_format, one, lambda: stage_end(held, opts, acc))
    if stats:
        (stderr_console(quiet) or stderr_console(False)).print(acc.render(opts.estimator))


def _decoder(tokenizer: str | None, as_bytes: bool, rec: dict):
    """Bytes, the given tokenizer, else the tokenizer of the model that sampled the records
    (their ``model`` field) when that directory still exists; None prints token ids. A token id
    the tokenizer does not have is bad data: decoding would drop it and show other text."""
    import os

    if as_bytes:
        return lambda ids: bytes(i for i in ids if i < 256).decode("utf-8", "replace")
    model = rec.get("model")
    if not tokenizer and isinstance(model, str) and os.path.isdir(model):
        tokenizer = model
    if not tokenizer:
        return None
    from tcli.models.load import load_tokenizer

    tok = load_tokenizer(tokenizer, required=True)
    size = len(tok)

    def decode(ids) -> str:
        top = max(ids, default=-1)
        if top >= size:
            raise DataError(f"token id {top} is outside the vocabulary of {tokenizer} (size "
                            f"{size}); give --tokenizer the sampler's directory, or --bytes",
                            field="token_ids")
        return tok.decode(ids)
    return decode


def _check_tokenizer(tokenizer: str | None, as_bytes: bool, lines, recs, source: str) -> None:
    """--tokenizer of another vocabulary than the model that sampled the records would show
    other text as if it were theirs: refused, as train-step refuses such records."""
    if tokenizer and not as_bytes:
        from tcli.models.provenance import SampledBy

        for _ in SampledBy(tokenizer, "--tokenizer").watch(zip(lines, recs), source):
            pass


def show_tree(
    input: InputArg = "-",
    group: Annotated[Optional[str], typer.Option("--group", "-g", help="prompt_id to show "
                     "(default: the first group).")] = None,
    index: Annotated[int, typer.Option("--index", min=0, help="Show the N-th group (0-based) "
                     "when --group is not given.")] = 0,
    tokenizer: Annotated[Optional[str], typer.Option(help="Model/tokenizer directory to decode "
                         "tokens (default: the records' `model` directory when it exists; "
                         "else token ids are shown).")] = None,
    as_bytes: Annotated[bool, typer.Option("--bytes", help="Decode token ids as UTF-8 bytes "
                        "(for byte-level fixtures).")] = False,
    max_run: Annotated[int, typer.Option(min=1, help="Show at most this many tokens of a run of "
                       "non-branching tokens (head and tail).")] = 24,
    max_levels: Annotated[Optional[int], typer.Option(min=1, help="Node levels shown below the "
                          "root (default: what the terminal width fits).")] = None,
    input_format: InputFormatOpt = None,
) -> None:
    """Render one group's prefix tree: branch points, V at nodes, rewards at leaves, TEMPO's delta."""
    from rich.console import Console

    from tcli.io import RecordReader, iter_groups
    from tcli.show import render_group

    reader = RecordReader(input, input_format)
    i = -1
    for i, (lines, recs) in enumerate(iter_groups(reader, reader.name)):
        if (str(recs[0]["prompt_id"]) == group) if group is not None else i == index:
            _check_tokenizer(tokenizer, as_bytes, lines, recs, reader.name)
            try:
                rendered = render_group(recs, decode=_decoder(tokenizer, as_bytes, recs[0]),
                                        max_run=max_run, max_levels=max_levels)
            except DataError as e:
                raise located(e, reader.name, lines) from None
            console = Console()
            if isinstance(recs[0].get("prompt"), str):
                console.print("prompt:", repr(recs[0]["prompt"]), highlight=False)
            console.print(rendered)
            return
    if i < 0:
        raise UsageError(f"{reader.name} holds no records: no group to show")
    held = f"{reader.name} holds {i + 1} group{'s' if i else ''}"
    raise UsageError(f"group {group!r} not found ({held})" if group is not None else
                     f"no group #{index} ({held}, numbered from 0)")


def register(app: typer.Typer) -> None:
    app.command("build-tree")(build_tree)
    app.command("advantages")(advantages)
    app.command("show-tree")(show_tree)
