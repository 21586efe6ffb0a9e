"""The hf engine and trainer on one GPU: what the graphed decode step buys, and a loop step.

Nothing is downloaded: models are random weights with the published shapes of SmolLM2-135M
(Llama) and Qwen3-0.6B, and the tokenizer is a local word-level one with the model's vocabulary
size (examples/real/demo.toml's loop step runs on it). Rows printed (the SmolLM2 shape's first,
so a run cut short still has the targets; the Qwen3 shape's decode rows last):

- decode tokens/s, eager vs graphed (``--cuda-graphs off|on``), one prompt forked to 16/64/128/256
  rows, 64 tokens each (EOS masked: every row decodes to the end);
- independent vs tree sampling (width 4, depth 3) per leaf, graphed;
- entropy trees (``--branch entropy``, width 2, depth 3) per leaf: eager, graphed with a host
  check per token, graphed with a check every 8 tokens (drawn ahead, taken back after a split);
- train-step tokens/s with and without prefix sharing (bf16 autocast, trees of bench_train.py);
- one ``tcli loop`` step of examples/real/demo.toml (16 prompts x 8 samples, <= 48 tokens, TEMPO)
  on the SmolLM2 shape, split into sample / verify / train: as the file sets it (1024-token
  micro-batches, sized for a laptop's memory) and on a GPU also with the GPU recipes' 8192
  (examples/gsm8k/config.toml; the same gradient in fewer, larger forwards), the target's row;
- a loop step of GRPO and of TEMPO on entropy trees with expand-tree, per sampled token (what
  decides whether the tree method can keep up at equal wall time; docs/results.md).

Targets (PASS/FAIL lines, exit 1 on a FAIL): graphed decode >= 5x eager tokens/s at batch 128 on
the 135M shape; loop step <= 0.35 s. ``--device cpu --small`` runs tiny shapes, skips the graph
rows and the targets (a smoke test that the script works).

    python bench/bench_gpu.py [--device cuda] [--small]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SMOLLM2 = dict(arch="llama", hidden_size=576, num_hidden_layers=30, num_attention_heads=9,
               num_key_value_heads=3, intermediate_size=1536, vocab_size=49152,
               max_position_embeddings=8192, rope_theta=100000.0, rms_norm_eps=1e-5,
               tie_word_embeddings=True)
QWEN3_06B = dict(arch="qwen3", hidden_size=1024, num_hidden_layers=28, num_attention_heads=16,
                 num_key_value_heads=8, head_dim=128, intermediate_size=3072, vocab_size=151936,
                 max_position_embeddings=40960, rope_theta=1000000.0, rms_norm_eps=1e-6,
                 tie_word_embeddings=True)
SMALL = dict(arch="llama", hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, intermediate_size=128, vocab_size=512,
             max_position_embeddings=2048, rope_theta=10000.0, rms_norm_eps=1e-5,
             tie_word_embeddings=True)
TARGET_SPEEDUP, TARGET_LOOP_S = 5.0, 0.35


def tokenizer(vocab_size: int):
    """A word-level tokenizer of exactly ``vocab_size`` ids: characters, then filler words."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from tcli.models.tiny import DEFAULT_ALPHABET

    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2}
    for ch in sorted(set(DEFAULT_ALPHABET)):
        vocab.setdefault(ch, len(vocab))
    while len(vocab) < vocab_size:
        vocab[f"<w{len(vocab)}>"] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("(?m)."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>",
                                   unk_token="<unk>")
    fast.padding_side = "left"
    return fast


def make_model(out: str, shape: dict, seed: int = 0) -> str:
    """A random-weight checkpoint of ``shape`` with the local tokenizer, saved to ``out``."""
    import torch
    from transformers import LlamaConfig, Qwen3Config

    torch.manual_seed(seed)
    kw = {k: v for k, v in shape.items() if k != "arch"}
    cfg = (LlamaConfig if shape["arch"] == "llama" else Qwen3Config)(
        bos_token_id=1, eos_token_id=1, pad_token_id=0, **kw)
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_config(cfg).save_pretrained(out)
    tokenizer(shape["vocab_size"]).save_pretrained(out)
    return out


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def decode_rate(model: str, device: str, graphs: str, rows: int, tokens: int) -> float:
    """Generated tokens/s of one prompt forked to ``rows`` rows (best of two calls)."""
    from tcli.engines.hf import HFEngine
    from tcli.engines.sampling import SamplingConfig

    engine = HFEngine(model, device=device, dtype="bfloat16", cuda_graphs=graphs)
    cfg = SamplingConfig(temperature=1.0, max_new_tokens=tokens, min_new_tokens=tokens, seed=0)
    prompt = [list(range(3, 35))]
    best = 0.0
    for _ in range(2):  # the first call captures the graphs and warms the allocator
        engine.generated_tokens = 0
        _sync(device)
        t0 = time.perf_counter()
        engine.generate(prompt, rows, cfg)
        _sync(device)
        best = max(best, engine.generated_tokens / (time.perf_counter() - t0))
    return best


