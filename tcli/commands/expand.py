"""`tcli expand-tree`: verified tree rollouts in, the same rollouts plus new leaves out, more of
them where outcomes diverge (the stage is tcli.stages.expand)."""

from __future__ import annotations

import itertools
import sys
from typing import Annotated

import typer

from tcli.commands.common import (FormatOpt, InputArg, InputFormatOpt, ModelOpt, OutputOpt,
                                  QuietOpt, SeedOpt, located, said_if_empty)
from tcli.config.expand import ExpandOptions
from tcli.config.flags import Without, options_command
from tcli.config.spec import settings_of
from tcli.config.stages import SampleOptions
from tcli.config.threads import ThreadOptions

# of the sample settings, expand-tree takes the engine's: temperature, top-p and the length cap
# come from the records, so the new leaves are drawn as their tree was
ENGINE_SETTINGS = ("engine", "device", "dtype", "batch_tokens", "cuda_graphs", "min_new_tokens",
                   "prompts_per_batch")
NOT_OFFERED = tuple(f.name for f in settings_of(SampleOptions) if f.name not in ENGINE_SETTINGS)


@options_command
def expand_tree(
    input: InputArg = "-",
    *,
    model: ModelOpt,
    output: OutputOpt = "-",
    opts: ExpandOptions,
    sample: Annotated[SampleOptions, Without(*NOT_OFFERED)],
    threads: ThreadOptions,
    format: FormatOpt = None,
    input_format: InputFormatOpt = None,
    seed: SeedOpt = 0,
    quiet: QuietOpt = False,
) -> None:
    """Add children to the nodes of verified trees (sample-tree --mode tree | verify) whose
    leaves disagree: mixed rewards first (by their variance), then the entropy recorded at the
    node; each prompt gets --expand-tokens sampled tokens at most. Prints the originals and the
    new leaves (no reward: verify them next)."""
    from tcli.io import RecordReader, RecordWriter, iter_groups
    from tcli.errors import DataError
    from tcli.models.load import check_model_dir, model_vocab_size
    from tcli.models.provenance import SampledBy
    from tcli.stages.expand import ExpandStats, expand_groups, read_tree

    opts.require_budget()
    check_model_dir(model)  # a bad --model fails here, before torch is imported
    reader = RecordReader(input, input_format)
    groups = iter(iter_groups(SampledBy(model).watch(reader, reader.name), reader.name))
    head = next(groups, None)  # open and read the input before the (slow) model load
    stats = ExpandStats()
    with RecordWriter(output, format) as writer:
        if head is None:  # nothing to expand: an empty output, no model load
            said_if_empty(0, reader.name)
            return
        vocab = model_vocab_size(model)  # from config.json: no torch yet
        try:
            read_tree(head[1], vocab)  # a bad first group fails before the model loads
        except DataError as e:
            raise located(e, reader.name, head[0]) from None
        from tcli.engines import open_engine

        threads.apply()
        engine = open_engine(model, sample, seed=seed)
        where: list = []

        def stream():
            for lines, recs in itertools.chain([head], groups):
                where[:] = [lines]
                yield recs

        try:
            for recs in expand_groups(engine, stream(), opts, seed=seed,
                                      min_new_tokens=sample.min_new_tokens,
                                      groups_per_call=sample.prompts_per_batch, stats=stats,
                                      vocab=vocab):
                writer.write_all(recs)
        except DataError as e:
            raise located(e, reader.name, where[0] if where else []) from None
    if not quiet:
        sys.stderr.write(stats.line() + "\n")


def register(app: typer.Typer) -> None:
    app.command("expand-tree")(expand_tree)
