"""hf-engine sampling: tree vs independent for the same leaves, and the KV cache before/after.

1. Tree vs independent. Width 4, depth 3 gives 64 leaves per prompt; the independent baseline
   draws n = 64 samples. Both use min_new_tokens = max_new_tokens = depth x segment tokens so no
   sample stops early, and both encode each prompt once. The tree shares the tokens of its first
   two levels between leaves, so it generates fewer tokens per leaf.
2. KV cache: the preallocated cache (``kv_cache="static"``, tcli/engines/kv.py) against
   transformers' DynamicCache (``"dynamic"``, the path before it: one concatenation of every
   layer's cache per generated token), in both modes, runs interleaved, best of N each. Tokens/s
   count generated tokens once (a tree's shared segments once) per CPU second of this process
   (wall time is printed too). The outputs must be identical.

    .venv/bin/python bench/bench_sampling.py [--prompts 4] [--segment-tokens 32]
    .venv/bin/python bench/bench_sampling.py --model runs/demo-real/model --prompts 2 --segment-tokens 8

Prints one line per target: ``target ... PASS|FAIL``.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

KV_TARGET = 1.2      # static / dynamic tokens per second, each mode


def _args():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="a model directory (default: a tiny Qwen3)")
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--width", type=int, default=4)
    ap.add_argument("--depth", type=int, default=3)
    ap.add_argument("--segment-tokens", type=int, default=32)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch-tokens", type=int, default=1 << 20)
    ap.add_argument("--repeats", type=int, default=2, help="best of N timings per run")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (0 = torch default). 1 by default: on a shared machine "
                         "OpenMP threads spin-wait and a tiny model's step time turns into "
                         "scheduling noise that hides the work actually done")
    return ap.parse_args()


def _run(engine, prompts, opts, seed):
    """(generated tokens, CPU seconds, records, wall seconds) of one sampling call. CPU time of
    this process (one torch thread) is the figure compared: on a shared machine wall time mostly
    measures the other processes."""
    from tcli.stages.sample import sample_records

    engine.generated_tokens = 0
    w0, c0 = time.perf_counter(), time.process_time()
    recs = list(sample_records(engine, prompts, opts, seed=seed))
    return (engine.generated_tokens, time.process_time() - c0, recs, time.perf_counter() - w0)


def _measure(engines, prompts, runs, args):
    """Best (tokens, seconds, records) per (cache kind, mode); the runs are interleaved."""
    best: dict = {}
    for _ in range(args.repeats):
        for mode, opts in runs.items():
            for kind, engine in engines.items():
                out = _run(engine, prompts, opts, args.seed)
                if (kind, mode) not in best or out[1] < best[kind, mode][1]:
                    best[kind, mode] = out
    return best


def _target(name: str, value: float, goal: float, unit: str = "x") -> None:
    print(f"target {name}: {value:.2f}{unit} (>= {goal}{unit}) {'PASS' if value >= goal else 'FAIL'}")


def _report(best, leaves_per_prompt: int, n_prompts: int) -> None:
    import orjson

    for (kind, mode), (tokens, dt, recs, wall) in sorted(best.items()):
        print(f"{kind:8s} {mode:12s} leaves {len(recs):5d}  generated tokens {tokens:7d}  "
              f"{tokens / dt:9.1f} tok/s  CPU s/leaf {dt / len(recs):.5f}  (CPU {dt:.2f} s, "
              f"wall {wall:.2f} s)")
    for mode in ("independent", "tree"):
        (ts, ds, rs, _), (td, dd, rd, _) = best["static", mode], best["dynamic", mode]
        same = [orjson.dumps(r) for r in rs] == [orjson.dumps(r) for r in rd] and ts == td
        print(f"kv cache {mode}: dynamic {td / dd:.1f} tok/s -> static {ts / ds:.1f} tok/s")
        _target(f"{mode} static == dynamic output (byte-identical records)", float(same), 1.0, "")
        _target(f"{mode} kv-cache static/dynamic tokens/s", (ts / ds) / (td / dd), KV_TARGET)
    (ti, di, ri, _), (tt, dtt, rt, _) = best["static", "independent"], best["static", "tree"]
    n = leaves_per_prompt * n_prompts
    assert len(ri) == len(rt) == n, (len(ri), len(rt), n)
    _target("tree vs independent: generated tokens per leaf", (ti / n) / (tt / n), 2.0)
    _target("tree vs independent: time per leaf", (di / n) / (dtt / n), 1.5)


def main() -> None:
    args = _args()
    import orjson
    import torch

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    from tcli.config.stages import SampleOptions
    from tcli.engines.hf import HFEngine
    from tcli.io import resolve_data
    from tcli.models.tiny import init_tiny_model
    from tcli.stages.sample import sample_records

    with open(resolve_data("gsm8k"), "rb") as f:
        prompts = [orjson.loads(line) for line, _ in zip(f, range(args.prompts))]
    leaves = args.width ** args.depth
    max_new = args.depth * args.segment_tokens
    base = SampleOptions(max_new_tokens=max_new, min_new_tokens=max_new, chat_template=False,
                         prompts_per_batch=len(prompts))
    runs = {"independent": base.replace(mode="independent", n=leaves),
            "tree": base.replace(mode="tree", width=args.width, depth=args.depth,
                                 segment_tokens=args.segment_tokens)}
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or init_tiny_model(
            os.path.join(tmp, "tiny"), seed=args.seed, text="".join(p["prompt"] for p in prompts),
            hidden=args.hidden, layers=args.layers)
        engines = {kind: HFEngine(model, batch_tokens=args.batch_tokens, kv_cache=kind)
                   for kind in ("dynamic", "static")}
        for engine in engines.values():  # warm-up (allocator, kernels) on a short run
            list(sample_records(engine, prompts[:1], base.replace(n=4, max_new_tokens=4,
                                                                  min_new_tokens=0), seed=1))
        best = _measure(engines, prompts, runs, args)
    name = args.model or f"tiny qwen3 hidden {args.hidden} layers {args.layers}"
    print(f"model: {name}; {len(prompts)} prompts; {torch.get_num_threads()} torch thread(s); "
          f"{leaves} leaves/prompt; {max_new} tokens per leaf (tree: width {args.width} depth "
          f"{args.depth} segment {args.segment_tokens}); best CPU time of {args.repeats}, "
          "interleaved")
    _report(best, leaves, len(prompts))


if __name__ == "__main__":
    main()