def per_leaf(model: str, device: str, graphs: str, tokens: int) -> dict:
    """Seconds per leaf: 64 independent samples vs a width-4 depth-3 tree (64 leaves)."""
    from tcli.engines.hf import HFEngine
    from tcli.engines.sampling import SamplingConfig

    engine = HFEngine(model, device=device, dtype="bfloat16", cuda_graphs=graphs)
    cfg = SamplingConfig(temperature=1.0, max_new_tokens=tokens, min_new_tokens=tokens, seed=0)
    prompts = [list(range(3, 35)), list(range(40, 60))]
    out = {}
    for name, run in (("independent", lambda: engine.generate(prompts, 64, cfg)),
                      ("tree", lambda: engine.sample_tree(prompts, 4, 3, tokens // 3, cfg))):
        run()
        _sync(device)
        t0 = time.perf_counter()
        run()
        _sync(device)
        out[name] = (time.perf_counter() - t0) / (2 * 64)
    return out


def entropy_per_leaf(model: str, device: str, tokens: int, cuda: bool) -> dict:
    """Seconds per leaf of entropy trees over 16 prompts (width 2, depth 3: 8 leaves each; random
    weights are near uniform, so every path splits after each ``tokens // 6`` tokens)."""
    from tcli.engines.hf import HFEngine
    from tcli.engines.sampling import EntropyRule, SamplingConfig

    cfg = SamplingConfig(temperature=1.0, max_new_tokens=tokens, min_new_tokens=tokens, seed=0)
    rule = EntropyRule(2, 3, 0.3, max(1, tokens // 6))
    prompts = [list(range(3 + i, 30 + i)) for i in range(16)]
    ways = {"eager": ("off", 1), "eager every-8": ("off", 8)} if not cuda else \
        {"eager": ("off", 1), "graphed per-token": ("on", 1), "graphed every-8": ("on", 8)}
    out = {}
    for name, (graphs, every) in ways.items():
        engine = HFEngine(model, device=device, dtype="bfloat16", cuda_graphs=graphs,
                          stop_every=every)
        engine.sample_entropy_tree(prompts, rule, cfg)
        _sync(device)
        t0 = time.perf_counter()
        leaves = engine.sample_entropy_tree(prompts, rule, cfg)
        _sync(device)
        out[name] = (time.perf_counter() - t0) / sum(len(x) for x in leaves)
    return out


def train_rates(model: str, device: str, small: bool) -> dict:
    """train-step tokens/s (response tokens per second) with and without prefix sharing."""
    import numpy as np

    from bench.bench_train import _samples, tree_rollouts
    from tcli.config.stages import TrainOptions
    from tcli.train.trainer import Trainer

    rng = np.random.default_rng(0)
    pairs = tree_rollouts(rng, 2 if small else 8, 64 if small else 256, seg=8 if small else 32)
    samples = _samples(pairs, rng)
    tokens = sum(len(r) for _, r in pairs)
    out = {}
    for share in (False, True):
        tr = Trainer(model, TrainOptions(lr=1e-6, micro_batch_tokens=4096, share_prefix=share,
                                         device=device, bf16=device.startswith("cuda")))
        tr.step(samples)
        _sync(device)
        t0 = time.perf_counter()
        tr.step(samples)
        _sync(device)
        out["shared" if share else "per-sequence"] = tokens / (time.perf_counter() - t0)
        del tr
    return out


def loop_step(model: str, device: str, small: bool, micro_batch_tokens: int = 0,
              **method) -> tuple[dict, int]:
    """Stage seconds of one demo loop step (the second of two: the first warms up) and the
    tokens it sampled. Every group is trained on (``filter_groups`` off: a random model's groups
    would all be dropped); ``micro_batch_tokens``: instead of the file's; ``method``: loop
    settings that replace the file's (estimator, sampling mode, expand)."""
    from examples.real.make_data import make_prompts, write_jsonl
    from tcli.config.loop import load_config
    from tcli.loop import run_loop

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    records: list[dict] = []
    with tempfile.TemporaryDirectory() as d:
        write_jsonl(os.path.join(d, "train.jsonl"), make_prompts(64, 0, "train"))
        write_jsonl(os.path.join(d, "test.jsonl"), make_prompts(8, 1, "test"))
        flags = dict(model=model, train_data=os.path.join(d, "train.jsonl"),
                     eval_data=os.path.join(d, "test.jsonl"), run_dir=os.path.join(d, "run"),
                     steps=2, max_wall_seconds=0, eval_every=1000, filter_groups=False,
                     train_device=device, bf16=device.startswith("cuda"))
        if small:  # n in independent mode only: a tree's leaves come from width and depth
            flags.update(prompts_per_step=4, max_new_tokens=8,
                         **({} if method.get("mode") == "tree" else {"n": 4}))
        if micro_batch_tokens:
            flags.update(micro_batch_tokens=micro_batch_tokens)
        cfg = load_config(os.path.join(root, "examples/real/demo.toml"), {**flags, **method})
        run_loop(cfg, log=lambda _: None, on_step=records.extend)
    rec = [r for r in records if r.get("kind") == "train"][-1]
    return ({k[len("seconds_"):]: v for k, v in rec.items() if k.startswith("seconds_")},
            rec["sampled_tokens"])


def _target(name: str, ok: bool, detail: str) -> bool:
    print(f"target {name}: {detail} {'PASS' if ok else 'FAIL'}", flush=True)
    return ok


def decode_rows(name: str, model: str, device: str, small: bool) -> bool:
    """Decode tokens/s eager (and graphed on CUDA) per batch size; the 135M target at 128."""
    cuda, ok = device.startswith("cuda"), True
    for rows in ((4, 16) if small else (16, 64, 128, 256)):
        rates = {"eager": decode_rate(model, device, "off", rows, 8 if small else 64)}
        if cuda:
            rates["graphed"] = decode_rate(model, device, "on", rows, 8 if small else 64)
        print(f"decode {name} batch {rows}: " + ", ".join(
            f"{k} {v:,.0f} tok/s" for k, v in rates.items())
            + (f", x{rates['graphed'] / rates['eager']:.1f}" if cuda else ""), flush=True)
        if cuda and rows == 128 and name == "smollm2-135m":
            ok &= _target("graphed decode >= 5x eager (135M, batch 128)",
                          rates["graphed"] >= TARGET_SPEEDUP * rates["eager"],
                          f"x{rates['graphed'] / rates['eager']:.2f}")
    return ok


def loop_rows(model: str, device: str, small: bool) -> bool:
    """The demo loop step as demo.toml sets it and (CUDA) with 8192-token micro-batches."""
    cuda, ok = device.startswith("cuda"), True
    for micro in (0, 8192) if cuda else (0,):
        sec, _ = loop_step(model, device, small, micro)
        step = sum(v for k, v in sec.items() if k != "write")
        print(f"loop step, {micro or 'demo.toml'} micro-batch tokens: {step:.3f} s ("
              + ", ".join(f"{k} {v:.3f}" for k, v in sec.items()) + ")", flush=True)
    if cuda and not small:
        ok &= _target("loop step <= 0.35 s", step <= TARGET_LOOP_S, f"{step:.3f} s")
    return ok


def method_rows(model: str, device: str, small: bool) -> None:
    """A loop step of GRPO and of TEMPO on entropy trees with expand-tree (docs/results.md, "A
    regime for tree credit": 4-leaf trees + 120 tokens per prompt), 8192-token micro-batches on
    a GPU: seconds per thousand sampled tokens, what decides a comparison at equal wall time."""
    expand = dict(estimator="tempo", mode="tree", width=2, depth=2, branch="entropy",
                  expand_tokens=16 if small else 120)
    per_k = {}
    for name, method in (("grpo", dict(estimator="grpo")), ("tempo-entropy-expand", expand)):
        sec, tokens = loop_step(model, device, small, 8192 if device.startswith("cuda") else 0,
                                **method)
        step = sum(v for k, v in sec.items() if k != "write")
        per_k[name] = step / max(tokens, 1) * 1e3
        print(f"loop step {name}: {step:.3f} s, {tokens} sampled tokens, "
              f"{per_k[name]:.3f} s per 1k tokens (sample {sec.get('sample', 0):.3f}, "
              f"train {sec.get('train', 0):.3f})", flush=True)
    print(f"loop step per sampled token, tempo-entropy-expand / grpo: "
          f"x{per_k['tempo-entropy-expand'] / per_k['grpo']:.2f}", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--small", action="store_true", help="tiny shapes (a CPU smoke test)")
    args = ap.parse_args()
    import torch

    from tcli.models.quiet import quiet_transformers

    quiet_transformers()
    cuda = args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        print("bench_gpu: no CUDA device (use --device cpu --small)", file=sys.stderr)
        return 2
    tokens = 8 if args.small else 64
    with tempfile.TemporaryDirectory() as d:  # the targets' rows first, the 0.6B shape last
        name, shape = ("small", SMALL) if args.small else ("smollm2-135m", SMOLLM2)
        first = make_model(os.path.join(d, name), shape)
        ok = decode_rows(name, first, args.device, args.small)
        ok &= loop_rows(first, args.device, args.small)
        leaf = per_leaf(first, args.device, "on" if cuda else "off", tokens)
        print("per leaf: " + ", ".join(f"{k} {v * 1e3:.2f} ms" for k, v in leaf.items()), flush=True)
        leaf = entropy_per_leaf(first, args.device, tokens, cuda)
        print("entropy tree per leaf: " + ", ".join(f"{k} {v * 1e3:.2f} ms"
                                                   for k, v in leaf.items()), flush=True)
        rates = train_rates(first, args.device, args.small)
        print("train-step: " + ", ".join(f"{k} {v:,.0f} tok/s" for k, v in rates.items()),
              flush=True)
        method_rows(first, args.device, args.small)
        if not args.small:
            ok &= decode_rows("qwen3-0.6b", make_model(os.path.join(d, "qwen3"), QWEN3_06B),
                              args.device, args.small)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
