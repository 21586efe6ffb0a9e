"""Warm start for the arith demo: a tiny char-level model, a short SFT on generated solutions,
then its accuracy on the test prompts (sampled at temperature 1 and greedy).

Why mistaken solutions: RL needs a policy that is right only part of the time, so that groups of
samples have mixed rewards. The SFT data are step solutions with human-like mistakes: a step that
crosses a ten forgets the carry/borrow with probability ``--carry-error-rate`` (0.6, so greedy
decoding makes the mistake too) and other steps slip by 1 or 2 with probability ``--error-rate``;
later steps continue from the wrong value. The model learns the format and the arithmetic and
also these habits, which RL with a correctness reward can then remove.

    python -m examples.arith.warmstart --out runs/arith/sft --data runs/arith/data

Prints one JSON line with the accuracies on stdout; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time

if __package__ in (None, ""):  # run as a script: make `examples.arith` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from examples.arith.task import ALPHABET, make_prompts, noisy_solution  # noqa: E402

def extracted_answer(text: str) -> int | None:
    """The integer after the last ``####`` if any, else the last integer in the text: the rule
    of the project's ``arith`` verifier, which this delegates to so that the warm-start accuracy
    is exactly the reward RL will see."""
    from tcli.verifiers.arith import extract

    got, _ = extract(text)
    return int(got) if got is not None else None


def is_correct(text: str, answer: str) -> bool:
    from tcli.verifiers.arith import verify_arith

    reward, _ = verify_arith(text, answer, {})
    return reward == 1.0


def read_jsonl(path: str) -> list[dict]:
    with open(path, "rb") as f:
        return [json.loads(line) for line in f if line.strip()]


def generate(model, tok, prompts: list[str], *, n: int = 1, greedy: bool = False,
             max_new_tokens: int = 48, batch_size: int = 256, seed: int = 0) -> list[list[str]]:
    """``n`` completions per prompt with transformers ``generate`` (left-padded batches),
    temperature 1 and no top-k/top-p when sampling. Returns the decoded response texts."""
    import torch

    torch.manual_seed(seed)
    out: list[list[str]] = []
    for i in range(0, len(prompts), batch_size):
        chunk = prompts[i:i + batch_size]
        enc = tok(chunk, return_tensors="pt", padding=True, add_special_tokens=False)
        kw = dict(do_sample=False) if greedy else dict(do_sample=True, temperature=1.0, top_k=0,
                                                       top_p=1.0, num_return_sequences=n)
        with torch.no_grad():
            gen = model.generate(**enc, max_new_tokens=max_new_tokens, use_cache=True,
                                 eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                                 **kw)
        texts = tok.batch_decode(gen[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        k = 1 if greedy else n
        out.extend(texts[j * k:(j + 1) * k] for j in range(len(chunk)))
    return out


def accuracy(model_dir: str, records: list[dict], *, n: int = 4, seed: int = 0,
             max_new_tokens: int = 48) -> dict:
    """Sampled (temperature 1, ``n`` per prompt) and greedy exact-answer accuracy of a
    checkpoint."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tcli.models.quiet import quiet_transformers

    quiet_transformers()
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return model_accuracy(model, tok, records, n=n, seed=seed, max_new_tokens=max_new_tokens)


