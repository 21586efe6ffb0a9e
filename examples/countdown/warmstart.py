"""Warm start for the countdown task: a tiny char-level Qwen3, a short SFT on solutions whose first
move is good only part of the time, then its accuracy (greedy and sampled) on a prompt file.

Why such solutions: RL needs a policy that is right only part of the time, and on this task the
part RL should fix is the decision, not the arithmetic. Every SFT response is a legal chain that
finishes mechanically (task.best_tail); its first move is a good one with probability
``--good-rate`` and otherwise any first move, good or bad. The model learns the format, the
arithmetic and a prior over first moves; which move reaches the target is what it must learn.

    python -m examples.countdown.warmstart --out runs/countdown/sft --data runs/countdown/data

Settings are chosen on ``val.jsonl`` (train split); ``--eval-file test.jsonl`` reports test once.
Prints one JSON line with the accuracies on stdout; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time

if __package__ in (None, ""):  # run as a script: make `examples.countdown` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from examples.arith.warmstart import _count_params, generate, read_jsonl  # noqa: E402
from examples.countdown.task import ALPHABET, good_moves, parse_prompt, sft_response  # noqa: E402
from examples.countdown.verify import verify_countdown  # noqa: E402


def first_move_good(text: str, record: dict) -> bool:
    """Whether the response's first line is a good first move (either operand order)."""
    numbers, target = parse_prompt(record["prompt"])
    line = text.strip().split("\n", 1)[0].split("=", 1)[0]
    good = {f"{a}{op}{b}" for a, op, b in good_moves(numbers, target)}
    good |= {f"{b}{op}{a}" for a, op, b in good_moves(numbers, target) if op != "-"}
    return line in good


def model_accuracy(model, tok, records: list[dict], *, n: int = 4, seed: int = 0,
                   max_new_tokens: int = 40) -> dict:
    """Greedy and sampled (temperature 1, ``n`` per prompt) accuracy with the countdown verifier,
    by difficulty, and how often the greedy first move is a good one."""
    was_training = model.training
    model.eval()
    tok.padding_side = "left"
    prompts = [r["prompt"] for r in records]
    sampled = generate(model, tok, prompts, n=n, seed=seed, max_new_tokens=max_new_tokens)
    greedy = [g[0] for g in generate(model, tok, prompts, greedy=True,
                                     max_new_tokens=max_new_tokens)]
    model.train(was_training)

    def ok(text: str, r: dict) -> bool:
        return verify_countdown(text, r["answer"], r)[0] == 1.0

    hits = [[ok(t, r) for t in ts] for ts, r in zip(sampled, records)]
    ghits = [ok(t, r) for t, r in zip(greedy, records)]
    by_size: dict[str, list[bool]] = {}
    for g, r in zip(ghits, records):
        by_size.setdefault(str(r["meta"]["difficulty"]), []).append(g)
    flat = [h for hs in hits for h in hs]
    return {"prompts": len(records), "samples_per_prompt": n,
            "acc_greedy": sum(ghits) / max(len(ghits), 1),
            "acc_sampled": sum(flat) / max(len(flat), 1),
            "greedy_first_move_good": sum(map(first_move_good, greedy, records)) / len(records),
            "mixed_groups": sum(0 < sum(hs) < len(hs) for hs in hits) / max(len(records), 1),
            "acc_greedy_by_size": {k: sum(v) / len(v) for k, v in sorted(by_size.items())},
            "example": {"prompt": prompts[0], "greedy": greedy[0], "sampled": sampled[0][0]}}


