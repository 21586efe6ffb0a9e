"""tcli loop vs TRL's GRPOTrainer on make demo's setting: seconds per training step
(target: tcli s/step <= 0.7 x TRL s/step).

Both sides train the same warm start (make demo's tiny char-level arith model, runs/demo/sft) on
the same prompts (runs/demo/data/train.jsonl) with the settings of examples/arith/demo.toml, read
from that file for both: GRPO advantages (group mean/std), n = 8 samples per prompt x 16 prompts,
the same max new tokens, temperature 1 (no top-k, top-p 1), AdamW at the same lr with constant
schedule, gradient clip 1.0, one optimizer step per generation batch (one micro-batch of 128),
no KL (beta 0), clip 0.2 / 0.28, fp32, no gradient checkpointing, one torch thread each.
Loss aggregation: tcli ``token-mean`` = TRL ``loss_type="dapo"`` (sum over every response
token of the batch / number of those tokens). Rewards: the arith verifier (tcli's, inside the
loop; TRL calls the same ``tcli.verifiers.arith.verify_arith`` from its reward function).

- tcli side: the loop library in a worker process (what ``tcli loop --estimator grpo`` runs; eval
  off, no checkpoint before the last step); a step's time is the difference of consecutive
  ``wall_time`` in its metrics.jsonl (sample, verify, advantages, train, rollout writing and the
  metrics line: everything the loop does per step).
- TRL side: ``GRPOTrainer.train`` in a worker process; a step runs from one ``on_step_begin``
  callback to the next (generation, rewards, loss, backward, optimizer, the step's logging).

Interleaving: both workers load, then run one training step at a time by turns (tcli step 1,
TRL step 1, tcli step 2, ...; the pauses between turns are not timed), so a change in the load of
a shared machine hits both sides alike; each round starts both fresh from the warm start, the
first ``--warmup`` steps of a round are dropped and the medians of the remaining steps are
compared. Generated tokens per step (EOS included) are printed for both, to show both sides did
the same sampling work.

    make bench-peer      # builds .venv-trl (torch CPU + pinned trl), then runs this
    .venv-trl/bin/python bench/bench_peer_trl.py [--rounds 2] [--steps 20] [--warmup 3]

Prints one ``target`` line ending in PASS or FAIL; exit status 0 when it passes.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import tomllib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGET = 0.7  # tcli s/step <= 0.7 x TRL s/step
ENV_ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
                  "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                  "TRANSFORMERS_VERBOSITY": "error", "WANDB_DISABLED": "true",
                  "TRL_EXPERIMENTAL_SILENCE": "1", "PYTHONWARNINGS": "ignore"}


def demo_settings(config: str) -> dict:
    """The settings both sides use, read once from make demo's loop config."""
    with open(config, "rb") as f:
        c = tomllib.load(f)
    s, t = c.get("sample", {}), c.get("train", {})
    return {"prompts_per_step": c.get("prompts_per_step", 16), "n": s.get("n", 8),
            "temperature": s.get("temperature", 1.0), "top_p": s.get("top_p", 1.0),
            "max_new_tokens": s.get("max_new_tokens", 256), "lr": t.get("lr", 1e-6),
            "clip_low": t.get("clip_low", 0.2), "clip_high": t.get("clip_high", 0.28),
            "max_grad_norm": t.get("max_grad_norm", 1.0)}


# ------------------------------------------------------------------------------ lockstep

class Baton:
    """The worker's end of the lockstep: say "ready", wait for "go". The driver lets the two
    sides run one step at a time by turns, so a change of machine load hits both alike."""

    def __init__(self, spec: str):
        self.go, self.ready = (int(x) for x in spec.split(","))

    def pause(self) -> None:
        os.write(self.ready, b"r")
        if os.read(self.go, 1) != b"g":
            raise SystemExit("bench driver went away")


# ------------------------------------------------------------------------------ TRL side

