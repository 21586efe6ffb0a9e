"""`tcli train-step`: one clipped policy-gradient update from advantaged rollouts to a new checkpoint.

The training settings are flags generated from :class:`tcli.config.stages.TrainOptions` (the loop's
``[train]`` table has the same settings). Works unchanged under ``torchrun --nproc-per-node N -m
tcli train-step ...`` (DDP; rank 0 reads and validates the input and broadcasts it, rank 0 alone
writes the checkpoint and metrics).
"""

from __future__ import annotations

import os
from typing import Annotated, Optional

import typer

from tcli.commands.common import (InputArg, InputFormatOpt, QuietOpt, SeedOpt, check_not_input,
                                  progress_enabled, refuse_same_file)
from tcli.config.flags import Without, options_command
from tcli.config.spec import settings_of
from tcli.config.stages import SampleOptions, TrainOptions
from tcli.config.threads import ThreadOptions
from tcli.errors import DataError, UsageError

# what the new checkpoint records about how it is meant to be sampled (default: the start's)
Recorded = Annotated[SampleOptions, Without(*(f.name for f in settings_of(SampleOptions)
                                               if f.name not in SampleOptions.RECORDED))]


@options_command
def train_step(
    input: InputArg = "-",
    *,
    model: Annotated[str, typer.Option("--model", "-m", help="Checkpoint directory to start from "
                     "(weights; optimizer.pt and tcli_state.json when present).")] = ...,
    output: Annotated[str, typer.Option("-o", "--output", help="New checkpoint directory "
                      "(written to a temporary sibling, then renamed; an existing directory is "
                      "replaced only if it is a checkpoint).")] = ...,
    opts: TrainOptions,
    threads: ThreadOptions,
    sampling: Recorded,
    metrics: Annotated[Optional[str], typer.Option(help="Also append the metrics record (one JSON "
                       "line) to this file.")] = None,
    overwrite_model: Annotated[bool, typer.Option("--overwrite-model", help="Let -o name --model "
                               "itself: the new checkpoint then replaces the one it started from "
                               "(atomically). Without it that is a usage error.")] = False,
    input_format: InputFormatOpt = None,
    seed: SeedOpt = 0,
    quiet: QuietOpt = False,
) -> None:
    """Recompute log-probs, apply the clipped policy loss (docs/design.md §4.8) and write a new
    checkpoint.

    Log-probs are recomputed at the records' sampling `temperature` T, as log_softmax(logits / T)
    (absent, or 0 for greedy: T = 1; one T per batch). Prints one metrics record (JSON line) on
    stdout. The new checkpoint records how it is meant to be sampled, which sample-tree, eval and
    loop then use: the start checkpoint's prompt template, chat-template choice, max new tokens
    and tools, replaced by the prompt template and max new tokens every input record agrees on,
    replaced by those given here.
    """
    import sys

    from tcli.train.dist import distributed, run_on_main
    from tcli.train.metrics import off_policy_note
    from tcli.train.trainer import Trainer

    _check_settings(input, model, output, metrics, opts, overwrite_model)
    def step(info) -> None:  # a function: the trainer is gone before the group is torn down
        samples, sampled = run_on_main(
            lambda: _read_samples(input, input_format, model, opts), info)
        threads.apply()
        trainer = Trainer(model, opts, seed=seed, dist_info=info)
        m = trainer.step(samples)
        trainer.save(output, _recorded(model, sampled, sampling))
        if info.is_main:
            note = off_policy_note(m)
            if note:
                sys.stderr.write(f"tcli: warning: {note}\n")
            _report({"kind": "train-step", "model": os.path.abspath(output), **m}, metrics, quiet)

    with distributed(opts.device) as info:
        step(info)


def _check_settings(input: str, model: str, output: str, metrics: str | None, opts,
                    overwrite_model: bool) -> None:
    """What can be refused before any record is read: a schedule with no lr left, an output that
    is not tcli's to replace or is the start model, a metrics file that is the input or a
    directory (found only after the step, with the checkpoint already written)."""
    from tcli.models.checkpoint import check_checkpoint_target

    opts.check_used()
    opts.require_span()
    _check_lr_left(model, opts)
    check_checkpoint_target(output, "-o/--output", kind="policy")
    if not overwrite_model:
        check_not_input(model, output, "--model", "--overwrite-model")
    if metrics and metrics != "-" and not os.path.isdir(os.path.dirname(os.path.abspath(metrics))):
        raise UsageError(f"--metrics: directory does not exist: "
                         f"{os.path.dirname(os.path.abspath(metrics))}")
    if metrics and metrics != "-" and os.path.isdir(metrics):  # found after the step: exit 1
        raise UsageError(f"--metrics {metrics} is a directory; give a file to append to")
    refuse_same_file("--metrics", metrics, "the INPUT file", input)  # appended to: corrupted


def _check_lr_left(model: str, opts) -> None:
    """A checkpoint past the end of a schedule that decays to 0 would train at lr 0: a step
    that changes nothing and looks like training."""
    from tcli.models.checkpoint import read_counters
    from tcli.train.schedule import lr_at

    done = read_counters(model)["optimizer_steps"]
    if opts.lr > 0 and lr_at(opts, done) == 0:
        raise UsageError(f"--model {model} has taken {done} optimizer steps, the end of the "
                         f"{opts.lr_schedule} lr schedule (--schedule-steps {opts.schedule_steps}"
                         "): this step would train at lr 0; give a longer --schedule-steps, "
                         "or --min-lr-ratio > 0")


