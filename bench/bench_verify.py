"""Benchmark the verify stage as the loop uses it: seconds per step's answers (16 prompts x 8
samples = 128), verifier workers started once and reused, as in ``tcli loop``.

Three ways to verify the same records, taking turns round by round so that the load of a shared
machine falls on all of them alike (median over rounds):

- ``per-record``: one message per answer to a worker (the pool with ``max_chunk=1``, nothing
  inline) -- the round-trip tax once measured (0.05-0.07 s per step);
- ``chunked``: chunks of records per message, nothing inline (what math and user verifiers get);
- ``inline``: the stage's default: bounded verifiers (arith, gsm8k) run in the loop's own
  process, other tasks in chunks.

Tasks: ``arith`` (make demo's responses), against a step of ``make demo``'s tiny arith model
(``--arith-step``, 0.7 s), and ``gsm8k`` (short real-style answers), against a step of the
real-model gsm8k demo (``--gsm8k-step``, ~50 s).

    .venv/bin/python bench/bench_verify.py [--rounds 40] [--workers 1] [--arith-step 0.7]

Prints ``target`` lines ending in PASS or FAIL; exit status 0 when all pass.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from tcli.stages import verify as stage  # noqa: E402
from tcli.verifiers.pool import DeadlinePool  # noqa: E402

TARGET_SHARE = 0.02  # verify costs < 2 % of a demo step


def arith_records(n: int, seed: int) -> list[dict]:
    from examples.arith.task import make_prompts, noisy_solution

    rng = random.Random(seed)
    prompts = make_prompts(n // 8, seed)
    return [{**p, "prompt_id": p["id"], "sample_id": k, "prompt_template": "plain",
             "text": noisy_solution(p, rng, error_rate=0.5), "token_ids": list(range(40)),
             "logprobs": [-0.5] * 40, "finish_reason": "stop"}
            for p in prompts for k in range(8)]


def gsm8k_records(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        gold = rng.randint(1, 5000)
        said = gold if rng.random() < 0.5 else gold + rng.randint(1, 9)
        text = rng.choice([f"She makes {said} dollars.", f"The answer is {said}.",
                           f"{said // 2} + {said - said // 2} = {said}"])
        out.append({"prompt_id": f"g{i // 8}", "sample_id": i % 8, "prompt": "How many? " * 30,
                    "answer": str(gold), "meta": {"source": "openai/grade-school-math"},
                    "text": text, "token_ids": list(range(48)), "logprobs": [-0.5] * 48})
    return out


def verify_once(records: list[dict], task: str, pool: DeadlinePool, inline: bool) -> float:
    """Seconds to verify ``records`` (fresh copies) through the stage with ``pool``."""
    saved = stage.INLINE_TASKS
    stage.INLINE_TASKS = saved if inline else frozenset()
    try:
        recs = [dict(r) for r in records]
        t0 = time.perf_counter()
        out = list(stage.verify_records(iter(enumerate(recs, 1)), "<bench>", task=task,
                                        timeout=5.0, pool=pool))
        dt = time.perf_counter() - t0
    finally:
        stage.INLINE_TASKS = saved
    assert len(out) == len(records) and all("reward" in r for r in out)
    return dt


def check_same(records: list[dict], task: str, pools: dict) -> None:
    """Every way gives the same rewards and verdicts."""
    outs = []
    for name, (pool, inline) in pools.items():
        recs = [dict(r) for r in records]
        saved = stage.INLINE_TASKS
        stage.INLINE_TASKS = saved if inline else frozenset()
        try:
            outs.append([(r["reward"], r["verdict"]) for r in
                         stage.verify_records(iter(enumerate(recs, 1)), "<b>", task=task, pool=pool)])
        finally:
            stage.INLINE_TASKS = saved
    assert all(o == outs[0] for o in outs), f"{task}: results differ between ways"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--answers", type=int, default=128)
    ap.add_argument("--workers", type=int, default=1, help="verifier workers (make demo: 1)")
    ap.add_argument("--arith-step", type=float, default=0.7, help="seconds of a make-demo step")
    ap.add_argument("--gsm8k-step", type=float, default=50.0,
                    help="seconds of a real-model (gsm8k) demo step")
    args = ap.parse_args()
    data = {"arith": arith_records(args.answers, 0), "gsm8k": gsm8k_records(args.answers, 0)}
    ways = {"per-record": (1, False), "chunked": (None, False), "inline": (None, True)}
    pools = {name: (DeadlinePool(stage._run_payload, args.workers, 5.0,
                                 **({"max_chunk": mc} if mc else {}),
                                 local_fn=stage._run_here).start(), inline)
             for name, (mc, inline) in ways.items()}
    try:
        for task, recs in data.items():
            check_same(recs, task, pools)
        times = {(t, w): [] for t in data for w in ways}
        for _ in range(args.rounds):
            for task, recs in data.items():
                for name, (pool, inline) in pools.items():
                    times[(task, name)].append(verify_once(recs, task, pool, inline))
    finally:
        for pool, _ in pools.values():
            pool.close()
    return report(times, data, ways, args)


def report(times: dict, data: dict, ways: dict, args) -> int:
    steps = {"arith": args.arith_step, "gsm8k": args.gsm8k_step}
    print(f"verify {args.answers} answers, {args.workers} worker(s), median of {args.rounds} "
          f"interleaved rounds")
    ok = True
    for task in data:
        step, budget = steps[task], TARGET_SHARE * steps[task]
        base = statistics.median(times[(task, "per-record")])
        for name in ways:
            med = statistics.median(times[(task, name)])
            print(f"  {task:6s} {name:10s} {med:.4f} s/{args.answers} answers  "
                  f"({base / med:5.1f}x per-record; {100 * med / step:.2f} % of a {step:g} s step)")
        med = statistics.median(times[(task, "inline")])
        good = med <= budget
        ok &= good
        print(f"target {task} verify <= {100 * TARGET_SHARE:g} % of a demo step "
              f"({budget:.3f} s of {step:g} s): {med:.4f} s {'PASS' if good else 'FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
