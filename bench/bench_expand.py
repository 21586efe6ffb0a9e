"""expand-tree's continuations on the hf engine: one batch for every prefix length vs one engine
call per length.

A round of expand-tree (docs/design.md §4.17) continues prefixes of many lengths (the nodes of
entropy trees sit anywhere in a response). ``HFEngine.continue_prefixes`` decodes them in one
batch, each row stopping at its own room; the baseline calls it once per prefix length, which is
what a batch of requests that all share one length limit costs (one prefill and one decode per
length). Both must give the same continuations; the figure compared is CPU time of this process
with one torch thread, runs interleaved, best of N.

    .venv/bin/python bench/bench_expand.py [--prompts 16] [--per-prompt 4] [--cap 40]

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

TARGET = 2.0   # per-length calls' CPU time / one batch's


def _args():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="a model directory (default: a tiny Qwen3)")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--per-prompt", type=int, default=4, help="continuations per prompt")
    ap.add_argument("--cap", type=int, default=40, help="max_new_tokens of the responses")
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3, help="best of N timings per way")
    ap.add_argument("--seed", type=int, default=0)
    return ap.parse_args()


def _texts(n: int) -> list[str]:
    import orjson

    from tcli.io import resolve_data

    with open(resolve_data("gsm8k"), "rb") as f:
        return [orjson.loads(line)["prompt"] for line, _ in zip(f, range(n))]


def _requests(engine, texts, args):
    """(prompts, prefixes, seeds): each prompt's token ids repeated with prefixes of random
    lengths below the cap, made of the prompt's own tokens."""
    import numpy as np

    rng = np.random.default_rng(args.seed)
    prompts, prefixes = [], []
    for text in texts:
        ids = engine.tokenizer(text)["input_ids"][-64:]
        for _ in range(args.per_prompt):
            n = int(rng.integers(0, args.cap))
            prompts.append(ids)
            prefixes.append(rng.choice(ids, size=n).tolist())
    return prompts, prefixes, [args.seed * 1000 + i for i in range(len(prompts))]


def _per_length(engine, prompts, prefixes, cfg, seeds):
    """One continue_prefixes call per prefix length (every call has one length limit)."""
    out: list = [None] * len(prompts)
    by_len: dict[int, list[int]] = {}
    for i, p in enumerate(prefixes):
        by_len.setdefault(len(p), []).append(i)
    for idx in by_len.values():
        comps = engine.continue_prefixes([prompts[i] for i in idx], [prefixes[i] for i in idx],
                                         cfg, seeds=[seeds[i] for i in idx], entropy=True)
        for i, c in zip(idx, comps):
            out[i] = c
    return out


def _time(fn):
    c0, w0 = time.process_time(), time.perf_counter()
    out = fn()
    return time.process_time() - c0, time.perf_counter() - w0, out


def main() -> None:
    args = _args()
    import torch

    torch.set_num_threads(1)
    from tcli.engines.hf import HFEngine
    from tcli.engines.sampling import SamplingConfig
    from tcli.models.tiny import init_tiny_model

    texts = _texts(args.prompts)
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or init_tiny_model(os.path.join(tmp, "tiny"), seed=args.seed,
                                              text="".join(texts), hidden=args.hidden,
                                              layers=args.layers)
        engine = HFEngine(model)
        prompts, prefixes, seeds = _requests(engine, texts, args)
        cfg = SamplingConfig(temperature=1.0, max_new_tokens=args.cap)
        ways = {"one batch": lambda: engine.continue_prefixes(prompts, prefixes, cfg,
                                                              seeds=seeds, entropy=True),
                "per length": lambda: _per_length(engine, prompts, prefixes, cfg, seeds)}
        ways["one batch"]()  # warm-up
        best: dict = {}
        for _ in range(args.repeats):
            for name, fn in ways.items():
                cpu, wall, out = _time(fn)
                if name not in best or cpu < best[name][0]:
                    best[name] = (cpu, wall, out)
    lengths = len({len(p) for p in prefixes})
    print(f"model: {args.model or f'tiny qwen3 hidden {args.hidden} layers {args.layers}'}; "
          f"{len(prompts)} continuations ({args.prompts} prompts x {args.per_prompt}), "
          f"{lengths} prefix lengths, cap {args.cap}; 1 torch thread; best CPU time of "
          f"{args.repeats}, interleaved")
    for name, (cpu, wall, out) in best.items():
        tokens = sum(len(c.token_ids) for c in out)
        print(f"{name:10s} CPU {cpu:.3f} s  wall {wall:.3f} s  {tokens} tokens  "
              f"{tokens / cpu:.0f} tok/CPU s")
    same = all(list(a.token_ids) == list(b.token_ids)
               for a, b in zip(best["one batch"][2], best["per length"][2]))
    ratio = best["per length"][0] / best["one batch"][0]
    print(f"target same continuations: {float(same):.2f} (>= 1.0) {'PASS' if same else 'FAIL'}")
    print(f"target per-length / one-batch CPU time: {ratio:.2f}x (>= {TARGET}x) "
          f"{'PASS' if ratio >= TARGET else 'FAIL'}")


if __name__ == "__main__":
    main()