def trl_config(s: dict, out_dir: str, steps: int, seed: int):
    """GRPOConfig matching the tcli loop: one generation batch of prompts x n per optimizer step."""
    from trl import GRPOConfig

    batch = s["prompts_per_step"] * s["n"]
    return GRPOConfig(
        output_dir=out_dir, max_steps=steps, seed=seed, use_cpu=True, bf16=False, fp16=False,
        per_device_train_batch_size=batch, gradient_accumulation_steps=1, num_generations=s["n"],
        generation_batch_size=batch, num_iterations=1, max_completion_length=s["max_new_tokens"],
        temperature=s["temperature"], top_p=s["top_p"], top_k=0, beta=0.0,
        epsilon=s["clip_low"], epsilon_high=s["clip_high"], loss_type="dapo", scale_rewards="group",
        learning_rate=s["lr"], lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
        adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, max_grad_norm=s["max_grad_norm"],
        gradient_checkpointing=False, logging_steps=1, report_to="none", save_strategy="no",
        disable_tqdm=True, dataloader_num_workers=0, log_completions=False)


def arith_reward(stats: dict):
    """TRL reward function: the arith verifier on every completion; counts generated tokens
    (EOS included, as tcli's sampled_tokens) and its own seconds per step."""
    from tcli.verifiers.arith import verify_arith

    def reward(prompts, completions, completion_ids, answer, **_):
        t = time.perf_counter()
        out = [float(verify_arith(c, a, {})[0]) for c, a in zip(completions, answer)]
        stats["tokens"].append(sum(len(ids) for ids in completion_ids))
        stats["reward_s"].append(time.perf_counter() - t)
        return out

    reward.__name__ = "arith"
    return reward


def timed_trainer(stats: dict):
    """GRPOTrainer that also times its generation (for the breakdown only)."""
    from trl import GRPOTrainer

    class Timed(GRPOTrainer):
        def _generate_single_turn(self, *args, **kw):
            t = time.perf_counter()
            try:
                return super()._generate_single_turn(*args, **kw)
            finally:
                stats["generate_s"].append(time.perf_counter() - t)

    return Timed


def step_clock(stats: dict, baton: Baton):
    """A step runs from the "go" at its on_step_begin to the next step's on_step_begin (or the end
    of training): generation, rewards, loss, backward, optimizer and the step's logging."""
    from transformers import TrainerCallback

    class Clock(TrainerCallback):
        started = None

        def stop(self):
            if self.started is not None:
                stats["seconds"].append(time.perf_counter() - self.started)

        def on_step_begin(self, args, state, control, **kw):
            self.stop()
            baton.pause()
            self.started = time.perf_counter()

        def on_train_end(self, args, state, control, **kw):
            self.stop()

    return Clock()


def run_trl(a, s: dict) -> dict:
    """One TRL run in this process; per-step seconds and tokens."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(1)
    stats = {"seconds": [], "tokens": [], "reward_s": [], "generate_s": []}
    with open(a.data) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    ds = Dataset.from_list([{"prompt": r["prompt"], "answer": str(r["answer"])} for r in rows])
    tok = AutoTokenizer.from_pretrained(a.model)
    check_tokenizer(tok, rows[0]["prompt"])
    with tempfile.TemporaryDirectory() as out:
        trainer = timed_trainer(stats)(
            model=AutoModelForCausalLM.from_pretrained(a.model), processing_class=tok,
            reward_funcs=[arith_reward(stats)], args=trl_config(s, out, a.steps, a.seed),
            train_dataset=ds, callbacks=[step_clock(stats, Baton(a.baton))])
        if trainer.args.bf16 or getattr(trainer.model, "is_gradient_checkpointing", False):
            raise SystemExit("TRL side must train in fp32 without gradient checkpointing, as tcli")
        trainer.train()
    return {**stats, "threads": torch.get_num_threads()}


def check_tokenizer(tok, prompt: str) -> None:
    """TRL tokenises prompts with special tokens on; tcli's plain template without: the ids must
    agree, or the two sides would not see the same prompts."""
    with_special = tok(prompt)["input_ids"]
    plain = tok(prompt, add_special_tokens=False)["input_ids"]
    if with_special != plain:
        raise SystemExit(f"tokenizer adds special tokens ({with_special} vs {plain}): the sides "
                         "would see different prompts")


# ------------------------------------------------------------------------------ tcli side

def run_tcli(a, s: dict) -> dict:
    """``tcli loop --estimator grpo`` through the loop library in this process (eval off, no
    checkpoint before the last step); per-step seconds from its metrics.jsonl ``wall_time``."""
    import torch

    from tcli.config.loop import load_config, loop_flags
    from tcli.loop import Loop

    baton = Baton(a.baton)
    with tempfile.TemporaryDirectory() as tmp:
        flags = {"estimator": "grpo", "model": a.model, "train_data": a.data, "steps": a.steps,
                 "run_dir": os.path.join(tmp, "run"), "seed": a.seed, "eval_every": 0,
                 "save_every": 1_000_000, "keep_last": 1, "max_wall_seconds": 0.0}
        if any(f.param == "threads" for f in loop_flags()):
            flags["threads"] = 1
        loop = Loop(load_config(a.config, flags), log=lambda _: None,
                    on_step=lambda _: baton.pause())
        try:
            first = loop.start(resume=False)
            baton.pause()
            loop.run_steps(first)
        finally:
            loop.close()
        with open(os.path.join(tmp, "run", "metrics.jsonl")) as f:
            ms = [m for m in map(json.loads, f) if m.get("kind") == "train"]
    walls = [0.0] + [m["wall_time"] for m in ms]
    return {"seconds": [b - w for w, b in zip(walls, walls[1:])],
            "tokens": [m["sampled_tokens"] for m in ms],
            "sample_s": [m["seconds_sample"] for m in ms],
            "verify_s": [m["seconds_verify"] for m in ms],
            "train_s": [m["seconds_train"] for m in ms], "threads": torch.get_num_threads()}


SIDES = {"tcli": run_tcli, "trl": run_trl}


# ------------------------------------------------------------------------------ driver

def spawn(a, side: str, seed: int, tmp: str) -> dict:
    """Start one side's worker (one torch thread) with its two baton pipes."""
    go_r, go_w = os.pipe()
    ready_r, ready_w = os.pipe()
    out, log = os.path.join(tmp, f"{side}.json"), open(os.path.join(tmp, f"{side}.log"), "w")
    cmd = [sys.executable, os.path.abspath(__file__), "--side", side, "--json", out,
           "--baton", f"{go_r},{ready_w}", "--steps", str(a.steps), "--seed", str(seed),
           "--model", a.model, "--data", a.data, "--config", a.config]
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, **ENV_ONE_THREAD}, stdout=log,
                            stderr=subprocess.STDOUT, pass_fds=(go_r, ready_w))
    os.close(go_r)
    os.close(ready_w)
    return {"side": side, "proc": proc, "go": go_w, "ready": ready_r, "out": out, "log": log.name,
            "alive": True}


