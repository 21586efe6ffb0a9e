"""Warm start for the tools demo: a tiny char-level model, a short SFT on traces that call
``calc`` some of the time and guess the rest, then its accuracy on the test prompts with the
tool in the loop (greedy and sampled), its tool-call rate and its tool-error rate.

Why a mixture: RL needs groups with mixed rewards. A fraction ``--call-rate`` of the SFT
traces call the tool (``<calc>expr</calc><result>value</result>`` then ``#### value``: right
whenever the call is written right); the others write a guess (``#### value`` with its last
digits wrong: right by chance only). The model learns both habits and, sampling, calls the tool
about as often as the traces did; greedy decoding follows the majority habit. RL with a
correctness reward can then teach it to call the tool.

Why two phases: copying the expression into the call and the result into the answer is what the
tiny model learns slowly, and only tool traces teach it. So ``--copy-steps`` of SFT on tool
traces alone come first, then ``--steps`` on the mixture, which mostly sets the call rate.

Why multi-character tokens: under ``--tools`` the sampler puts the toolset's instructions (a few
hundred characters) in front of every prompt; the char-level tokenizer holds them, the call's
tags and the result framing as one token each (``protocol_tokens``), so they cost one position.

The result block is part of the SFT target (tcli's SFT has no per-token mask: its loss covers
the whole response). Predicting it does the model no harm: in RL and eval the toolset supplies
it as environment tokens, outside the loss.

    python -m examples.tools.warmstart --out runs/tools/sft --data runs/tools/data

Prints one JSON line with the figures on stdout; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time

if __package__ in (None, ""):  # run as a script: make `examples.tools` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from examples.tools.task import (TOOL, head_trace, make_prompts, policy_prompt,  # noqa: E402
                                 protocol_tokens, tool_trace)


def make_toolset():
    """The toolset the loop will use: ``calc`` in the ``tags`` format."""
    from tcli.tools.toolset import Toolset

    return Toolset([TOOL], fmt="tags")


def sft_examples(train: list[dict], n: int, call_rate: float, seed: int,
                 toolset, keep: int = 2) -> list[tuple[str, str]]:
    """``n`` (prompt, response) pairs cycling over ``train``, the prompt as the sampler writes
    it: a tool trace with probability ``call_rate``, else a guess (fresh at every repetition)."""
    rng = random.Random(seed)
    traces: dict[str, str] = {}
    out = []
    for i in range(n):
        r = train[i % len(train)]
        prompt = policy_prompt(toolset, r)
        if rng.random() < call_rate:
            if r["id"] not in traces:
                traces[r["id"]] = tool_trace(toolset, r)
            out.append((prompt, traces[r["id"]]))
        else:
            out.append((prompt, head_trace(r, rng, keep)))
    return out


def read_jsonl(path: str) -> list[dict]:
    with open(path, "rb") as f:
        return [json.loads(line) for line in f if line.strip()]


def tool_accuracy(model_dir: str, records: list[dict], *, samples: int = 4, seed: int = 0,
                  max_new_tokens: int = 48, max_turns: int = 2) -> dict:
    """Greedy and sampled figures of a checkpoint with the tool in the loop."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from examples.tools.rollout import run_episodes, summary
    from tcli.models.quiet import quiet_transformers

    quiet_transformers()
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    toolset = make_toolset()
    prompts = [policy_prompt(toolset, r) for r in records]
    answers = [r["answer"] for r in records]
    kw = dict(max_new_tokens=max_new_tokens, max_turns=max_turns, seed=seed)
    greedy = run_episodes(model, tok, toolset, prompts, greedy=True, **kw)
    sampled = run_episodes(model, tok, toolset, prompts, greedy=False, n=samples, **kw)
    g, s = summary(greedy, answers, 1), summary(sampled, answers, samples)
    groups = [summary(sampled[i * samples:(i + 1) * samples], [a], samples)["accuracy"]
              for i, a in enumerate(answers)]
    return {"prompts": len(records), "samples_per_prompt": samples,
            **{f"greedy_{k}": v for k, v in g.items()},
            **{f"sampled_{k}": v for k, v in s.items()},
            "mixed_groups": sum(0 < x < 1 for x in groups) / max(len(groups), 1),
            "example": {"prompt": records[0]["prompt"], "greedy": greedy[0].text,
                        "sampled": sampled[0].text}}


