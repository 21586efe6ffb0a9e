"""Peak memory of the streaming stages does not grow with the length of the stream.

A generator process writes N synthetic rollout records (groups of G responses of about T tokens,
responses sharing prefixes, 0/1 rewards, an arith answer in the text) as JSONL into a pipe, so
nothing large touches the disk:

    generator | tcli build-tree | tcli advantages > /dev/null
    generator | tcli verify --task arith --workers W > /dev/null

Each tcli process's peak RSS comes from ``wait4`` (the kernel's ru_maxrss). The same pipelines run
for a short and a long stream; the growth of the peak from short to long must stay below 10 %.

One big group: a fresh process per size builds the P2T prefix tree (tcli.algos.tree) of a single
group of G = 64 ... 16,384 responses of 32 tokens (random tokens; each response copies a shared
base up to a random point), reporting its peak RSS and what the build added on top of the input.
The build must be linear in tokens: bytes per token at the largest G within 2x of G = 1,024 (a
G x G matrix makes it 16x), and under 1 kB. Before the O(tokens) build the 10,000-response group
of a 300 kB input peaked at 5.7 GB.

    .venv/bin/python bench/bench_memory.py [--small 100000] [--large 1000000]
                                           [--verify-small 100000] [--verify-large 1000000]
                                           [--group-sizes 64,256,1024,4096,16384]
                                           [--skip-tree] [--skip-verify] [--skip-group]

Exit status 0 when every target line says PASS. Measured on the 2-core dev machine
(about 3 minutes): build-tree 46.5 -> 48.3 MiB (+3.9 %), advantages 46.1 -> 48.2 MiB (+4.6 %),
verify --workers 2 34.1 -> 33.9 MiB (-0.5 %) from 100k to 1M responses. What is left of the
growth is the repeated-group check (tcli.io.SeenKeys): 8 bytes per group, plus 8 more while a
batch of new keys is merged in; before SeenKeys a Python set of prompt ids made it +22 %.

``--gen N`` only runs the generator (JSONL on stdout), e.g. ``bench_memory.py --gen 1000 | tcli
show-tree``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGET_GROWTH = 0.10
GROUP_SIZES = (64, 256, 1024, 4096, 16384)
GROUP_REF = 1024                # bytes per token of the largest group vs this one ...
TARGET_GROUP_RATIO = 2.0        # ... may grow at most this much
TARGET_GROUP_BYTES = 1024       # and stay under this many bytes per token


# ----------------------------------------------------------------------------- the generator

def generate(n: int, group_size: int = 8, tokens: int = 32, seed: int = 0, out=None) -> None:
    """N rollout records to ``out`` (binary), in chunks; memory is constant in N."""
    import numpy as np
    import orjson

    out = out or sys.stdout.buffer
    rng = np.random.default_rng(seed)
    chunk: list[bytes] = []
    n_groups = (n + group_size - 1) // group_size
    written = 0
    for g in range(n_groups):
        base = rng.integers(3, 90, size=tokens).tolist()
        cuts = rng.integers(0, tokens, size=group_size).tolist()
        rewards = rng.integers(0, 2, size=group_size).tolist()
        answer = str(int(rng.integers(0, 1000)))
        for s in range(min(group_size, n - written)):
            toks = base[: cuts[s]] + rng.integers(3, 90, size=tokens - cuts[s]).tolist()
            text = f"step {s} ... #### {answer if rewards[s] else int(answer) + 1}"
            chunk.append(orjson.dumps({
                "schema": "tcli.rollout/1", "prompt_id": f"gen-{g:09d}", "sample_id": s,
                "prompt": "What is the answer?", "answer": answer, "task": "tcli-arith",
                "token_ids": toks, "text": text, "reward": float(rewards[s]),
            }, option=orjson.OPT_APPEND_NEWLINE))
            written += 1
        if len(chunk) >= 4096:
            out.write(b"".join(chunk))
            chunk = []
    out.write(b"".join(chunk))
    out.flush()


# ----------------------------------------------------------------------------- measuring

def _wait_rss(proc: subprocess.Popen) -> tuple[int, int]:
    """(exit status, peak RSS in MiB) of a child, from the kernel's accounting."""
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, usage.ru_maxrss / 1024  # Linux reports KiB


def run_pipeline(n: int, stages: list[list[str]], group_size: int, tokens: int) -> dict:
    """generator | stage1 | stage2 ... > /dev/null; peak RSS (MiB) of every tcli stage."""
    env = dict(os.environ, PYTHONPATH=REPO)
    gen = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--gen", str(n),
                            "--group-size", str(group_size), "--tokens", str(tokens)],
                           stdout=subprocess.PIPE, env=env)
    procs, prev = [], gen.stdout
    t0 = time.perf_counter()
    for i, args in enumerate(stages):
        last = i == len(stages) - 1
        p = subprocess.Popen([sys.executable, "-m", "tcli", *args], stdin=prev,
                             stdout=subprocess.DEVNULL if last else subprocess.PIPE, cwd=REPO, env=env)
        prev.close()  # the next stage owns the read end now
        prev = p.stdout
        procs.append(p)
    out = {}
    for args, p in zip(stages, procs):
        code, rss = _wait_rss(p)
        if code != 0:
            raise SystemExit(f"tcli {' '.join(args)} failed with exit {code} at n={n}")
        out[args[0]] = rss
    gen.wait()
    out["seconds"] = time.perf_counter() - t0
    return out