def wait_ready(w: dict) -> None:
    if os.read(w["ready"], 1) != b"r":  # EOF: the worker ran its last step (or failed)
        w["alive"] = False


def finish(w: dict) -> dict:
    os.close(w["go"])
    os.close(w["ready"])
    if w["proc"].wait() != 0:
        with open(w["log"]) as f:
            sys.stderr.write(f.read()[-6000:])
        raise SystemExit(f"{w['side']} worker exited {w['proc'].returncode}")
    with open(w["out"]) as f:
        return json.load(f)


def lockstep_round(a, r: int) -> dict[str, dict]:
    """Both sides start together, then run one step at a time by turns (who goes first flips
    every round)."""
    with tempfile.TemporaryDirectory() as tmp:
        order = ("tcli", "trl") if r % 2 == 0 else ("trl", "tcli")
        workers = [spawn(a, side, a.seed + r, tmp) for side in order]
        for w in workers:
            wait_ready(w)  # loaded and waiting before their first step
        while any(w["alive"] for w in workers):
            for w in workers:
                if w["alive"]:
                    os.write(w["go"], b"g")
                    wait_ready(w)
        return {w["side"]: finish(w) for w in workers}


def interleave(a) -> dict[str, list[dict]]:
    """``--rounds`` lockstep rounds of ``--steps`` steps per side, fresh from the warm start."""
    runs: dict[str, list[dict]] = {"tcli": [], "trl": []}
    for r in range(a.rounds):
        t = time.perf_counter()
        res = lockstep_round(a, r)
        for side in ("tcli", "trl"):
            runs[side].append(res[side])
        med = {k: statistics.median(v["seconds"][a.warmup:]) for k, v in res.items()}
        print(f"round {r + 1}/{a.rounds}: tcli {med['tcli']:.3f} s/step, trl {med['trl']:.3f} "
              f"s/step ({time.perf_counter() - t:.0f} s with start-up)", file=sys.stderr,
              flush=True)
    return runs


