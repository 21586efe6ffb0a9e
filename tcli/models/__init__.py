"""Model helpers (torch/transformers are imported inside functions, never at package import)."""
