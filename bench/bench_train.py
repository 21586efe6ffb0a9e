"""train-step throughput vs a minimal hand-written PyTorch loop on the same batch and model.

Both do one optimizer step per iteration on B sequences of L tokens (prompt + response):
forward, log-softmax of the response positions, clipped policy loss, backward, grad-norm clip,
AdamW. tcli additionally computes its metrics (entropy, clip fractions, approx-KL, dual clip)
and goes through its micro-batch packing (samples are pre-validated TrainSamples). Steps
alternate between the two so machine load hits both alike; the overhead is computed from the
fastest step of each (the least disturbed by other processes on a shared machine), measured
as process CPU time (``--clock cpu``, default; robust to other processes) or wall time. One
torch thread by default, so a busy neighbour cannot stall a thread barrier mid-step.

    python bench/bench_train.py [--batch 16] [--seq 256] [--hidden 256] [--layers 4] [--steps 10]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--clock", choices=("cpu", "wall"), default="cpu")
    ap.add_argument("--micro-batch-tokens", type=int, default=0,
                    help="tcli micro-batch budget (default: the whole batch in one micro-batch)")
    args = ap.parse_args()

    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    from tcli.models.quiet import quiet_transformers
    from tcli.models.tiny import init_tiny_model
    from tcli.config.stages import TrainOptions
    from tcli.train.samples import TrainSample
    from tcli.train.trainer import Trainer

    quiet_transformers()
    torch.set_num_threads(args.threads)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    B, L, P = args.batch, args.seq, args.prompt
    T = L - P
    tmp = tempfile.mkdtemp(prefix="bench_train-")
    mdir = init_tiny_model(os.path.join(tmp, "m"), seed=0, hidden=args.hidden,
                           layers=args.layers, heads=4, kv_heads=2,
                           intermediate=3 * args.hidden, max_positions=max(1024, L))
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 90, (B, L), generator=g)
    adv = torch.randn(B, T, generator=g)
    base = AutoModelForCausalLM.from_pretrained(mdir, dtype=torch.float32)
    nparams = sum(p.numel() for p in base.parameters())
    with torch.no_grad():
        old = base(input_ids=ids, use_cache=False).logits[:, P - 1:-1].float().log_softmax(-1)
        old = old.gather(-1, ids[:, P:, None]).squeeze(-1)
    # a slightly perturbed behaviour policy so clipping is exercised in both loops
    old = old + 0.05 * torch.randn(B, T, generator=g)
    old = old.clamp(max=0.0)

    # ---- minimal hand-written loop
    base.train()
    opt = torch.optim.AdamW(base.parameters(), lr=1e-6, weight_decay=0.0)
    resp = ids[:, P:]

    def hand_step() -> float:
        t0 = clock()
        logits = base(input_ids=ids, use_cache=False).logits[:, P - 1:-1].float()
        lp = torch.log_softmax(logits, -1).gather(-1, resp[..., None]).squeeze(-1)
        ratio = torch.exp(lp - old)
        loss = torch.maximum(-adv * ratio, -adv * ratio.clamp(0.8, 1.28)).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(base.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return clock() - t0

    # ---- tcli
    samples = [TrainSample(ids[b, :P].numpy().astype(np.int64), ids[b, P:].numpy().astype(np.int64),
                           old[b].numpy().astype(np.float32), adv[b].numpy().astype(np.float32))
               for b in range(B)]
    mbt = args.micro_batch_tokens or B * L
    trainer = Trainer(mdir, TrainOptions(lr=1e-6, micro_batch_tokens=mbt, device="cpu"))

    def tcli_step() -> float:
        t0 = clock()
        trainer.step(samples)
        return clock() - t0

    hand_step(), tcli_step()  # warm-up (allocator, kernels)
    th, tt = [], []
    for _ in range(args.steps):
        th.append(hand_step())
        tt.append(tcli_step())
    bh, bt = min(th), min(tt)
    mh, mt = statistics.median(th), statistics.median(tt)
    tokens = B * L
    print(f"model: {nparams / 1e6:.2f}M params, batch {B} x {L} tokens (prompt {P}, response {T}), "
          f"torch threads {torch.get_num_threads()}, {args.clock} clock, micro-batch tokens {mbt}, "
          f"{args.steps} steps")
    print(f"hand-written loop : {tokens / bh:9.0f} tokens/s  (best {bh * 1000:.0f} ms/step, "
          f"median {mh * 1000:.0f} ms)")
    print(f"tcli train-step   : {tokens / bt:9.0f} tokens/s  (best {bt * 1000:.0f} ms/step, "
          f"median {mt * 1000:.0f} ms)")
    print(f"tcli overhead     : {100 * (bt / bh - 1):+.1f} % on best steps, "
          f"{100 * (mt / mh - 1):+.1f} % on medians  (target <= 15 %)")

if __name__ == "__main__":
    main()
