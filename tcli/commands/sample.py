"""`tcli sample-tree`: prompt records in, rollout records out (independent groups or trees)."""

from __future__ import annotations

import itertools
import time
from typing import Annotated, Optional

import typer

from tcli.commands.common import (FormatOpt, InputArg, InputFormatOpt, OutputOpt, QuietOpt,
                                  SeedOpt, progress_enabled)
from tcli.errors import DataError, UsageError


def sample_tree(
    input: InputArg = "-",
    model: Annotated[str, typer.Option("--model", "-m", help="Model or checkpoint directory "
                     "(its tcli_state.json gives policy_version).")] = ...,
    output: OutputOpt = "-",
    mode: Annotated[str, typer.Option(help="independent (n samples per prompt) | tree.")] = "independent",
    n: Annotated[int, typer.Option("--n", "-n", help="independent: samples per prompt.")] = 8,
    width: Annotated[int, typer.Option(help="tree: children drawn from every node.")] = 2,
    depth: Annotated[int, typer.Option(help="tree: levels; the last runs to EOS or --max-new-tokens.")] = 3,
    segment_tokens: Annotated[int, typer.Option(help="tree: max tokens per segment (levels "
                              "1..depth-1).")] = 64,
    engine: Annotated[str, typer.Option(help="Generation engine: hf | vllm.")] = "hf",
    temperature: Annotated[float, typer.Option(help="Sampling temperature; 0 = greedy.")] = 1.0,
    top_p: Annotated[float, typer.Option(help="Nucleus sampling mass (1 = off).")] = 1.0,
    max_new_tokens: Annotated[int, typer.Option(help="Max response tokens (whole path in tree "
                              "mode).")] = 256,
    min_new_tokens: Annotated[int, typer.Option(help="EOS is masked before this many tokens.")] = 0,
    batch_tokens: Annotated[int, typer.Option(help="hf: memory bound, max cached tokens "
                            "(rows x length) per forward batch.")] = 65536,
    prompt_template: Annotated[str, typer.Option(help="Prompt template: auto (choice if the record "
                               "has choices, else boxed) | boxed | choice | plain | a string with "
                               "{prompt} (and optionally {choices}).")] = "auto",
    chat_template: Annotated[Optional[bool], typer.Option("--chat-template/--no-chat-template",
                             help="Wrap the prompt in the tokenizer's chat template (default: if "
                             "it has one).")] = None,
    limit: Annotated[Optional[int], typer.Option(help="Read only the first N prompts.")] = None,
    prompts_per_batch: Annotated[int, typer.Option(help="Prompts per engine call (their frontier "
                                 "nodes are batched together).")] = 16,
    device: Annotated[Optional[str], typer.Option(help="hf: cpu | cuda | auto.")] = None,
    dtype: Annotated[Optional[str], typer.Option(help="float32 (default) | bfloat16 | float16.")] = None,
    format: FormatOpt = None,
    input_format: InputFormatOpt = None,
    seed: SeedOpt = 0,
    quiet: QuietOpt = False,
) -> None:
    """Sample responses with behaviour log-probs: independent groups or TreeRPO-style trees."""
    from tcli.engines import ENGINES, SamplingConfig
    from tcli.io import RecordReader, RecordWriter
    from tcli.prompts import resolve_template
    from tcli.stages.sample import MODES, sample_records

    if mode not in MODES:
        raise UsageError(f"unknown --mode {mode!r}; valid: {', '.join(MODES)}")
    ENGINES.get(engine)
    resolve_template(prompt_template)
    if limit is not None and limit < 0:
        raise UsageError("--limit must be >= 0")
    cfg = SamplingConfig(temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens,
                         min_new_tokens=min_new_tokens, seed=seed)
    if max_new_tokens < 1 or min_new_tokens < 0 or not 0 < top_p <= 1 or temperature < 0:
        raise UsageError("need --max-new-tokens >= 1, --min-new-tokens >= 0, 0 < --top-p <= 1, "
                         "--temperature >= 0")
    for name, v in (("--n", n), ("--width", width), ("--depth", depth),
                    ("--segment-tokens", segment_tokens), ("--batch-tokens", batch_tokens),
                    ("--prompts-per-batch", prompts_per_batch)):
        if v < 1:
            raise UsageError(f"{name} must be >= 1, got {v}")

    reader = RecordReader(input, input_format)
    records = iter(reader)
    head = next(records, None)  # open and sniff the input before the (slow) model load
    lines: list[int] = []

    def prompts():
        for line, rec in itertools.chain([head], records):
            if limit is not None and len(lines) >= limit:
                return
            lines.append(line)
            yield rec

    if head is None or limit == 0:  # nothing to sample: an empty output, no model load
        with RecordWriter(output, format):
            return
    if engine == "hf":
        kw = {"device": device, "dtype": dtype, "batch_tokens": batch_tokens}
    else:  # other engines manage their own memory; the seed lets them seed per request
        kw = {"seed": seed, **({"dtype": dtype} if dtype else {})}
    eng = ENGINES.get(engine)(model, **kw)

    show = progress_enabled(quiet)
    progress = task = None
    stats = {"prompts": 0, "tokens": 0, "t0": time.perf_counter()}
    if show:
        from rich.console import Console
        from rich.progress import (BarColumn, Progress, SpinnerColumn, TextColumn,
                                   TimeElapsedColumn)

        progress = Progress(SpinnerColumn(), TextColumn("sample-tree"), BarColumn(),
                            TextColumn("{task.completed} prompts"),
                            TextColumn("{task.fields[tps]:.0f} tok/s"), TimeElapsedColumn(),
                            console=Console(stderr=True), transient=False)
        task = progress.add_task("sample", total=limit, tps=0.0)
        progress.start()

    def on_group(group: list[dict]) -> None:
        stats["prompts"] += 1
        stats["tokens"] += sum(len(r["token_ids"]) for r in group)
        if progress is not None:
            dt = max(time.perf_counter() - stats["t0"], 1e-9)
            progress.update(task, completed=stats["prompts"], tps=stats["tokens"] / dt)

    try:
        with RecordWriter(output, format) as writer:
            try:
                for rec in sample_records(eng, prompts(), mode=mode, n=n, width=width, depth=depth,
                                          segment_tokens=segment_tokens, cfg=cfg,
                                          template=prompt_template, chat_template=chat_template,
                                          chunk_size=prompts_per_batch, on_group=on_group):
                    writer.write(rec)
            except DataError as e:
                idx = getattr(e, "index", None)
                line = lines[idx] if idx is not None and idx < len(lines) else None
                raise e.located(reader.name, line) from None
    finally:
        if progress is not None:
            progress.stop()


def register(app: typer.Typer) -> None:
    app.command("sample-tree")(sample_tree)
