"""`tcli train-step`: one clipped policy-gradient update from advantaged rollouts to a new checkpoint.

Works unchanged under ``torchrun --nproc-per-node N -m tcli train-step ...`` (DDP; rank 0 reads
and validates the input and broadcasts it, rank 0 alone writes the checkpoint and metrics).
"""

from __future__ import annotations

import os
from typing import Annotated, Optional

import typer

from tcli.commands.common import InputArg, InputFormatOpt, QuietOpt, SeedOpt, progress_enabled


def _read_samples(input: str, input_format: str | None, model: str):
    """Validate the model directory and every record before any weights load (exit 65 fast)."""
    from tcli.errors import DataError
    from tcli.io import RecordReader
    from tcli.train.trainer import model_vocab_size, samples_from_records

    vocab = model_vocab_size(model)
    reader = RecordReader(input, input_format)
    samples = samples_from_records(iter(reader), reader.name, vocab)
    if not any(len(s.tokens) for s in samples):
        raise DataError("no response tokens to train on (empty input or empty responses)",
                        file=reader.name)
    return samples


def _error_payload(e: Exception):
    from tcli.errors import DataError, TcliError

    if isinstance(e, DataError):
        return ("data", e.message, e.file, e.line, e.field)
    if isinstance(e, TcliError):
        return (type(e).__name__, e.one_line(), None, None, None)
    return ("runtime", f"{type(e).__name__}: {e}", None, None, None)


def _raise_payload(p) -> None:
    from tcli.errors import DataError, TcliError, UsageError

    kind, msg, file, line, fld = p
    if kind == "data":
        raise DataError(msg, file=file, line=line, field=fld)
    if kind == "UsageError":
        raise UsageError(msg)
    raise TcliError(msg)


def train_step(
    input: InputArg = "-",
    model: Annotated[str, typer.Option("--model", "-m", help="Checkpoint directory to start from "
                     "(weights; optimizer.pt and tcli_state.json when present).")] = ...,
    output: Annotated[str, typer.Option("-o", "--output", help="New checkpoint directory "
                      "(written to a temporary sibling, then renamed).")] = ...,
    lr: Annotated[float, typer.Option(help="AdamW learning rate.")] = 1e-6,
    clip_low: Annotated[float, typer.Option(help="PPO clip: ratio lower bound 1 - eps_low.")] = 0.2,
    clip_high: Annotated[float, typer.Option(help="PPO clip: ratio upper bound 1 + eps_high.")] = 0.28,
    dual_clip: Annotated[float, typer.Option(help="Dual-clip bound c for A < 0 (0 = off).")] = 3.0,
    loss_agg: Annotated[str, typer.Option(help="token-mean | seq-mean-token-mean | "
                        "seq-mean-token-sum.")] = "token-mean",
    kl_coef: Annotated[float, typer.Option(help="Weight of the KL-to-reference term in the loss "
                       "(needs --ref-model).")] = 0.0,
    kl_estimator: Annotated[str, typer.Option(help="k1 | k2 | k3.")] = "k3",
    ref_model: Annotated[Optional[str], typer.Option(help="Reference model directory (KL is "
                         "reported whenever given).")] = None,
    epochs: Annotated[int, typer.Option(help="Passes over the rollouts.")] = 1,
    mini_batches: Annotated[int, typer.Option(help="Optimizer steps per epoch (the rollouts are "
                            "split into this many mini-batches).")] = 1,
    micro_batch_tokens: Annotated[int, typer.Option(help="Padded tokens per forward/backward "
                                  "(gradient accumulation above that).")] = 16384,
    max_grad_norm: Annotated[float, typer.Option(help="Gradient-norm clip (0 = none).")] = 1.0,
    weight_decay: Annotated[float, typer.Option(help="AdamW weight decay.")] = 0.0,
    metrics: Annotated[Optional[str], typer.Option(help="Also append the metrics record (one JSON "
                       "line) to this file.")] = None,
    bf16: Annotated[bool, typer.Option("--bf16", help="bfloat16 autocast (fp32 master weights).")] = False,
    grad_checkpointing: Annotated[bool, typer.Option("--grad-checkpointing",
                                  help="Recompute activations in backward to save memory.")] = False,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda.")] = "auto",
    input_format: InputFormatOpt = None,
    seed: SeedOpt = 0,
    quiet: QuietOpt = False,
) -> None:
    """Recompute log-probs, apply the clipped policy loss (DESIGN §4) and write a new checkpoint.

    Prints one metrics record (JSON line) on stdout.
    """
    import sys

    from tcli.errors import UsageError
    from tcli.io import dumps
    from tcli.train.trainer import (TrainConfig, Trainer, broadcast_object, init_distributed)

    cfg = TrainConfig(lr=lr, clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip,
                      loss_agg=loss_agg, kl_coef=kl_coef, kl_estimator=kl_estimator,
                      ref_model=ref_model, epochs=epochs, mini_batches=mini_batches,
                      micro_batch_tokens=micro_batch_tokens, max_grad_norm=max_grad_norm,
                      weight_decay=weight_decay, seed=seed, bf16=bf16,
                      grad_checkpointing=grad_checkpointing, device=device).validate()
    if not output:
        raise UsageError("-o/--output must name the new checkpoint directory")
    if os.path.isfile(output):
        raise UsageError(f"-o/--output {output} is a file; give a checkpoint directory")
    if os.path.isdir(output) and os.listdir(output) and not os.path.exists(
            os.path.join(output, "config.json")):
        raise UsageError(f"-o/--output {output} is a non-empty directory that is not a "
                         "checkpoint; refusing to replace it")
    if metrics and metrics != "-":
        d = os.path.dirname(os.path.abspath(metrics))
        if not os.path.isdir(d):
            raise UsageError(f"--metrics: directory does not exist: {d}")

    info = init_distributed(device)
    try:
        payload = None
        if info.is_main:
            try:
                payload = ("ok", _read_samples(input, input_format, model))
            except Exception as e:  # noqa: BLE001 - shipped to the other ranks, re-raised below
                if not info.enabled:
                    raise
                payload = ("error", _error_payload(e))
        payload = broadcast_object(payload, info)
        if payload[0] == "error":
            _raise_payload(payload[1])
        samples = payload[1]

        trainer = Trainer(model, cfg, dist_info=info)
        m = trainer.step(samples)
        trainer.save(output)
        if info.is_main:
            m = {"kind": "train-step", "model": os.path.abspath(output), **m}
            line = dumps(m)
            if metrics and metrics != "-":
                with open(metrics, "ab") as f:
                    f.write(line)
            sys.stdout.buffer.write(line)
            sys.stdout.buffer.flush()
            if progress_enabled(quiet):
                from tcli.commands.common import stderr_console

                stderr_console().print(
                    f"[bold]train-step[/] step {m['step']} → {output}: loss {m['loss']:.4g}, "
                    f"clip {m['clip_frac']:.3f}, grad-norm {m['grad_norm']:.3g}, "
                    f"{m['num_tokens']} tokens, {m['tokens_per_s']:.0f} tok/s")
    finally:
        if info.enabled:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()


def register(app: typer.Typer) -> None:
    app.command("train-step")(train_step)
