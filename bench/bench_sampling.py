"""Tree vs independent sampling for the same number of leaves on a tiny local model (hf engine).

Width 4, depth 3 gives 64 leaves per prompt; the independent baseline draws n = 64 samples. Both
use min_new_tokens = max_new_tokens = depth x segment tokens so no sample stops early, and both
encode each prompt once. The tree shares the tokens of its first two levels between leaves, so it
generates fewer tokens per leaf and runs its early levels with smaller batches.

    .venv/bin/python bench/bench_sampling.py [--prompts 4] [--segment-tokens 32]

Prints generated tokens per leaf and wall seconds per leaf for both, and the two ratios
(targets: tree >= 2x fewer tokens and >= 1.5x less time per leaf).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared", "data", "gsm8k_test.jsonl")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--width", type=int, default=4)
    ap.add_argument("--depth", type=int, default=3)
    ap.add_argument("--segment-tokens", type=int, default=32)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch-tokens", type=int, default=1 << 20)
    ap.add_argument("--repeats", type=int, default=2, help="best of N timings per mode")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (0 = torch default). 1 by default: on a shared machine "
                         "OpenMP threads spin-wait and a tiny model's step time turns into "
                         "scheduling noise that hides the work actually done")
    args = ap.parse_args()

    import orjson
    import torch

    if args.threads > 0:
        torch.set_num_threads(args.threads)

    from tcli.config.stages import SampleOptions
    from tcli.engines.hf import HFEngine
    from tcli.models.tiny import init_tiny_model
    from tcli.stages.sample import sample_records

    prompts = []
    with open(DATA, "rb") as f:
        for line in f:
            prompts.append(orjson.loads(line))
            if len(prompts) >= args.prompts:
                break
    text = "".join(p["prompt"] for p in prompts)
    leaves_per_prompt = args.width ** args.depth
    max_new = args.depth * args.segment_tokens
    base = SampleOptions(max_new_tokens=max_new, min_new_tokens=max_new,
                         prompts_per_batch=len(prompts))
    with tempfile.TemporaryDirectory() as tmp:
        model = init_tiny_model(os.path.join(tmp, "tiny"), seed=args.seed, text=text,
                                hidden=args.hidden, layers=args.layers)
        engine = HFEngine(model, batch_tokens=args.batch_tokens)
        runs = {
            "independent": base.replace(mode="independent", n=leaves_per_prompt),
            "tree": base.replace(mode="tree", width=args.width, depth=args.depth,
                                 segment_tokens=args.segment_tokens),
        }
        # warm-up (allocator, kernels) on a short run
        list(sample_records(engine, prompts[:1], base.replace(n=4, max_new_tokens=4,
                                                              min_new_tokens=0), seed=1))
        results = {}
        for name, opts in runs.items():
            best = None
            for _ in range(args.repeats):
                engine.generated_tokens = 0
                t0 = time.perf_counter()
                recs = list(sample_records(engine, prompts, opts, seed=args.seed))
                dt = time.perf_counter() - t0
                assert len(recs) == leaves_per_prompt * len(prompts), len(recs)
                assert all(len(r["token_ids"]) == max_new for r in recs)
                if best is None or dt < best[1]:
                    best = (engine.generated_tokens, dt, len(recs))
            results[name] = best
    print(f"model: tiny qwen3 hidden {args.hidden} layers {args.layers}; {len(prompts)} prompts; "
          f"{torch.get_num_threads()} torch thread(s); "
          f"{leaves_per_prompt} leaves/prompt; {max_new} tokens per leaf "
          f"(tree: width {args.width} depth {args.depth} segment {args.segment_tokens})")
    for name, (tokens, dt, n) in results.items():
        print(f"{name:12s} leaves {n:5d}  generated tokens/leaf {tokens / n:8.2f}  "
              f"wall s/leaf {dt / n:.5f}  (total {dt:.2f} s)")
    (ti, di, ni), (tt, dtt, nt) = results["independent"], results["tree"]
    tok_ratio = (ti / ni) / (tt / nt)
    time_ratio = (di / ni) / (dtt / nt)
    print(f"ratio independent/tree: tokens per leaf {tok_ratio:.2f}x (target >= 2), "
          f"time per leaf {time_ratio:.2f}x (target >= 1.5)")


if __name__ == "__main__":
    main()
