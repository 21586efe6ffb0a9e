"""train-step: prefix-shared (packed prefix trees) vs per-sequence (one padded row per response).

Two workloads, one optimizer step per iteration, same tiny Qwen3 model and options otherwise:

(a) tree rollouts: ``--trees`` prompts of ``--tree-prompt`` tokens, each a sampled tree of width 4,
    depth 3 and 32-token segments (64 leaves of 96 tokens, sharing their segments);
(b) independent groups: ``--groups`` prompts of 512 tokens with 8 responses of 64 tokens.

First the equality check: one step from the same weights on both paths, max relative difference
of the loss and of every parameter's gradient (norm-relative). Then the timing: steps alternate
between the two trainers so machine load hits both alike; each ratio is per-sequence / shared on
the fastest step of each, as process CPU time (``--clock cpu``, default; robust to other
processes) or wall time, one torch thread. Targets: >= 2x on (a), >= 3x on (b); one ``target``
line each, ending in PASS or FAIL (exit 1 on a FAIL).

``--mode hand`` runs the older comparison instead: train-step vs a minimal hand-written PyTorch
loop on one padded batch (overhead target <= 15 %).

    python bench/bench_train.py [--steps 5] [--hidden 256] [--layers 4] [--mode share|hand]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

TARGETS = {"tree": 2.0, "groups": 3.0}


def _samples(pairs, rng):
    import numpy as np

    from tcli.train.samples import TrainSample

    return [TrainSample(np.asarray(p, dtype=np.int64), np.asarray(r, dtype=np.int64),
                        (-1.0 - 0.5 * rng.random(len(r))).astype(np.float32),
                        rng.standard_normal(len(r)).astype(np.float32)) for p, r in pairs]


def tree_rollouts(rng, trees: int, prompt: int, width=4, depth=3, seg=32):
    """Leaves of full sampled trees: every node has ``width`` children of ``seg`` tokens."""
    pairs = []
    for _ in range(trees):
        p = rng.integers(3, 90, prompt).tolist()
        level = [[]]
        for _ in range(depth):
            level = [r + rng.integers(3, 90, seg).tolist() for r in level for _ in range(width)]
        pairs += [(p, r) for r in level]
    return pairs


def group_rollouts(rng, groups: int, prompt=512, n=8, resp=64):
    pairs = []
    for _ in range(groups):
        p = rng.integers(3, 90, prompt).tolist()
        pairs += [(p, rng.integers(3, 90, resp).tolist()) for _ in range(n)]
    return pairs


def _trainer(mdir, share: bool, mbt: int):
    from tcli.config.stages import TrainOptions
    from tcli.train.trainer import Trainer

    return Trainer(mdir, TrainOptions(lr=1e-6, micro_batch_tokens=mbt, share_prefix=share,
                                      device="cpu"))


def equality(mdir, samples, mbt: int) -> tuple[float, float]:
    """Max relative difference of the loss and of the parameter gradients, one step each."""
    out = []
    for share in (False, True):
        tr = _trainer(mdir, share, mbt)
        grads = {}

        def keep(*_, g=grads, m=tr.model):
            g.update({n: p.grad.clone() for n, p in m.named_parameters()})

        tr.optimizer.register_step_pre_hook(keep)
        out.append((tr.step(samples)["loss"], grads))
    (l1, g1), (l2, g2) = out
    gdiff = max(float((g1[k] - g2[k]).norm() / g1[k].norm().clamp(min=1e-30)) for k in g1)
    return abs(l1 - l2) / max(abs(l1), 1e-30), gdiff


def timed(mdir, samples, mbt: int, steps: int, clock) -> dict:
    """Interleaved steps of both layouts; fastest and median seconds per step of each."""
    trainers = {share: _trainer(mdir, share, mbt) for share in (False, True)}
    times = {False: [], True: []}
    metrics = {}
    for k in range(steps + 1):  # the first round warms up allocator and kernels
        for share, tr in trainers.items():
            t0 = clock()
            metrics[share] = tr.step(samples)
            if k:
                times[share].append(clock() - t0)
    return {share: (min(t), statistics.median(t), metrics[share]) for share, t in times.items()}


def run_share(args, mdir, clock) -> int:
    import numpy as np

    rng = np.random.default_rng(0)
    loads = {"tree": tree_rollouts(rng, args.trees, args.tree_prompt),
             "groups": group_rollouts(rng, args.groups)}
    failed = 0
    for name, pairs in loads.items():
        samples = _samples(pairs, rng)
        dl, dg = equality(mdir, samples, args.micro_batch_tokens)
        res = timed(mdir, samples, args.micro_batch_tokens, args.steps, clock)
        (b0, m0, x0), (b1, m1, x1) = res[False], res[True]
        ratio = b0 / b1
        total = sum(len(s) for s in samples)
        print(f"({name}) {len(samples)} responses, {total} prompt+response tokens; model ran over "
              f"{x0['model_tokens']} per-sequence (padding {x0['padding_share']:.1%}) vs "
              f"{x1['model_tokens']} shared (padding {x1['padding_share']:.1%})")
        print(f"  equality: loss rel diff {dl:.2e}, max grad rel diff {dg:.2e}")
        print(f"  per-sequence {b0 * 1e3:8.0f} ms/step (median {m0 * 1e3:.0f}),  shared "
              f"{b1 * 1e3:8.0f} ms/step (median {m1 * 1e3:.0f}),  {ratio:.2f}x "
              f"(medians {m0 / m1:.2f}x)")
        ok = ratio >= TARGETS[name] and dl <= 1e-5 and dg <= 1e-5
        failed += not ok
        print(f"target >= {TARGETS[name]:.0f}x ({name}) with loss/grads equal to 1e-5: "
              f"{ratio:.2f}x  {'PASS' if ok else 'FAIL'}")
    return 1 if failed else 0


def run_hand(args, mdir, clock) -> int:
    """train-step vs a minimal hand-written PyTorch loop on one padded batch."""
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    B, L, P = args.batch, args.seq, args.prompt
    T = L - P
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 90, (B, L), generator=g)
    adv = torch.randn(B, T, generator=g)
    base = AutoModelForCausalLM.from_pretrained(mdir, dtype=torch.float32)
    with torch.no_grad():
        old = base(input_ids=ids, use_cache=False).logits[:, P - 1:-1].float().log_softmax(-1)
        old = old.gather(-1, ids[:, P:, None]).squeeze(-1)
    old = (old + 0.05 * torch.randn(B, T, generator=g)).clamp(max=0.0)
    base.train()
    opt = torch.optim.AdamW(base.parameters(), lr=1e-6, weight_decay=0.0)

    def hand_step() -> float:
        t0 = clock()
        logits = base(input_ids=ids, use_cache=False).logits[:, P - 1:-1].float()
        lp = torch.log_softmax(logits, -1).gather(-1, ids[:, P:, None]).squeeze(-1)
        ratio = torch.exp(lp - old)
        torch.maximum(-adv * ratio, -adv * ratio.clamp(0.8, 1.28)).mean().backward()
        torch.nn.utils.clip_grad_norm_(base.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return clock() - t0

    from tcli.train.samples import TrainSample

    samples = [TrainSample(ids[b, :P].numpy().astype(np.int64), ids[b, P:].numpy().astype(np.int64),
                           old[b].numpy().astype(np.float32), adv[b].numpy().astype(np.float32))
               for b in range(B)]
    trainer = _trainer(mdir, False, B * L)

    def tcli_step() -> float:
        t0 = clock()
        trainer.step(samples)
        return clock() - t0

    hand_step(), tcli_step()
    th, tt = zip(*[(hand_step(), tcli_step()) for _ in range(args.steps)])
    over = 100 * (min(tt) / min(th) - 1)
    print(f"batch {B} x {L} (prompt {P}); hand-written {min(th) * 1e3:.0f} ms/step, tcli "
          f"{min(tt) * 1e3:.0f} ms/step (per-sequence layout)")
    print(f"target <= 15 % overhead: {over:+.1f} %  {'PASS' if over <= 15 else 'FAIL'}")
    return 0 if over <= 15 else 1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mode", choices=("share", "hand"), default="share")
    ap.add_argument("--trees", type=int, default=2)
    ap.add_argument("--tree-prompt", type=int, default=64)
    ap.add_argument("--groups", type=int, default=2)
    ap.add_argument("--micro-batch-tokens", type=int, default=16384)
    ap.add_argument("--batch", type=int, default=16, help="--mode hand: rows")
    ap.add_argument("--seq", type=int, default=256, help="--mode hand: tokens per row")
    ap.add_argument("--prompt", type=int, default=32, help="--mode hand: prompt tokens per row")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--clock", choices=("cpu", "wall"), default="cpu")
    args = ap.parse_args()

    import torch

    from tcli.models.quiet import quiet_transformers
    from tcli.models.tiny import init_tiny_model

    quiet_transformers()
    torch.set_num_threads(args.threads)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    mdir = init_tiny_model(os.path.join(tempfile.mkdtemp(prefix="bench_train-"), "m"), seed=0,
                           hidden=args.hidden, layers=args.layers, heads=4, kv_heads=2,
                           intermediate=3 * args.hidden, max_positions=2048)
    print(f"tiny Qwen3 hidden {args.hidden}, {args.layers} layers; torch threads "
          f"{torch.get_num_threads()}, {args.clock} clock, {args.steps} timed steps per layout")
    return (run_share if args.mode == "share" else run_hand)(args, mdir, clock)


if __name__ == "__main__":
    sys.exit(main())
