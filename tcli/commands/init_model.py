"""`tcli init-model`: a random tiny Qwen3 model with a char-level tokenizer, built locally.

For tests, examples and laptops: no hub, no download. The directory loads with
AutoModelForCausalLM / AutoTokenizer like any checkpoint and starts at policy_version 0.
"""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from tcli.commands.common import QuietOpt, SeedOpt, progress_enabled
from tcli.errors import DataError, UsageError


def init_model(
    out_dir: Annotated[str, typer.Argument(help="Directory to create (an earlier init-model output "
                       "there is replaced atomically; anything else is refused).")],
    hidden: Annotated[int, typer.Option(help="Hidden size.")] = 128,
    layers: Annotated[int, typer.Option(help="Transformer layers.")] = 4,
    heads: Annotated[int, typer.Option(help="Attention heads (must divide --hidden).")] = 4,
    kv_heads: Annotated[Optional[int], typer.Option(help="Key/value heads (must divide --heads; "
                        "default 2 when --heads is even, else --heads).")] = None,
    intermediate: Annotated[Optional[int], typer.Option(help="MLP size (default 3 x hidden).")] = None,
    max_positions: Annotated[int, typer.Option(help="Max sequence length.")] = 1024,
    alphabet: Annotated[Optional[str], typer.Option(help="Characters of the tokenizer "
                        "(default: ASCII letters, digits, punctuation, space, newline).")] = None,
    text_file: Annotated[Optional[str], typer.Option(help="Add every character of this UTF-8 file "
                         "to the tokenizer (e.g. a prompts .jsonl).")] = None,
    seed: SeedOpt = 0,
    quiet: QuietOpt = False,
) -> None:
    """Create a random tiny causal LM + char tokenizer (prints the directory on stdout)."""
    import os

    if min(hidden, layers, heads, max_positions) < 1:
        raise UsageError("--hidden, --layers, --heads and --max-positions must be >= 1")
    if hidden % heads:
        raise UsageError(f"--heads {heads} must divide --hidden {hidden}")
    if kv_heads is None:
        kv_heads = 2 if heads % 2 == 0 else heads
    if kv_heads < 1 or heads % kv_heads:
        raise UsageError(f"--kv-heads {kv_heads} must divide --heads {heads}")
    _check_target(out_dir)
    text = None
    if text_file is not None:
        try:
            with open(text_file, encoding="utf-8") as f:
                text = f.read()
        except FileNotFoundError:
            raise UsageError(f"--text-file not found: {text_file}") from None
        except UnicodeDecodeError as e:
            raise UsageError(f"--text-file is not UTF-8 text: {text_file} ({e.reason})") from None
    from tcli.models.tiny import init_tiny_model

    path = init_tiny_model(out_dir, seed=seed, alphabet=alphabet, text=text, hidden=hidden,
                           layers=layers, heads=heads, kv_heads=kv_heads,
                           intermediate=intermediate or 3 * hidden, max_positions=max_positions)
    if progress_enabled(quiet):
        from rich.console import Console

        Console(stderr=True).print(f"init-model: {os.path.abspath(path)} (hidden {hidden}, layers "
                                   f"{layers}, heads {heads}/{kv_heads})")
    typer.echo(os.path.abspath(path))


def _check_target(out_dir: str) -> None:
    """Replace only an earlier init-model output: never a file, a directory tcli did not make,
    or a checkpoint that holds training (random weights over trained ones are lost work)."""
    import os

    from tcli.models.checkpoint import STATE_FILE, read_state

    if os.path.lexists(out_dir) and not os.path.isdir(out_dir):
        raise UsageError(f"{out_dir} exists and is not a directory; not replacing it")
    if not os.path.isdir(out_dir) or not os.listdir(out_dir):
        return
    if not os.path.isfile(os.path.join(out_dir, STATE_FILE)):
        raise UsageError(f"{out_dir} is a non-empty directory that tcli did not create; "
                         "not replacing it (choose a new directory)")
    try:
        made_by = read_state(out_dir).get("made_by")
    except DataError:
        made_by = None
    if made_by != "init-model":
        what = f"made by {made_by}" if isinstance(made_by, str) else "a trained model"
        raise UsageError(f"{out_dir} holds a tcli checkpoint ({what}); init-model replaces only "
                         "its own output (choose a new directory)")


def register(app: typer.Typer) -> None:
    app.command("init-model")(init_model)