def accuracy(model_dir: str, records: list[dict], **kw) -> dict:
    """:func:`model_accuracy` of a saved checkpoint."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tcli.models.quiet import quiet_transformers

    quiet_transformers()
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return model_accuracy(model, tok, records, **kw)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="Checkpoint directory to write (SFT model).")
    ap.add_argument("--data", required=True, help="Directory with train.jsonl (and the eval file) "
                    "from make_data.")
    ap.add_argument("--eval-file", default="val.jsonl",
                    help="Prompt file in --data to evaluate on (default val.jsonl; '' = skip).")
    ap.add_argument("--hidden", type=int, default=96, help="Hidden size (default 96).")
    ap.add_argument("--layers", type=int, default=3, help="Transformer layers (default 3).")
    ap.add_argument("--heads", type=int, default=4, help="Attention heads (default 4).")
    ap.add_argument("--good-rate", type=float, default=0.5,
                    help="Chance that an SFT response opens with a good first move (default 0.5; "
                    "otherwise any first move).")
    ap.add_argument("--sft-examples", type=int, default=20000,
                    help="SFT examples: responses to the train prompts, cycled (default 20000).")
    ap.add_argument("--steps", type=int, default=1000, help="SFT optimizer steps (default 1000).")
    ap.add_argument("--lr", type=float, default=2e-3, help="Peak SFT learning rate (cosine decay).")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--samples", type=int, default=4, help="Samples per eval prompt at T=1.")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (0 = default).")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quiet", "-q", action="store_true", help="No progress on stderr.")
    a = ap.parse_args(argv)
    if not 0.0 <= a.good_rate <= 1.0:
        ap.error("--good-rate must be in [0, 1]")
    if min(a.hidden, a.layers, a.heads, a.batch_size, a.sft_examples) < 1 or a.steps < 0:
        ap.error("sizes must be >= 1 and --steps >= 0")
    if a.hidden % a.heads:
        ap.error(f"--heads {a.heads} must divide --hidden {a.hidden}")
    return a


def train(a: argparse.Namespace, log) -> dict:
    """Initialise the tiny model and run the SFT; the sft() result."""
    import tempfile

    from tcli.models.tiny import init_tiny_model
    from tcli.sft import sft

    rng = random.Random(a.seed)
    train_recs = read_jsonl(os.path.join(a.data, "train.jsonl"))
    # cycle over the train prompts; each repetition draws its first move afresh
    examples = [(r["prompt"], sft_response(r, rng, a.good_rate))
                for r in (train_recs[i % len(train_recs)] for i in range(a.sft_examples))]
    t0 = time.perf_counter()

    def progress(step: int, loss: float, model) -> None:
        log(f"sft step {step}/{a.steps} loss {loss:.4f} ({time.perf_counter() - t0:.0f}s)")

    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="countdown-init-",
                                     dir=os.path.dirname(os.path.abspath(a.out))) as tmp:
        init_dir = os.path.join(tmp, "init")
        init_tiny_model(init_dir, seed=a.seed, alphabet=ALPHABET, hidden=a.hidden,
                        layers=a.layers, heads=a.heads,
                        kv_heads=2 if a.heads % 2 == 0 else a.heads,
                        intermediate=3 * a.hidden, max_positions=256)
        return sft(init_dir, examples, a.out, steps=a.steps, lr=a.lr, batch_size=a.batch_size,
                   seed=a.seed, warmup=min(50, a.steps // 10), callback=progress,
                   log_every=max(1, a.steps // 10),
                   extra_state={"warmstart": {"task": "countdown", "good_rate": a.good_rate,
                                              "hidden": a.hidden, "layers": a.layers}})


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    import torch

    from tcli.models.quiet import quiet_transformers

    quiet_transformers()
    if a.threads > 0:
        torch.set_num_threads(a.threads)
    log = (lambda *m: None) if a.quiet else (lambda *m: print(*m, file=sys.stderr, flush=True))
    t0 = time.perf_counter()
    res = train(a, log)
    report = {"out": os.path.abspath(a.out), "params": _count_params(a.out),
              "good_rate": a.good_rate, "sft_steps": res["steps"], "sft_loss": res["loss_last"],
              "sft_time_s": round(res["time_s"], 1)}
    if a.eval_file:
        recs = read_jsonl(os.path.join(a.data, a.eval_file))
        report["eval_file"] = a.eval_file
        report.update(accuracy(a.out, recs, n=a.samples, seed=a.seed))
        log(f"{a.eval_file}: greedy {report['acc_greedy']:.3f} sampled "
            f"{report['acc_sampled']:.3f} (greedy first move good "
            f"{report['greedy_first_move_good']:.2f})")
    report["total_time_s"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
