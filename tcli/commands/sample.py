"""`tcli sample-tree`: prompt records in, rollout records out (independent groups or trees)."""

from __future__ import annotations

import itertools
from typing import Annotated, Optional

import typer

from tcli.commands.common import (FormatOpt, InputFormatOpt, ModelOpt, OutputOpt, QuietOpt,
                                  SeedOpt, checkpoint_sampling, group_progress, input_total,
                                  said_if_empty)
from tcli.config.flags import options_command
from tcli.config.stages import PromptOptions, SampleOptions
from tcli.config.threads import ThreadOptions
from tcli.errors import DataError

PromptInputArg = Annotated[str, typer.Argument(
    help="Prompt records (JSONL, Arrow, Parquet, or a saved Hugging Face dataset directory), or "
         "a shipped benchmark name (tcli eval --list-benchmarks); '-' = stdin.",
    show_default=True)]


@options_command
def sample_tree(
    input: PromptInputArg = "-",
    *,
    model: ModelOpt,
    output: OutputOpt = "-",
    opts: SampleOptions,
    fields: PromptOptions,
    threads: ThreadOptions,
    limit: Annotated[Optional[int], typer.Option(min=1, help="Read only the first N prompts, "
                                                 "N >= 1 (default: all).")] = None,
    format: FormatOpt = None,
    input_format: InputFormatOpt = None,
    seed: SeedOpt = 0,
    quiet: QuietOpt = False,
) -> None:
    """Sample responses with behaviour log-probs: independent groups or TreeRPO-style trees."""
    from tcli.engines import open_engine
    from tcli.io import RecordReader, RecordWriter, output_format, resolve_data
    from tcli.stages.sample import sample_records

    _check_mode_flags(opts)
    output_format(output, format)  # a misleading output name: refused before the model loads
    path = resolve_data(input)
    reader = RecordReader(path, input_format)
    records = iter(reader)
    head = next(records, None)  # open and sniff the input before the (slow) model load
    if head is None:  # nothing to sample: an empty output, no model load
        with RecordWriter(output, format):
            said_if_empty(0, reader.name)
            return
    lines: list[int] = []

    def prompts():
        for line, rec in itertools.islice(itertools.chain([head], records), limit):
            lines.append(line)
            yield rec

    opts = checkpoint_sampling(opts, model, quiet)
    threads.apply()
    engine = open_engine(model, opts, seed=seed)
    total = input_total(path, limit) if input_format in (None, "auto", "jsonl") else limit
    with group_progress("sample-tree", quiet, total=total) as on_group, \
            RecordWriter(output, format) as writer:
        try:
            for rec in sample_records(engine, prompts(), opts, seed=seed, on_group=on_group,
                                      fields=fields):
                writer.write(rec)
        except DataError as e:  # index = the prompt's position in the input
            idx = getattr(e, "index", None)
            raise e.located(reader.name, lines[idx] if idx is not None else None) from None


def _check_mode_flags(opts: SampleOptions) -> None:
    """A shape setting of the other --mode would be ignored without a word: refused instead."""
    from tcli.config.choices import check_mode_settings

    check_mode_settings(opts, opts.flag)


def register(app: typer.Typer) -> None:
    app.command("sample-tree")(sample_tree)
