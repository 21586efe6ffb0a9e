"""Benchmark build-tree's P2T prefix tree against the dict-trie it replaces.

Groups of G responses x T tokens (default 16 x 2,048) that share prefixes the way sampled rollouts
do: each response copies the prefix of an earlier one up to a random point, then continues with
its own tokens. Measures tcli.algos.tree.build_prefix_tree in tokens/s on one pinned core, for Python-list
input (what records parsed from JSON hold) and numpy input, and the speed-up over
tcli.algos.tree_oracle.reference_prefix_tree on the same list input in the same run. The machine is shared, so
the implementations take turns over several rounds and each group counts with its best round (a
burst of load elsewhere then spoils one group's time in one round, not a whole round).

    .venv/bin/python bench/bench_tree.py [--groups 64] [--group-size 16] [--tokens 2048] [--ragged]
                                         [--baseline path/to/old/tree.py]

``--baseline`` times another tree.py (e.g. ``git show HEAD~1:tcli/algos/tree.py > /tmp/old.py``)
in the same rounds, interleaved, for before/after figures that share one machine load.

Exit status 0 when both targets are met (>= 20 M tokens/s on list input, >= 50x the dict-trie).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from tcli.algos.tree import build_prefix_tree  # noqa: E402
from tcli.algos.tree_oracle import reference_prefix_tree  # noqa: E402

TARGET_TOKENS_PER_S = 20e6
TARGET_SPEEDUP = 50.0


def make_groups(n_groups: int, g: int, t: int, vocab: int, seed: int, ragged: bool = False
                ) -> list[tuple[list[list[int]], list[float]]]:
    """Random groups whose responses share prefixes and diverge at random points.

    Every response copies an earlier one up to a random point and continues with its own tokens;
    with ``ragged`` the lengths are uniform in [1, t] instead of all t."""
    rng = np.random.default_rng(seed)
    groups = []
    for _ in range(n_groups):
        seqs = [rng.integers(2, vocab, size=int(rng.integers(1, t + 1)) if ragged else t)]
        for i in range(1, g):
            parent = seqs[int(rng.integers(0, i))]
            n = int(rng.integers(1, t + 1)) if ragged else t
            cut = int(rng.integers(0, min(n, len(parent))))
            seqs.append(np.concatenate([parent[:cut], rng.integers(2, vocab, size=n - cut)]))
        rewards = rng.integers(0, 2, size=g).astype(float).tolist()
        groups.append(([s.tolist() for s in seqs], rewards))
    return groups


def group_times(fn, groups) -> np.ndarray:
    """Wall time of ``fn`` on each group, one pass."""
    out = np.empty(len(groups))
    for i, (seqs, rewards) in enumerate(groups):
        t0 = time.perf_counter()
        fn(seqs, rewards)
        out[i] = time.perf_counter() - t0
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--groups", type=int, default=64)
    ap.add_argument("--group-size", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--vocab", type=int, default=151_000)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--ref-repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ragged", action="store_true", help="lengths uniform in [1, --tokens]")
    ap.add_argument("--core", type=int, default=None, help="CPU to pin to (default: the last allowed)")
    ap.add_argument("--baseline", help="another tree.py to time in the same rounds (before/after)")
    args = ap.parse_args(argv)
    base_build = _load_build(args.baseline) if args.baseline else None

    if hasattr(os, "sched_setaffinity"):
        cores = sorted(os.sched_getaffinity(0))
        core = args.core if args.core is not None else cores[-1]
        os.sched_setaffinity(0, {core})
        pinned = f"core {core}"
    else:
        pinned = "not pinned (no sched_setaffinity)"

    groups = make_groups(args.groups, args.group_size, args.tokens, args.vocab, args.seed, args.ragged)
    np_groups = [([np.asarray(s, dtype=np.int64) for s in seqs], r) for seqs, r in groups]
    n_tok = sum(len(s) for seqs, _ in groups for s in seqs)

    # same answer first: the benchmark is meaningless if the two disagree
    for (seqs, r), (nseqs, _) in zip(groups[:4], np_groups[:4]):
        ref = reference_prefix_tree(seqs, r)
        for tree in (build_prefix_tree(seqs, r), build_prefix_tree(nseqs, r)):
            assert np.allclose(tree.flat_values, ref.flat_values, rtol=0, atol=1e-12)
            assert np.array_equal(tree.flat_branch & _token_mask(tree), ref.flat_branch & _token_mask(ref))

    build_prefix_tree(*groups[0])  # warm-up
    if base_build is not None:
        base_build(*groups[0])
    # interleaved rounds, so all see the same share of a busy machine; each group's best round
    inf = np.full(len(groups), np.inf)
    t_list, t_np, t_ref, b_list, b_np = inf.copy(), inf.copy(), inf.copy(), inf.copy(), inf.copy()
    for k in range(max(args.repeats, args.ref_repeats)):
        if k < args.repeats:
            np.minimum(t_list, group_times(build_prefix_tree, groups), out=t_list)
            np.minimum(t_np, group_times(build_prefix_tree, np_groups), out=t_np)
            if base_build is not None:
                np.minimum(b_list, group_times(base_build, groups), out=b_list)
                np.minimum(b_np, group_times(base_build, np_groups), out=b_np)
        if k < args.ref_repeats:
            np.minimum(t_ref, group_times(reference_prefix_tree, groups), out=t_ref)
    t_list, t_np, t_ref, b_list, b_np = (float(t.sum()) for t in (t_list, t_np, t_ref, b_list, b_np))

    rate_list, rate_np, rate_ref = n_tok / t_list, n_tok / t_np, n_tok / t_ref
    speedup = t_ref / t_list
    shape = f"<= {args.tokens} (ragged)" if args.ragged else f"{args.tokens}"
    print(f"P2T prefix tree: {args.groups} groups x {args.group_size} responses x {shape} tokens "
          f"= {n_tok:,} tokens; {pinned}; best of {args.repeats} (dict-trie: {args.ref_repeats})")
    print(f"{'implementation':<34}{'input':<14}{'ms/group':>10}{'M tokens/s':>12}")
    for name, inp, t, rate in (("build_prefix_tree (numpy)", "Python lists", t_list, rate_list),
                               ("build_prefix_tree (numpy)", "numpy arrays", t_np, rate_np),
                               ("reference_prefix_tree (dict)", "Python lists", t_ref, rate_ref)):
        print(f"{name:<34}{inp:<14}{1e3 * t / args.groups:>10.3f}{rate / 1e6:>12.2f}")
    if base_build is not None:
        for inp, t in (("Python lists", b_list), ("numpy arrays", b_np)):
            print(f"{'baseline (--baseline)':<34}{inp:<14}{1e3 * t / args.groups:>10.3f}"
                  f"{n_tok / t / 1e6:>12.2f}")
    ok_rate = rate_list >= TARGET_TOKENS_PER_S
    ok_speed = speedup >= TARGET_SPEEDUP
    print(f"target >= {TARGET_TOKENS_PER_S / 1e6:.0f} M tokens/s (list input): "
          f"{rate_list / 1e6:.2f}  {'PASS' if ok_rate else 'FAIL'}")
    print(f"target >= {TARGET_SPEEDUP:.0f}x dict-trie (list input):  "
          f"{speedup:.1f}x  {'PASS' if ok_speed else 'FAIL'}")
    print(f"(numpy input: {rate_np / 1e6:.2f} M tokens/s, {t_ref / t_np:.1f}x the dict-trie on lists)")
    if base_build is not None:
        print(f"(vs baseline: {b_list / t_list:.2f}x on lists, {b_np / t_np:.2f}x on numpy input)")
    return 0 if ok_rate and ok_speed else 1


def _load_build(path: str):
    """build_prefix_tree from another copy of tree.py (it only needs numpy)."""
    spec = importlib.util.spec_from_file_location("baseline_tree", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod.build_prefix_tree


def _token_mask(tree) -> np.ndarray:
    """Real token slots of the flat arrays (the slot after each response's last token is unused)."""
    mask = np.ones(len(tree.flat_branch), dtype=bool)
    mask[tree.starts + tree.lens] = False
    return mask


if __name__ == "__main__":
    sys.exit(main())
