"""`tcli eval`: accuracy / pass@k of a checkpoint on a prompt file (../shared/data format)."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from tcli.commands.common import InputFormatOpt, QuietOpt, SeedOpt


def eval_cmd(
    model: Annotated[str, typer.Option("--model", "-m", help="Checkpoint / HF model directory.")],
    data: Annotated[str, typer.Option("--data", "-d", help="Prompt records (JSONL/Arrow): id, prompt, "
                                      "answer, optional choices.")],
    output: Annotated[Optional[str], typer.Option("-o", "--output", help="Write per-sample records "
                      "(with reward and verdict) here.")] = None,
    summary: Annotated[Optional[str], typer.Option("--summary", help="Write the summary JSON here "
                       "(default: one JSON line on stdout).")] = None,
    task: Annotated[str, typer.Option(help="Verifier: auto | math | gsm8k | choice | arith | "
                                      "python:module:function.")] = "auto",
    n: Annotated[int, typer.Option("--n", help="Samples per prompt.")] = 1,
    temperature: Annotated[float, typer.Option(help="0 = greedy (default).")] = 0.0,
    top_p: Annotated[float, typer.Option(help="Nucleus sampling threshold.")] = 1.0,
    k: Annotated[str, typer.Option("--k", help="Comma-separated k for unbiased pass@k.")] = "1",
    limit: Annotated[int, typer.Option(help="Evaluate only the first N prompts (0 = all).")] = 0,
    max_new_tokens: Annotated[int, typer.Option(help="Generation length cap.")] = 512,
    prompt_template: Annotated[str, typer.Option(help="Preset (plain, boxed, choice) or a string "
                                                 "with {prompt}.")] = "plain",
    chat_template: Annotated[Optional[bool], typer.Option("--chat-template/--no-chat-template",
                             help="Apply the tokenizer's chat template (default: if it has one).")] = None,
    engine: Annotated[str, typer.Option(help="hf | vllm.")] = "hf",
    batch_tokens: Annotated[int, typer.Option(help="Token budget of one generation batch.")] = 65536,
    timeout: Annotated[float, typer.Option(help="Per-answer verifier timeout (s).")] = 5.0,
    workers: Annotated[Optional[int], typer.Option(help="Verifier processes (default: all cores).")] = None,
    fail_under: Annotated[Optional[float], typer.Option(help="Exit 1 when accuracy is below this.")] = None,
    input_format: InputFormatOpt = None,
    seed: SeedOpt = 0,
    quiet: QuietOpt = False,
) -> None:
    """Sample (greedy by default), verify and report accuracy, pass@k, length and a 95% bootstrap CI."""
    import orjson

    from tcli.commands.common import stderr_console
    from tcli.engines import make_engine
    from tcli.engines.base import SamplingConfig
    from tcli.errors import TcliError, UsageError
    from tcli.stages.evaluate import evaluate
    from tcli.io import RecordWriter, write_atomic_bytes
    from tcli.prompts import read_prompts

    try:
        ks = sorted({int(x) for x in k.split(",") if x.strip()})
    except ValueError:
        raise UsageError(f"--k must be comma-separated integers, got {k!r}") from None
    if not ks or min(ks) < 1 or max(ks) > n:
        raise UsageError(f"--k values must be between 1 and --n ({n})")
    prompts = read_prompts(data, limit or None)
    eng = make_engine(engine, model, **({"batch_tokens": batch_tokens} if engine == "hf" else {"seed": seed}))
    cfg = SamplingConfig(temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens, seed=seed)
    records, summ = evaluate(eng, prompts, n=n, cfg=cfg, task=task, template=prompt_template,
                             chat_template=chat_template, ks=ks, timeout=timeout, workers=workers,
                             batch_tokens=batch_tokens, seed=seed)
    summ = {"model": model, "data": data, "n": n, "temperature": temperature, **summ}
    if output:
        with RecordWriter(output) as w:
            w.write_all(records)
    blob = orjson.dumps(summ, option=orjson.OPT_INDENT_2 if summary else 0)
    if summary:
        write_atomic_bytes(summary, blob + b"\n")
    else:
        typer.echo(blob.decode())
    console = stderr_console(quiet)
    if console is not None:
        lo, hi = summ.get("accuracy_ci95", [float("nan")] * 2)
        line = f"accuracy {summ['accuracy']:.3f} [{lo:.3f}, {hi:.3f}] on {summ['prompts']} prompts"
        for kk in ks:
            if f"pass@{kk}" in summ:
                line += f"  pass@{kk} {summ[f'pass@{kk}']:.3f}"
        console.print(line, highlight=False)
    if fail_under is not None and summ["accuracy"] < fail_under:
        raise TcliError(f"accuracy {summ['accuracy']:.4f} is below --fail-under {fail_under}")


def register(app: typer.Typer) -> None:
    app.command("eval")(eval_cmd)