def _recorded(model: str, sampled: dict, sampling: SampleOptions) -> dict:
    """The new checkpoint's ``sampling`` record: the start checkpoint's, then what every training
    record agrees it was sampled with (``sampled``), then the given flags."""
    from tcli.models.recorded import SAMPLING, recorded_sampling, sampling_state

    given = {k: v for k, v in sampling_state(sampling).items() if k not in sampling.unset}
    merged = {**recorded_sampling(model), **sampled, **given}
    return {SAMPLING: merged} if merged else {}


class _SampledWith:
    """The ``prompt_template`` and ``max_new_tokens`` the training records carry: a value every
    record that has the field agrees on is how the new checkpoint was trained to be sampled.
    A value no flag could give (``max_new_tokens`` -5, a template without {prompt}) is bad data
    here, not a checkpoint that sample-tree and eval refuse later."""

    FIELDS = {"prompt_template": str, "max_new_tokens": int}

    def __init__(self) -> None:
        self.seen: dict[str, set] = {k: set() for k in self.FIELDS}

    def watch(self, records, source: str = "<records>"):
        for i, item in enumerate(records, 1):  # dicts, or (line, dict) pairs from RecordReader
            line, rec = item if isinstance(item, tuple) else (i, item)
            for key in self.FIELDS:
                v = rec.get(key) if isinstance(rec, dict) else None
                if v is None:
                    continue
                try:
                    self._check(key, v)
                except DataError as e:
                    raise e.located(source, line) from None
                self.seen[key].add(v)
            yield item

    def _check(self, key: str, v) -> None:
        kind = self.FIELDS[key]
        if not isinstance(v, kind) or isinstance(v, bool):
            raise DataError(f"must be {'an integer' if kind is int else 'a string'}, got "
                            f"{type(v).__name__}", field=key)
        if v in self.seen[key]:  # checked once per value
            return
        try:
            SampleOptions().replace(**{key: v})
        except UsageError as e:
            raise DataError(f"cannot be sampled with: {e}", field=key) from None

    def agreed(self) -> dict:
        return {k: next(iter(v)) for k, v in self.seen.items() if len(v) == 1}


def _read_samples(input: str, input_format: str | None, model: str, opts: TrainOptions):
    """Validate the model directories and every record before any weights load (exit 65 fast);
    (samples, the sampling settings the records agree on)."""
    from tcli.models.load import check_model_dir
    from tcli.models.provenance import check_same_vocabulary
    from tcli.train.samples import samples_from_records

    if opts.ref_model:
        check_model_dir(opts.ref_model)
        check_same_vocabulary(opts.ref_model, model, "--ref-model")
    seen = _SampledWith()
    samples = read_train_input(input, input_format, model, lambda recs, source, vocab:
                               samples_from_records(seen.watch(recs, source), source, vocab))
    return samples, seen.agreed()


def read_train_input(input: str, input_format: str | None, model_dir: str, parse,
                     flag: str = "--model") -> list:
    """Every record parsed and validated by ``parse(records, source, vocab_size)`` against the
    model directory's vocabulary and tokenizer (``SampledBy``), before any weights load; no
    response token at all is exit 65. Shared by train-step and train-critic."""
    from tcli.errors import DataError
    from tcli.io import RecordReader
    from tcli.models.files import max_positions
    from tcli.models.load import model_vocab_size
    from tcli.models.provenance import SampledBy

    vocab = model_vocab_size(model_dir)
    reader = RecordReader(input, input_format)
    samples = parse(SampledBy(model_dir, flag).watch(reader, reader.name), reader.name, vocab)
    if not any(len(s.tokens) for s in samples):
        raise DataError("no response tokens to train on (empty input or empty responses)",
                        file=reader.name)
    limit = max_positions(model_dir)
    long = next((s for s in samples if limit and len(s) > limit), None)
    if long is not None:  # an absolute-position model fails there, a rotary one learns garbage
        raise DataError(f"{len(long.prompt)} prompt + {len(long.tokens)} response tokens exceed "
                        f"the model's {limit} positions", field="token_ids"
                        ).located(reader.name, long.line)
    return samples


def _report(m: dict, metrics: str | None, quiet: bool) -> None:
    """The metrics record on stdout (and appended to --metrics); a summary on a terminal."""
    import sys

    from tcli.io import dumps

    line = dumps(m)
    if metrics and metrics != "-":
        with open(metrics, "ab") as f:
            f.write(line)
    sys.stdout.buffer.write(line)
    sys.stdout.buffer.flush()
    if progress_enabled(quiet):
        from tcli.commands.common import stderr_console

        stderr_console().print(
            f"[bold]train-step[/] step {m['step']} → {m['model']}: loss {m['loss']:.4g}, "
            f"clip {m['clip_frac']:.3f}, grad-norm {m['grad_norm']:.3g}, "
            f"{m['num_tokens']} tokens, {m['tokens_per_s']:.0f} tok/s")


def register(app: typer.Typer) -> None:
    app.command("train-step")(train_step)