def _args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="Checkpoint directory to write (SFT model).")
    ap.add_argument("--data", help="Directory with train.jsonl and test.jsonl from make_data "
                    "(default: generate 2000 train and --eval-n test prompts).")
    ap.add_argument("--hidden", type=int, default=96, help="Hidden size (default 96).")
    ap.add_argument("--layers", type=int, default=3, help="Transformer layers (default 3).")
    ap.add_argument("--heads", type=int, default=4, help="Attention heads (default 4).")
    ap.add_argument("--sft-examples", type=int, default=20000,
                    help="SFT examples, cycling over the train prompts (default 20000).")
    ap.add_argument("--call-rate", type=float, default=0.3,
                    help="Share of SFT traces that call the tool (default 0.3).")
    ap.add_argument("--guess-keep", type=int, default=2,
                    help="Leading digits a guess gets right (default 2).")
    ap.add_argument("--copy-steps", type=int, default=600,
                    help="SFT steps on tool traces only, before the mixture: the model learns to "
                    "write the call and copy the result first (default 600).")
    ap.add_argument("--steps", type=int, default=300,
                    help="SFT steps on the mixture of tool and guess traces (default 300).")
    ap.add_argument("--lr", type=float, default=2e-3, help="Peak SFT learning rate (cosine decay).")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--eval-n", type=int, default=200, help="Test prompts to evaluate (0 = skip).")
    ap.add_argument("--samples", type=int, default=4,
                    help="Samples per test prompt at temperature 1.")
    ap.add_argument("--max-new-tokens", type=int, default=48,
                    help="Response cap (observations count), recorded in the checkpoint for "
                    "tcli eval / sample-tree / loop (default 48).")
    ap.add_argument("--max-turns", type=int, default=2, help="Tool calls per response (default 2).")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (default 1; 0 = torch's default).")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quiet", "-q", action="store_true", help="No progress on stderr.")
    a = ap.parse_args(argv)
    if not 0.0 <= a.call_rate <= 1.0:
        ap.error("--call-rate must be in [0, 1]")
    if min(a.hidden, a.layers, a.heads, a.batch_size, a.sft_examples, a.steps) < 1 \
            or a.copy_steps < 0:
        ap.error("sizes and --steps must be >= 1, --copy-steps >= 0")
    if a.hidden % a.heads:
        ap.error(f"--heads {a.heads} must divide --hidden {a.hidden}")
    return a


def _state(a) -> dict:
    """What the checkpoint records: how it was made, and how it is meant to be sampled (plain
    prompts, the response cap, and the tool it was trained to call), which tcli eval,
    sample-tree and loop then use unless told otherwise."""
    return {"warmstart": {"task": "tools", "call_rate": a.call_rate, "copy_steps": a.copy_steps,
                          "steps": a.steps, "hidden": a.hidden, "layers": a.layers},
            "sampling": {"prompt_template": "plain", "chat_template": False,
                         "max_new_tokens": a.max_new_tokens, "tools": [TOOL],
                         "tool_format": "tags", "max_turns": a.max_turns}}


def main(argv: list[str] | None = None) -> int:
    a = _args(argv)
    import tempfile

    import torch

    from tcli.models.quiet import quiet_transformers
    from tcli.models.tiny import init_tiny_model
    from tcli.sft import sft

    quiet_transformers()
    if a.threads > 0:
        torch.set_num_threads(a.threads)
    log = (lambda *m: None) if a.quiet else (lambda *m: print(*m, file=sys.stderr, flush=True))
    t0 = time.perf_counter()
    train = (read_jsonl(os.path.join(a.data, "train.jsonl")) if a.data
             else make_prompts(2000, a.seed, "train"))
    toolset = make_toolset()
    phases = [p for p in ((a.copy_steps, 1.0), (a.steps, a.call_rate)) if p[0] > 0]
    out_parent = os.path.dirname(os.path.abspath(a.out))
    os.makedirs(out_parent, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="tools-init-", dir=out_parent) as tmp:
        src = os.path.join(tmp, "init")
        init_tiny_model(src, seed=a.seed, added_tokens=protocol_tokens(toolset),
                        hidden=a.hidden, layers=a.layers, heads=a.heads,
                        kv_heads=2 if a.heads % 2 == 0 else a.heads,
                        intermediate=3 * a.hidden, max_positions=256)
        for k, (steps, rate) in enumerate(phases):
            def progress(step: int, loss: float, model, steps=steps, rate=rate) -> None:
                log(f"sft (call rate {rate}) step {step}/{steps} loss {loss:.4f} "
                    f"({time.perf_counter() - t0:.0f}s)")

            dst = a.out if k == len(phases) - 1 else os.path.join(tmp, f"phase{k}")
            res = sft(src, sft_examples(train, a.sft_examples, rate, a.seed + k, toolset,
                                        a.guess_keep), dst,
                      steps=steps, lr=a.lr, batch_size=a.batch_size, seed=a.seed + k,
                      warmup=min(50, steps // 10), callback=progress,
                      log_every=max(1, steps // 10), max_new_tokens=a.max_new_tokens,
                      extra_state=_state(a))
            src = dst
    report = {"out": os.path.abspath(a.out), "sft_steps": a.copy_steps + a.steps,
              "sft_loss": res["loss_last"], "sft_time_s": round(time.perf_counter() - t0, 1)}
    if a.eval_n > 0:
        test = (read_jsonl(os.path.join(a.data, "test.jsonl"))[:a.eval_n] if a.data
                else make_prompts(a.eval_n, a.seed, "test"))
        t1 = time.perf_counter()
        report.update(tool_accuracy(a.out, test, samples=a.samples, seed=a.seed,
                                    max_new_tokens=a.max_new_tokens, max_turns=a.max_turns))
        report["eval_time_s"] = round(time.perf_counter() - t1, 1)
        log(f"greedy: acc {report['greedy_accuracy']:.3f} calls {report['greedy_tool_call_rate']:.2f}"
            f" | sampled: acc {report['sampled_accuracy']:.3f} calls "
            f"{report['sampled_tool_call_rate']:.2f} (mixed groups {report['mixed_groups']:.2f})")
    report["total_time_s"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