def one_group(g: int, tokens: int, seed: int = 0) -> None:
    """Child process: build one group's prefix tree; print the peak RSS (KiB) before the build.

    The tokens are int64 arrays, as ``Group.from_records`` hands them to build-tree. A tiny build
    first loads everything the build imports, so the baseline holds the interpreter, numpy and
    the input, and the parent's ``wait4`` peak minus it is what the build itself needed."""
    import resource

    import numpy as np

    from tcli.algos.tree import build_prefix_tree

    build_prefix_tree([[1, 2], [1, 3]], [0.0, 1.0])
    rng = np.random.default_rng(seed)
    base = rng.integers(3, 151_000, size=tokens)
    cuts = rng.integers(0, tokens, size=g)
    seqs = [np.concatenate([base[:c], rng.integers(3, 151_000, size=tokens - c)]) for c in cuts]
    rewards = rng.integers(0, 2, size=g).astype(float)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    tree = build_prefix_tree(seqs, rewards)
    print(before, time.perf_counter() - t0, len(tree.flat_values), flush=True)


def group_memory(sizes: list[int], tokens: int) -> bool:
    """Peak RSS of one group's build, one fresh process per group size."""
    print(f"\none group, G responses x {tokens} tokens, a fresh process each (tcli.algos.tree)")
    print(f"  {'G':>7} {'tokens':>10} {'peak RSS':>12} {'build adds':>12} {'per token':>10} {'build s':>8}")
    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1")
    per_token = {}
    for g in sizes:
        proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--one-group", str(g),
                                 "--tokens", str(tokens)], stdout=subprocess.PIPE, env=env)
        out = proc.stdout.read().decode().split()
        code, peak = _wait_rss(proc)
        if code != 0 or len(out) != 3:
            raise SystemExit(f"one-group build failed with exit {code} at G={g}")
        before, seconds = int(out[0]) / 1024, float(out[1])
        n_tok = g * tokens
        added = max(peak - before, 0.0)
        per_token[g] = added * 2**20 / n_tok
        print(f"  {g:>7,} {n_tok:>10,} {peak:>8.1f} MiB {added:>8.1f} MiB {per_token[g]:>6.0f} B/tok"
              f" {seconds:>8.3f}")
    big = max(sizes)
    ref = GROUP_REF if GROUP_REF in per_token and GROUP_REF < big else min(sizes)
    ratio = per_token[big] / max(per_token[ref], 1.0)
    ok = ratio <= TARGET_GROUP_RATIO and per_token[big] < TARGET_GROUP_BYTES
    print(f"target one group's build memory linear in tokens: {per_token[ref]:.0f} B/token at "
          f"G={ref:,} -> {per_token[big]:.0f} at G={big:,} ({ratio:.2f}x <= {TARGET_GROUP_RATIO:g}x, "
          f"< {TARGET_GROUP_BYTES} B/token)  {'PASS' if ok else 'FAIL'}")
    return ok


def compare(name: str, stages: list[list[str]], small: int, large: int, group_size: int,
            tokens: int) -> bool:
    a = run_pipeline(small, stages, group_size, tokens)
    b = run_pipeline(large, stages, group_size, tokens)
    ok = True
    print(f"\n{name}: {small:,} vs {large:,} responses (groups of {group_size}, {tokens} tokens); "
          f"{a['seconds']:.1f}s / {b['seconds']:.1f}s")
    for args in stages:
        s = args[0]
        growth = b[s] / a[s] - 1
        ok &= growth < TARGET_GROWTH
        print(f"  {s:12} peak RSS {a[s]:7.1f} MiB -> {b[s]:7.1f} MiB  growth {100 * growth:+5.1f} %"
              f"  {'ok' if growth < TARGET_GROWTH else 'OVER TARGET'}")
    return ok


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gen", type=int, help="only write N generated records to stdout")
    ap.add_argument("--small", type=int, default=100_000)
    ap.add_argument("--large", type=int, default=1_000_000)
    ap.add_argument("--verify-small", type=int, default=100_000)
    ap.add_argument("--verify-large", type=int, default=1_000_000)
    ap.add_argument("--workers", type=int, default=2, help="verify worker processes")
    ap.add_argument("--group-size", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--skip-verify", action="store_true")
    ap.add_argument("--skip-tree", action="store_true")
    ap.add_argument("--skip-group", action="store_true", help="skip the one-big-group case")
    ap.add_argument("--group-sizes", default=",".join(map(str, GROUP_SIZES)),
                    help="group sizes for the one-big-group case (comma-separated)")
    ap.add_argument("--one-group", type=int, help=argparse.SUPPRESS)  # child of the group case
    args = ap.parse_args()
    if args.one_group is not None:
        one_group(args.one_group, args.tokens)
        return 0
    if args.gen is not None:
        try:
            generate(args.gen, args.group_size, args.tokens)
        except BrokenPipeError:
            pass
        return 0
    ok = True
    if not args.skip_group:
        ok &= group_memory([int(x) for x in args.group_sizes.split(",")], args.tokens)
    streams_ok = True
    if not args.skip_tree:
        streams_ok &= compare("build-tree | advantages", [["build-tree"], ["advantages", "-e", "tempo"]],
                              args.small, args.large, args.group_size, args.tokens)
    if not args.skip_verify:
        streams_ok &= compare("verify", [["verify", "--task", "arith", "--workers", str(args.workers)]],
                              args.verify_small, args.verify_large, args.group_size, args.tokens)
    if not (args.skip_tree and args.skip_verify):
        print(f"\ntarget: streaming stages' peak RSS grows < {100 * TARGET_GROWTH:.0f} % -> "
              f"{'met' if streams_ok else 'NOT met'}  {'PASS' if streams_ok else 'FAIL'}")
    return 0 if ok and streams_ok else 1


if __name__ == "__main__":
    sys.exit(main())