def model_accuracy(model, tok, records: list[dict], *, n: int = 4, seed: int = 0,
                   max_new_tokens: int = 48) -> dict:
    """:func:`accuracy` of a model in memory (left in the train/eval mode it came in)."""
    was_training = model.training
    model.eval()
    tok.padding_side = "left"
    prompts = [r["prompt"] for r in records]
    sampled = generate(model, tok, prompts, n=n, seed=seed, max_new_tokens=max_new_tokens)
    greedy = generate(model, tok, prompts, greedy=True, max_new_tokens=max_new_tokens)
    model.train(was_training)
    hits = [[is_correct(t, r["answer"]) for t in ts] for ts, r in zip(sampled, records)]
    ghits = [is_correct(ts[0], r["answer"]) for ts, r in zip(greedy, records)]
    flat = [h for hs in hits for h in hs]
    mixed = sum(1 for hs in hits if 0 < sum(hs) < len(hs))
    by_diff: dict[str, list[bool]] = {}
    for hs, r in zip(hits, records):
        by_diff.setdefault(str(r.get("meta", {}).get("difficulty")), []).extend(hs)
    return {"prompts": len(records), "samples_per_prompt": n,
            "acc_sampled": sum(flat) / max(len(flat), 1),
            "acc_greedy": sum(ghits) / max(len(ghits), 1),
            "mixed_groups": mixed / max(len(records), 1),
            "acc_by_difficulty": {k: sum(v) / len(v) for k, v in sorted(by_diff.items())},
            "example": {"prompt": prompts[0], "sampled": sampled[0][0], "greedy": greedy[0][0]}}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="Checkpoint directory to write (SFT model).")
    ap.add_argument("--data", help="Directory with train.jsonl and test.jsonl from make_data "
                    "(default: generate 2000 train and --eval-n test prompts).")
    ap.add_argument("--hidden", type=int, default=96, help="Hidden size (default 96).")
    ap.add_argument("--layers", type=int, default=3, help="Transformer layers (default 3).")
    ap.add_argument("--heads", type=int, default=4, help="Attention heads (default 4).")
    ap.add_argument("--sft-examples", type=int, default=20000,
                    help="SFT examples: mistaken solutions of the train prompts, cycled "
                    "(default 20000).")
    ap.add_argument("--carry-error-rate", type=float, default=0.6,
                    help="Chance that an SFT step crossing a ten forgets the carry/borrow "
                    "(default 0.6: above 1/2, so greedy decoding inherits the mistake).")
    ap.add_argument("--error-rate", type=float, default=0.05,
                    help="Chance that another SFT step slips by 1 or 2 (default 0.05).")
    ap.add_argument("--steps", type=int, default=1000, help="SFT optimizer steps (default 1000).")
    ap.add_argument("--lr", type=float, default=2e-3, help="Peak SFT learning rate (cosine decay).")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--eval-n", type=int, default=200, help="Test prompts to evaluate (0 = skip).")
    ap.add_argument("--samples", type=int, default=4,
                    help="Samples per test prompt at temperature 1.")
    ap.add_argument("--max-new-tokens", type=int, default=48,
                    help="Response cap of the accuracy check, recorded in the checkpoint for "
                    "tcli eval / sample-tree / loop (default 48).")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (default 1; 0 = torch's default). Two threads are "
                    "~1.5x faster on an idle 2-core machine but many times slower on a busy one.")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quiet", "-q", action="store_true", help="No progress on stderr.")
    a = ap.parse_args(argv)
    for name in ("error_rate", "carry_error_rate"):
        if not 0.0 <= getattr(a, name) <= 1.0:
            ap.error(f"--{name.replace('_', '-')} must be in [0, 1]")
    if min(a.hidden, a.layers, a.heads, a.batch_size, a.sft_examples) < 1 or a.steps < 0:
        ap.error("sizes must be >= 1 and --steps >= 0")
    if a.hidden % a.heads:
        ap.error(f"--heads {a.heads} must divide --hidden {a.hidden}")

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
    rng = random.Random(a.seed)
    train = (read_jsonl(os.path.join(a.data, "train.jsonl")) if a.data
             else make_prompts(2000, a.seed, "train"))
    # cycle over the train prompts; each repetition gets fresh mistakes
    examples = [(r["prompt"], noisy_solution(r, rng, a.error_rate, a.carry_error_rate))
                for r in (train[i % len(train)] for i in range(a.sft_examples))]

    def progress(step: int, loss: float, model) -> None:
        log(f"sft step {step}/{a.steps} loss {loss:.4f} ({time.perf_counter() - t0:.0f}s)")

    out_parent = os.path.dirname(os.path.abspath(a.out))
    os.makedirs(out_parent, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="arith-init-", dir=out_parent) as tmp:
        init_dir = os.path.join(tmp, "init")
        init_tiny_model(init_dir, seed=a.seed, alphabet=ALPHABET, hidden=a.hidden,
                        layers=a.layers, heads=a.heads,
                        kv_heads=2 if a.heads % 2 == 0 else a.heads,
                        intermediate=3 * a.hidden, max_positions=256)
        res = sft(init_dir, examples, a.out, steps=a.steps, lr=a.lr, batch_size=a.batch_size,
                  seed=a.seed, warmup=min(50, a.steps // 10), callback=progress,
                  log_every=max(1, a.steps // 10), max_new_tokens=a.max_new_tokens,
                  extra_state={"warmstart": {"task": "arith", "error_rate": a.error_rate,
                                             "carry_error_rate": a.carry_error_rate,
                                             "hidden": a.hidden, "layers": a.layers}})
    report = {"out": os.path.abspath(a.out), "params": _count_params(a.out),
              "sft_steps": res["steps"], "sft_loss": res["loss_last"],
              "sft_time_s": round(res["time_s"], 1)}
    if a.eval_n > 0:
        test = (read_jsonl(os.path.join(a.data, "test.jsonl"))[:a.eval_n] if a.data
                else make_prompts(a.eval_n, a.seed, "test"))
        t1 = time.perf_counter()
        report.update(accuracy(a.out, test, n=a.samples, seed=a.seed,
                               max_new_tokens=a.max_new_tokens))
        report["eval_time_s"] = round(time.perf_counter() - t1, 1)
        log(f"accuracy: sampled {report['acc_sampled']:.3f} greedy {report['acc_greedy']:.3f} "
            f"(mixed-reward groups {report['mixed_groups']:.2f})")
    report["total_time_s"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(report))
    return 0


def _count_params(model_dir: str) -> int:
    from safetensors import safe_open

    n = 0
    with safe_open(os.path.join(model_dir, "model.safetensors"), "pt") as f:
        for k in f.keys():
            n += _prod(f.get_slice(k).get_shape())
    return n


def _prod(shape) -> int:
    p = 1
    for s in shape:
        p *= int(s)
    return p


if __name__ == "__main__":
    sys.exit(main())
