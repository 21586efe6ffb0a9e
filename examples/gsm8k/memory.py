#!/usr/bin/env python3
"""GPU memory of a recipe from first principles (no torch, no download): bytes per parameter for
weights, gradients and AdamW state, the LoRA adapters' share, the vllm KV cache and a rough
activation estimate, from a model's config.json values.

    python examples/gsm8k/memory.py                       # the tables in examples/*/README.md
    python examples/gsm8k/memory.py --config /models/Qwen3-1.7B/config.json

tcli trains with fp32 master weights (``--bf16`` is autocast: bf16 matmuls, fp32 weights, fp32
gradients, fp32 AdamW moments); a LoRA base stays fp32 and frozen; vllm holds bf16 weights.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass

GB = 1e9

# Published config.json values (Hugging Face Hub): hidden_size, num_hidden_layers,
# num_attention_heads, num_key_value_heads, head_dim, intermediate_size, vocab_size,
# tie_word_embeddings; qk_norm = Qwen3's q_norm/k_norm, qkv_bias = Qwen2's q/k/v biases.
PRESETS = {
    "Qwen3-1.7B": dict(hidden_size=2048, num_hidden_layers=28, num_attention_heads=16,
                       num_key_value_heads=8, head_dim=128, intermediate_size=6144,
                       vocab_size=151936, tie_word_embeddings=True, qk_norm=True),
    "Qwen3-8B": dict(hidden_size=4096, num_hidden_layers=36, num_attention_heads=32,
                     num_key_value_heads=8, head_dim=128, intermediate_size=12288,
                     vocab_size=151936, tie_word_embeddings=False, qk_norm=True),
    "Qwen2.5-Math-7B": dict(hidden_size=3584, num_hidden_layers=28, num_attention_heads=28,
                            num_key_value_heads=4, head_dim=128, intermediate_size=18944,
                            vocab_size=152064, tie_word_embeddings=False, qkv_bias=True),
}


@dataclass(frozen=True)
class Arch:
    h: int      # hidden_size
    L: int      # num_hidden_layers
    H: int      # attention heads
    K: int      # key/value heads
    d: int      # head_dim
    I: int      # intermediate_size (SwiGLU: gate, up, down)
    V: int      # vocab_size
    tied: bool
    qk_norm: bool = False
    qkv_bias: bool = False

    @classmethod
    def from_config(cls, c: dict) -> "Arch":
        h, H = c["hidden_size"], c["num_attention_heads"]
        return cls(h, c["num_hidden_layers"], H, c.get("num_key_value_heads", H),
                   c.get("head_dim") or h // H, c["intermediate_size"], c["vocab_size"],
                   bool(c.get("tie_word_embeddings", False)),
                   qk_norm=c.get("qk_norm", c.get("model_type") == "qwen3"),
                   qkv_bias=c.get("qkv_bias", c.get("model_type") == "qwen2"))

    def linears(self) -> list[tuple[int, int]]:
        """(in, out) of every linear layer of one decoder layer."""
        h, q, kv, i = self.h, self.H * self.d, self.K * self.d, self.I
        return [(h, q), (h, kv), (h, kv), (q, h), (h, i), (h, i), (i, h)]

    def layer_params(self) -> int:
        p = sum(a * b for a, b in self.linears()) + 2 * self.h          # + two RMSNorms
        p += 2 * self.d if self.qk_norm else 0
        p += (self.H + 2 * self.K) * self.d if self.qkv_bias else 0
        return p

    def params(self) -> int:
        emb = self.V * self.h
        return emb * (1 if self.tied else 2) + self.L * self.layer_params() + self.h

    def lora_params(self, rank: int) -> int:
        """all-linear LoRA: A (r x in) and B (out x r) per linear of every decoder layer."""
        return self.L * rank * sum(a + b for a, b in self.linears())

    def kv_bytes_per_token(self, nbytes: int = 2) -> int:
        return 2 * self.L * self.K * self.d * nbytes              # K and V, every layer

    def act_bytes_per_token_layer(self) -> int:
        """Tensors kept for backward under bf16 autocast, per layer and token (counted with
        saved_tensors_hooks on a small Qwen3, tests/unit/test_recipes.py): 30h (fp32 residual stream and
        RMSNorm internals, bf16 matmul inputs), 10d(H+K) (q/k/v, q/k norm, rotary, attention
        output), 8I (gate, up, silu(gate), their product). SDPA/flash attention: no seq^2 term."""
        return 30 * self.h + 10 * self.d * (self.H + self.K) + 8 * self.I

    def activations(self, tokens: int, checkpointing: bool) -> int:
        per_layer = self.act_bytes_per_token_layer() * tokens
        if not checkpointing:
            return self.L * per_layer
        return self.L * 4 * self.h * tokens + per_layer  # fp32 layer inputs + one layer recomputed


def trainer_bytes(a: Arch, *, ranks: int = 1, lora_rank: int = 0, tokens: int = 8192,
                  checkpointing: bool = True) -> dict[str, float]:
    """Per-GPU bytes of the trainer: fp32 weights (4), fp32 grads (4), AdamW m and v (2 x 4)."""
    P = a.params()
    if lora_rank:
        n = a.lora_params(lora_rank)
        states = {"base weights fp32 (frozen)": 4 * P / ranks,
                  "adapter weights+grads+AdamW (16 B)": 16 * n / ranks}
    else:
        states = {"weights fp32": 4 * P / ranks, "grads fp32": 4 * P / ranks,
                  "AdamW m+v fp32": 8 * P / ranks}
        if ranks > 1:  # FSDP2: one decoder layer gathered at a time (+ the next, prefetched)
            states["gathered layers (2, fp32)"] = 2 * 4 * a.layer_params()
    states["activations"] = a.activations(tokens, checkpointing)
    return states


def sampler_bytes(a: Arch, *, sequences: int = 256, seq_tokens: int = 768, engine: str = "vllm",
                  batch_tokens: int = 65536) -> dict[str, float]:
    """vllm: its own bf16 weights plus the KV cache of every sequence in flight at once (with less,
    vllm runs fewer at a time). hf: samples from the trainer's fp32 module (no second copy), its
    KV cache bounded by batch_tokens, in fp32."""
    if engine == "hf":
        return {"KV cache fp32 (batch_tokens)": a.kv_bytes_per_token(4) * batch_tokens}
    return {"weights bf16": 2 * a.params(),
            "KV cache bf16": a.kv_bytes_per_token() * sequences * seq_tokens}


def show(title: str, parts: dict[str, float]) -> float:
    total = sum(parts.values())
    print(f"  {title}: {total / GB:.1f} GB")
    for k, v in parts.items():
        print(f"    {k:<36} {v / GB:7.2f} GB")
    return total


RECIPES = [  # (model, title, trainer kwargs, sampler kwargs): the recipes in examples/*/
    ("Qwen3-1.7B", "gsm8k/config.toml, full fine-tune, 1 GPU", {}, {}),
    ("Qwen3-1.7B", "gsm8k/pipeline.sh, full fine-tune, FSDP on 4 GPUs (per GPU)", dict(ranks=4), {}),
    ("Qwen3-8B", "gsm8k/lora.toml, LoRA r=64, 1 GPU", dict(lora_rank=64), dict(engine="hf")),
    ("Qwen3-1.7B", "math/config.toml, full fine-tune, 1 GPU", {}, dict(seq_tokens=1280)),
    ("Qwen2.5-Math-7B", "math/lora.toml, LoRA r=64, 1 GPU", dict(lora_rank=64), dict(engine="hf")),
    ("Qwen2.5-Math-7B", "math/pipeline.sh, full fine-tune, FSDP on 8 GPUs (per GPU)",
     dict(ranks=8), dict(seq_tokens=1280)),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", help="a model's config.json (default: the recipes' presets)")
    ap.add_argument("--ranks", type=int, default=1)
    ap.add_argument("--lora-rank", type=int, default=0)
    ap.add_argument("--tokens", type=int, default=8192, help="micro_batch_tokens")
    ap.add_argument("--sequences", type=int, default=256, help="prompts_per_step x n")
    ap.add_argument("--seq-tokens", type=int, default=768, help="prompt + max_new_tokens")
    args = ap.parse_args()
    if args.config:
        with open(args.config) as f:
            runs = [(args.config, Arch.from_config(json.load(f)),
                     dict(ranks=args.ranks, lora_rank=args.lora_rank, tokens=args.tokens),
                     dict(sequences=args.sequences, seq_tokens=args.seq_tokens))]
    else:
        runs = [(f"{m}: {t}", Arch.from_config(PRESETS[m]), tk, sk) for m, t, tk, sk in RECIPES]
    for title, a, tk, sk in runs:
        print(f"{title}\n  params {a.params() / 1e9:.3f} B, LoRA r=64 all-linear "
              f"{a.lora_params(64) / 1e6:.1f} M, KV {a.kv_bytes_per_token() / 1024:.0f} KiB/token, "
              f"activations {a.act_bytes_per_token_layer() / 1024:.1f} KiB/token/layer")
        show(f"trainer (grad checkpointing, {tk.get('tokens', 8192)} tokens/micro-batch)", trainer_bytes(a, **tk))
        show(f"{sk.get('engine', 'vllm')} sampler", sampler_bytes(a, **sk))


if __name__ == "__main__":
    main()
