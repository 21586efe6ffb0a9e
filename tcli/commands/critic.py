"""PPO's critic as commands: `tcli init-critic`, `tcli values` (and `tcli train-critic`).

    tcli init-critic --from runs/sft runs/critic
    tcli sample-tree ... | tcli verify | tcli values --critic runs/critic \\
        | tcli advantages -e gae | tee adv.jsonl | tcli train-step -m POLICY -o NEW
    tcli train-critic adv.jsonl --critic runs/critic -o runs/critic-1
"""

from __future__ import annotations

import itertools
from typing import Annotated, Iterator

import typer

from tcli.commands.common import (FormatOpt, InputArg, InputFormatOpt, OutputOpt, QuietOpt,
                                  SeedOpt, stderr_console)
from tcli.config.flags import Without, options_command
from tcli.config.stages import CriticOptions
from tcli.config.threads import ThreadOptions
from tcli.errors import DataError

CriticOpt = Annotated[str, typer.Option("--critic", help="Critic directory (tcli init-critic).")]
BATCH_RECORDS = 256  # records read ahead per batch of forwards (bounded memory)


def init_critic(
    out_dir: Annotated[str, typer.Argument(help="New critic directory (absent, empty, or a "
                                           "checkpoint tcli wrote).")],
    source: Annotated[str, typer.Option("--from", help="Policy (causal LM) checkpoint whose "
                                        "backbone the critic starts from.")] = ...,
    dtype: Annotated[str, typer.Option(help="Weights dtype: float32, bfloat16 or float16.")]
    = "float32",
    quiet: QuietOpt = False,
) -> None:
    """A PPO critic: the policy's backbone with a zero-initialised scalar value head."""
    from tcli.models.critic import init_critic as make

    path = make(source, out_dir, dtype=dtype)
    con = stderr_console(quiet)
    if con:
        con.print(f"init-critic: {path} (backbone of {source}, value head at 0)")


@options_command
def values(
    input: InputArg = "-",
    *,
    critic: CriticOpt = ...,
    output: OutputOpt = "-",
    opts: Annotated[CriticOptions, Without("lr", "value_clip", "epochs", "mini_batches",
                                           "max_grad_norm", "weight_decay")],
    threads: ThreadOptions,
    format: FormatOpt = None,
    input_format: InputFormatOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Add `critic_values` (T + 1 per response: V before each token and after the last)."""
    from tcli.io import RecordReader, RecordWriter
    from tcli.models.critic import load_critic
    from tcli.models.load import check_model_dir
    from tcli.models.provenance import SampledBy
    from tcli.stages.values import add_critic_values
    from tcli.train.dist import resolve_device

    check_model_dir(critic)
    reader = RecordReader(input, input_format)
    batches = _batches(SampledBy(critic, "--critic").watch(reader, reader.name), reader.name)
    first = next(batches, None)  # bad input fails before the model loads
    with RecordWriter(output, format) as writer:
        if first is None:
            return
        threads.apply()
        device = resolve_device(opts.device)
        model = load_critic(critic, device=device)
        for batch in itertools.chain([first], batches):
            writer.write_all(add_critic_values(model, batch, device=device, source=reader.name,
                                               micro_batch_tokens=opts.micro_batch_tokens))


def _batches(records: Iterator, source: str) -> Iterator[list]:
    """(line, record, prompt ids, response ids) in batches, validated as they are read."""
    from tcli.records import token_array

    batch: list = []
    for line, rec in records:
        try:
            batch.append((line, rec, token_array(rec, "prompt_token_ids"), token_array(rec)))
        except DataError as e:
            raise e.located(source, line) from None
        if len(batch) == BATCH_RECORDS:
            yield batch
            batch = []
    if batch:
        yield batch


@options_command
def train_critic(
    input: InputArg = "-",
    *,
    critic: CriticOpt = ...,
    output: Annotated[str, typer.Option("-o", "--output", help="New critic directory (written "
                      "to a temporary sibling, then renamed).")] = ...,
    opts: CriticOptions,
    threads: ThreadOptions,
    input_format: InputFormatOpt = None,
    seed: SeedOpt = 0,
    quiet: QuietOpt = False,
) -> None:
    """Fit the critic to `returns` (from `advantages -e gae`) with the clipped value loss.

    Prints one metrics record (JSON line) on stdout: value_loss, value_clip_frac,
    explained_variance (null when the returns do not vary), grad_norm."""
    import os
    import sys

    from tcli.commands.common import check_not_input
    from tcli.commands.train import read_train_input
    from tcli.io import dumps
    from tcli.models.checkpoint import check_checkpoint_target
    from tcli.train.critic import CriticTrainer, critic_samples
    from tcli.train.dist import distributed, run_on_main

    check_checkpoint_target(output, "-o/--output", kind="critic")
    check_not_input(critic, output, "--critic")
    def step(info) -> None:  # a function: the trainer is gone before the group is torn down
        samples = run_on_main(lambda: read_train_input(input, input_format, critic,
                                                       critic_samples, "--critic"), info)
        threads.apply()
        trainer = CriticTrainer(critic, opts, seed=seed, dist_info=info)
        m = trainer.step(samples)
        trainer.save(output)
        if info.is_main:
            sys.stdout.buffer.write(dumps({"kind": "train-critic",
                                           "critic": os.path.abspath(output), **m}))
            sys.stdout.buffer.flush()

    with distributed(opts.device) as info:
        step(info)


def register(app: typer.Typer) -> None:
    app.command("init-critic")(init_critic)
    app.command("values")(values)
    app.command("train-critic")(train_critic)
