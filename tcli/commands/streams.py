"""CPU-only stream stages: build-tree, advantages, show-tree (no torch, no transformers)."""

from __future__ import annotations

import math
from typing import Annotated, Optional

import typer

from tcli.commands.common import (FormatOpt, InputArg, InputFormatOpt, OutputOpt, QuietOpt,
                                  SeedOpt, run_groups, stderr_console)
from tcli.errors import DataError, UsageError


def build_tree(
    input: InputArg = "-",
    output: OutputOpt = "-",
    format: FormatOpt = None,
    input_format: InputFormatOpt = None,
    seed: SeedOpt = 0,
    quiet: QuietOpt = False,
) -> None:
    """Add P2T prefix-tree values V(s_t) and branch flags to every rollout (per prompt group)."""
    from tcli.stages.tree import build_tree_group

    run_groups(input, output, format, input_format, build_tree_group)


def advantages(
    input: InputArg = "-",
    output: OutputOpt = "-",
    estimator: Annotated[str, typer.Option("--estimator", "-e",
                         help="grpo | dr_grpo | rloo | tempo | treerpo.")] = "tempo",
    std: Annotated[str, typer.Option(help="Group std: unbiased (G-1) | population (G).")] = "unbiased",
    td_coef: Annotated[float, typer.Option(help="TEMPO: weight lambda of the TD correction.")] = 1.0,
    norm: Annotated[str, typer.Option(help="TreeRPO: std | mean normalisation of siblings.")] = "std",
    prune_std: Annotated[float, typer.Option(help="TreeRPO: sibling groups with std below this get 0.")] = 0.0,
    stats: Annotated[bool, typer.Option("--stats", help="Print a summary on stderr: zero-variance "
                                        "groups, branching tokens, mean |A|.")] = False,
    format: FormatOpt = None,
    input_format: InputFormatOpt = None,
    seed: SeedOpt = 0,
    quiet: QuietOpt = False,
) -> None:
    """Add per-token advantages with a registered estimator (DESIGN §4)."""
    from tcli.algos.estimators import ESTIMATORS, EstimatorOptions
    from tcli.stages.advantages import AdvantageStats, advantages_group

    ESTIMATORS.get(estimator)  # unknown name: usage error before reading anything
    if std not in ("unbiased", "population"):
        raise UsageError(f"--std must be unbiased or population, got {std!r}")
    if norm not in ("std", "mean"):
        raise UsageError(f"--norm must be std or mean, got {norm!r}")
    if not (math.isfinite(td_coef) and math.isfinite(prune_std)):
        raise UsageError("--td-coef and --prune-std must be finite numbers")
    opt = EstimatorOptions(std=std, td_coef=td_coef, norm=norm, prune_std=prune_std)
    acc = AdvantageStats()
    run_groups(input, output, format, input_format,
               lambda recs: advantages_group(recs, estimator, opt, acc))
    if stats:
        console = stderr_console(quiet) or stderr_console(False)
        console.print(acc.render(estimator))


def show_tree(
    input: InputArg = "-",
    group: Annotated[Optional[str], typer.Option("--group", "-g", help="prompt_id to show "
                     "(default: the first group).")] = None,
    index: Annotated[int, typer.Option("--index", help="Show the N-th group (0-based) when "
                     "--group is not given.")] = 0,
    tokenizer: Annotated[Optional[str], typer.Option(help="Model/tokenizer directory to decode "
                         "tokens.")] = None,
    as_bytes: Annotated[bool, typer.Option("--bytes", help="Decode token ids as UTF-8 bytes "
                        "(for byte-level fixtures).")] = False,
    max_depth: Annotated[int, typer.Option(help="Collapse runs of non-branching tokens longer "
                         "than this into one line.")] = 24,
    input_format: InputFormatOpt = None,
    seed: SeedOpt = 0,
) -> None:
    """Render one group's prefix tree: branch points, V at nodes, rewards at leaves, TEMPO's delta."""
    from rich.console import Console

    from tcli.io import RecordReader, iter_groups
    from tcli.show import render_group

    reader = RecordReader(input, input_format)
    for i, (lines, recs) in enumerate(iter_groups(reader, reader.name)):
        if (group is not None and str(recs[0]["prompt_id"]) == group) or (group is None and i == index):
            decode = None
            if as_bytes:
                decode = lambda ids: bytes(i for i in ids if i < 256).decode("utf-8", "replace")  # noqa: E731
            elif tokenizer:
                from tcli.models.quiet import quiet_transformers

                quiet_transformers()
                from transformers import AutoTokenizer

                tok = AutoTokenizer.from_pretrained(tokenizer)
                decode = lambda ids: tok.decode(ids)  # noqa: E731
            try:
                rendered = render_group(recs, decode=decode, max_run=max_depth)
            except DataError as e:
                idx = getattr(e, "index", None)
                raise e.located(reader.name, lines[idx] if idx is not None else lines[0]) from None
            Console().print(rendered)
            return
    raise UsageError(f"group {group!r} not found" if group is not None else f"no group #{index}")


def register(app: typer.Typer) -> None:
    app.command("build-tree")(build_tree)
    app.command("advantages")(advantages)
    app.command("show-tree")(show_tree)
