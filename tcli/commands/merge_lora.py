"""`tcli merge-lora`: a LoRA adapter checkpoint (train-step/loop with --lora-rank) merged into its
base model, written as a full ordinary checkpoint that vllm or any transformers user loads
without peft.

    tcli merge-lora runs/x/checkpoints/step_20 merged/

The conversion is :func:`tcli.models.adapter.export_merged`.
"""

from __future__ import annotations

from typing import Annotated

import typer

from tcli.commands.common import QuietOpt, progress_enabled
from tcli.errors import UsageError


def merge_lora(
    adapter_dir: Annotated[str, typer.Argument(help="An adapter checkpoint (adapter_config.json "
                           "+ adapter_model.safetensors naming its base model).")],
    out_dir: Annotated[str, typer.Argument(help="Checkpoint directory to write: absent, empty or "
                       "a tcli checkpoint (replaced atomically).")],
    quiet: QuietOpt = False,
) -> None:
    """Merge a LoRA adapter into its base weights (float32) and save a full checkpoint with the
    adapter's tokenizer and state (prints the directory on stdout). A directory without an
    adapter is a usage error (exit 2); a broken adapter or base exits 65."""
    import os

    from tcli.models import adapter
    from tcli.models.checkpoint import check_checkpoint_target
    from tcli.models.load import check_model_dir

    if not os.path.isdir(adapter_dir):
        check_model_dir(adapter_dir)  # not found, or a file: exit 2
    if not adapter.is_adapter_dir(adapter_dir):
        raise UsageError(f"{adapter_dir} is not a LoRA adapter directory (no "
                         f"{adapter.ADAPTER_CONFIG})")
    check_model_dir(adapter_dir)
    out = os.path.realpath(out_dir)
    for src, what in ((adapter_dir, "the adapter"), (adapter.adapter_base(adapter_dir),
                                                     "the adapter's base model")):
        src = os.path.realpath(src)  # replacing it loses it; inside it, it is no longer tcli's
        if os.path.commonpath([out, src]) == src:
            where = "is" if out == src else "is inside"
            raise UsageError(f"OUT_DIR {out_dir} {where} {what}; refusing to write there "
                             "(choose a new directory)")
    check_checkpoint_target(out_dir, kind="policy")
    path = adapter.export_merged(adapter_dir, out_dir)
    if progress_enabled(quiet):
        from tcli.commands.common import stderr_console

        stderr_console().print(f"merge-lora: {adapter_dir} + {adapter.adapter_base(adapter_dir)} "
                               f"-> {path}")
    typer.echo(os.path.abspath(path))


def register(app: typer.Typer) -> None:
    app.command("merge-lora")(merge_lora)
