"""Models and checkpoints (torch/transformers are imported inside functions, never at package import).

- ``load``: check a model directory; load config, weights (training or inference), tokenizer
- ``checkpoint``: write checkpoints atomically and safely; read their state and optimizer
- ``logprobs``: teacher-forced log-probs of response tokens
- ``tiny``: random tiny models for tests and examples
- ``quiet``: silence transformers' progress bars and advisories
"""