def versions() -> str:
    from importlib.metadata import PackageNotFoundError, version

    def v(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "-"

    return "  ".join(f"{n} {v(n)}" for n in ("torch", "transformers", "trl", "accelerate"))


def pooled(runs: list[dict], key: str, warmup: int) -> list[float]:
    return [v for r in runs for v in r[key][warmup:]]


def report(a, s: dict, runs: dict[str, list[dict]]) -> bool:
    """Medians, ratio, token check, breakdown and the target line."""
    sec = {k: statistics.median(pooled(v, "seconds", a.warmup)) for k, v in runs.items()}
    tok = {k: statistics.mean(pooled(v, "tokens", a.warmup)) for k, v in runs.items()}
    ratio = sec["tcli"] / sec["trl"]
    pairs = [x / y for t, r in zip(runs["tcli"], runs["trl"])
             for x, y in zip(t["seconds"][a.warmup:], r["seconds"][a.warmup:])]
    per_round = [statistics.median(t["seconds"][a.warmup:]) / statistics.median(
        r["seconds"][a.warmup:]) for t, r in zip(runs["tcli"], runs["trl"])]
    n = len(pooled(runs["tcli"], "seconds", a.warmup))
    print("\n" + versions())
    print(f"setting: {s['prompts_per_step']} prompts x {s['n']} samples, max_new_tokens "
          f"{s['max_new_tokens']}, T {s['temperature']}, lr {s['lr']}, one torch thread; "
          f"{a.rounds} lockstep rounds x {a.steps} steps, medians over {n} steps per side after "
          f"{a.warmup} warm-up steps per round")
    for k in ("tcli", "trl"):
        tps = tok[k] / sec[k]
        print(f"{k:5} {sec[k]:.3f} s/step   {tok[k]:.0f} generated tokens/step   "
              f"{tps:.0f} tokens/s")
    print(f"tokens/step tcli/trl: {tok['tcli'] / tok['trl']:.3f} (same sampling work ~ 1)")
    b = lambda side, key: statistics.median(pooled(runs[side], key, a.warmup))  # noqa: E731
    print(f"tcli breakdown (median s): sample {b('tcli', 'sample_s'):.3f}  verify "
          f"{b('tcli', 'verify_s'):.3f}  train {b('tcli', 'train_s'):.3f}")
    print(f"trl  breakdown (median s): generate {b('trl', 'generate_s'):.3f}  reward "
          f"{b('trl', 'reward_s'):.3f}  rest (logprobs, loss, backward, optimizer) "
          f"{sec['trl'] - b('trl', 'generate_s') - b('trl', 'reward_s'):.3f}")
    print(f"ratio per round: {' '.join(f'{x:.2f}' for x in per_round)};  median of the ratios of "
          f"adjacent steps: {statistics.median(pairs):.2f} (quartiles "
          f"{' '.join(f'{q:.2f}' for q in statistics.quantiles(pairs, n=4))})")
    print(f"torch threads: tcli {runs['tcli'][0]['threads']}, trl {runs['trl'][0]['threads']}")
    ok = ratio <= TARGET
    print(f"target tcli/trl s/step <= {TARGET}: {sec['tcli']:.3f} / {sec['trl']:.3f} = "
          f"{ratio:.2f}  {'PASS' if ok else 'FAIL'}")
    return ok


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=2, help="lockstep rounds (fresh processes)")
    ap.add_argument("--steps", type=int, default=20, help="training steps per side and round")
    ap.add_argument("--warmup", type=int, default=3, help="steps dropped at the start of a round")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model", default="runs/demo/sft", help="warm start (make demo builds it)")
    ap.add_argument("--data", default="runs/demo/data/train.jsonl")
    ap.add_argument("--config", default="examples/arith/demo.toml")
    ap.add_argument("--side", choices=sorted(SIDES), help=argparse.SUPPRESS)  # worker mode
    ap.add_argument("--json", help=argparse.SUPPRESS)
    ap.add_argument("--baton", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    for name in ("model", "data", "config"):
        setattr(a, name, os.path.join(ROOT, getattr(a, name)))
    if a.warmup >= a.steps:
        ap.error("--warmup must be below --steps")
    return a


def main(argv=None) -> int:
    a = parse(argv)
    s = demo_settings(a.config)
    if a.side:
        result = SIDES[a.side](a, s)
        with open(a.json, "w") as f:
            json.dump(result, f)
        return 0
    for path in (a.model, a.data):
        if not os.path.exists(path):
            raise SystemExit(f"{path} not found: build make demo's warm start first (make bench-peer "
                             "does)")
    return 0 if report(a, s, interleave(a)) else 1


if __name__ == "__main__":
    sys.exit(main())
