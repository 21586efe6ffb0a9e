"""Memory and time of one train-step on SmolLM2-135M (49k vocabulary): chunked vs unchunked log-probs.

    .venv/bin/python bench/bench_logprobs.py                 # needs the real extra (make test-real)
    .venv/bin/python bench/bench_logprobs.py --sizes 2048 --responses 8

The same batch (``--prompts`` GSM8K prompts through the chat template x ``--responses`` random
responses of ``--response-tokens`` tokens each) is trained on once per (micro_batch_tokens, path)
in a fresh process with one thread (``--steps`` steps, the fastest reported), so each peak RSS (``ru_maxrss``: weights, gradients, AdamW
state and activations) is that configuration's own. ``before``/``full`` is the unchunked path (the
[B, R, V] logits, log-softmax and entropy kept for backward), ``chunked`` the default
(:class:`tcli.models.logprobs.ChunkedHeadLogprobs`). Prints a table and ``target ... PASS/FAIL``
lines: peak RSS at 16384 <= 4 GB (chunked), chunked at most 10 % slower than full at 2048
(CPU seconds of the one-thread process, which a busy machine disturbs far less than wall time).
``before`` is the code before this change: unchunked head, no heap release (``release_heap``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def model_dir(path: str | None) -> str:
    """The SmolLM2 checkpoint: given, or imported once into runs/bench/smollm2."""
    if path:
        return path
    out = REPO / "runs" / "bench" / "smollm2"
    if not (out / "model.safetensors").exists():
        from tcli.models.gguf import import_gguf, smollm2_gguf_path

        print(f"importing SmolLM2 into {out} ...", file=sys.stderr, flush=True)
        import_gguf(smollm2_gguf_path(), str(out))
    return str(out)


def make_records(model: str, prompts: int, responses: int, response_tokens: int, seed: int = 0):
    import numpy as np

    from tcli.io import RecordReader, resolve_data
    from tcli.models.load import load_tokenizer
    from tcli.prompts import BOXED, encode_prompt, prompt_messages

    tok = load_tokenizer(model, required=True)
    recs = [r for _, r in RecordReader(resolve_data("gsm8k"))][:prompts]
    rng = np.random.default_rng(seed)
    V = len(tok)
    out = []
    for i in range(responses):
        rec = recs[i % len(recs)]
        ptoks = encode_prompt(tok, prompt_messages(rec, BOXED))
        toks = rng.integers(100, V, size=response_tokens).tolist()
        out.append({"prompt_id": rec["id"], "sample_id": i, "prompt_token_ids": ptoks,
                    "token_ids": toks, "logprobs": [-8.0] * response_tokens,
                    "advantages": [float(rng.choice([-1.0, 1.0]))] * response_tokens})
    return out


def child(args) -> None:
    """One configuration in this process; prints one JSON line."""
    import resource

    import torch

    torch.set_num_threads(1)
    import tcli.models.logprobs as lp
    from tcli.config.stages import TrainOptions
    from tcli.train.trainer import Trainer

    if args.impl in ("before", "full"):
        orig = lp.batch_logprobs
        lp.batch_logprobs = lambda *a, **k: orig(*a, **{**k, "chunked": False})
    if args.impl in ("before", "chunked-notrim"):
        import tcli.train.trainer as trainer_mod

        trainer_mod.release_heap = lambda: None
    records = make_records(args.model, args.prompts, args.responses, args.response_tokens)
    opts = TrainOptions(lr=1e-6, micro_batch_tokens=args.mbt, device="cpu",
                        grad_checkpointing=args.grad_checkpointing)
    trainer = Trainer(args.model, opts, seed=0)
    rss_loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    times, cpu = [], []
    for _ in range(args.steps):
        t0, c0 = time.perf_counter(), time.process_time()
        m = trainer.step(records)
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    dt = min(times)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(json.dumps({"mbt": args.mbt, "impl": args.impl, "gc": args.grad_checkpointing,
                      "seconds": dt, "all_seconds": times, "cpu_seconds": min(cpu), "peak_gb": peak, "loaded_gb": rss_loaded,
                      "tokens": m["num_tokens"], "loss": m["loss"],
                      "grad_norm": m["grad_norm"]}), flush=True)


def run_one(args, mbt: int, impl: str) -> dict:
    cmd = [sys.executable, __file__, "--child", "--model", args.model, "--mbt", str(mbt),
           "--impl", impl, "--prompts", str(args.prompts), "--responses", str(args.responses),
           "--response-tokens", str(args.response_tokens), "--steps", str(args.steps)]
    if args.grad_checkpointing:
        cmd.append("--grad-checkpointing")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    if p.returncode != 0:
        sys.stderr.write(p.stderr)
        raise SystemExit(f"child failed: mbt {mbt} {impl}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="checkpoint (default: import SmolLM2 once)")
    ap.add_argument("--sizes", default="1024,2048,4096,16384", help="micro_batch_tokens values")
    ap.add_argument("--impls", default="before,chunked",
                    help="before: the unchunked head without heap release (the code before "
                         "chunking); full: unchunked + heap release; chunked: the default; "
                         "chunked-notrim")
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--responses", type=int, default=16)
    ap.add_argument("--response-tokens", type=int, default=128)
    ap.add_argument("--grad-checkpointing", action="store_true")
    ap.add_argument("--steps", type=int, default=1,
                    help="train steps per configuration; the fastest is reported (the machine is "
                         "shared: the minimum is the least disturbed)")
    ap.add_argument("--json", default=None, help="also write the rows to this file")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--mbt", type=int, default=2048, help=argparse.SUPPRESS)
    ap.add_argument("--impl", default="chunked", help=argparse.SUPPRESS)
    args = ap.parse_args()
    sys.path.insert(0, str(REPO))
    if args.child:
        child(args)
        return
    args.model = model_dir(args.model)
    sizes = [int(x) for x in args.sizes.split(",")]
    impls = args.impls.split(",")
    rows = []
    print(f"SmolLM2-135M, {args.responses} responses x {args.response_tokens} tokens + prompts, "
          f"1 thread, grad_checkpointing={args.grad_checkpointing}")
    print(f"{'micro_batch_tokens':>18} {'path':>8} {'peak RSS GB':>12} {'s/step':>8} "
          f"{'cpu s/step':>10} {'loss':>10} {'grad_norm':>10}")
    for mbt in sizes:
        for impl in impls:
            r = run_one(args, mbt, impl)
            rows.append(r)
            print(f"{mbt:>18} {impl:>8} {r['peak_gb']:>12.2f} {r['seconds']:>8.1f} "
                  f"{r['cpu_seconds']:>10.1f} {r['loss']:>10.5f} {r['grad_norm']:>10.5f}",
                  flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    by = {(r["mbt"], r["impl"]): r for r in rows}
    if (16384, "chunked") in by:
        peak = by[16384, "chunked"]["peak_gb"]
        print(f"target peak RSS at 16384 <= 4 GB (chunked): {peak:.2f} GB "
              f"{'PASS' if peak <= 4.0 else 'FAIL'}")
    base = "before" if (2048, "before") in by else "full"
    if (2048, "chunked") in by and (2048, base) in by:
        # CPU seconds of the one-thread process: robust on a shared machine, where wall time
        # mostly measures the neighbours
        c, f = by[2048, "chunked"]["cpu_seconds"], by[2048, base]["cpu_seconds"]
        print(f"target chunked at 2048 <= 1.10 x {base} (CPU s/step): {c:.1f} s vs {f:.1f} s "
              f"({c / f:.2f}x) "
              f"{'PASS' if c <= 1.10 * f else 'FAIL'}")


if __name__ == "__main__":
    main()
