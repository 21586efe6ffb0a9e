"""Tiny local causal LMs for tests, examples and laptops: a Qwen3 config + a char-level tokenizer.

Nothing touches a hub: the tokenizer is built with the ``tokenizers`` library from an alphabet
(or a text sample) and the model is randomly initialised from a config, then both are saved with
``save_pretrained`` so that ``AutoModelForCausalLM`` / ``AutoTokenizer`` reload them.
"""

from __future__ import annotations

import string
from typing import Sequence

EOS = "<|endoftext|>"
PAD = "<|pad|>"
UNK = "<|unk|>"
DEFAULT_ALPHABET = string.ascii_letters + string.digits + string.punctuation + " \n"


def build_char_tokenizer(alphabet: str | None = None, text: str | None = None,
                         added_tokens: Sequence[str] = ()):
    """A character-level fast tokenizer: one token per character, plus eos/pad/unk, plus
    ``added_tokens``: strings encoded as one ordinary token each wherever they occur (the tags of
    a tool protocol, say, as real tokenizers have for theirs); they decode back to their text."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = sorted(set(alphabet or DEFAULT_ALPHABET) | set(text or ""))
    vocab = {PAD: 0, EOS: 1, UNK: 2}
    for ch in chars:
        vocab.setdefault(ch, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("(?m)."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=PAD, unk_token=UNK)
    fast.padding_side = "left"
    if added_tokens:
        fast.add_tokens([AddedToken(t, normalized=False, special=False) for t in added_tokens])
    return fast


def tiny_config(vocab_size: int, *, hidden: int = 128, layers: int = 4, heads: int = 4,
                kv_heads: int = 2, intermediate: int = 384, max_positions: int = 1024,
                eos_token_id: int = 1, pad_token_id: int = 0):
    from transformers import Qwen3Config

    return Qwen3Config(
        vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=hidden // heads,
        intermediate_size=intermediate, max_position_embeddings=max_positions,
        tie_word_embeddings=True, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
        bos_token_id=None, rope_theta=10000.0,
    )


def init_tiny_model(out_dir: str, *, seed: int = 0, alphabet: str | None = None,
                    text: str | None = None, added_tokens: Sequence[str] = (),
                    **config_kw) -> str:
    """Create and save a random tiny Qwen3 model with a char tokenizer; returns ``out_dir``."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    from tcli.models.checkpoint import check_checkpoint_target, save_pretrained_atomic
    from tcli.models.quiet import quiet_transformers

    check_checkpoint_target(out_dir, kind="policy")  # refuse before building anything
    quiet_transformers()
    tok = build_char_tokenizer(alphabet, text, added_tokens)
    cfg = tiny_config(len(tok), eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                      **config_kw)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.generation_config = GenerationConfig(eos_token_id=tok.eos_token_id,
                                               pad_token_id=tok.pad_token_id)
    save_pretrained_atomic(out_dir, model, tok, state={"step": 0, "policy_version": 0,
                                                      "made_by": "init-model"})
    return out_dir
