"""Which parameters a measured policy gradient spans, and the gradient as one flat vector
(``Trainer.loss_gradient``; docs/design.md §10).

On a CPU the whole gradient of a real model is costly to take hundreds of times; a subset that
every estimate and the reference share keeps the comparison fair (the same coordinates, the same
loss) and lets the backward stop early: parameters outside the subset do not require gradients
while it runs, so autograd never goes below the first selected block.
"""

from __future__ import annotations

import re
from contextlib import contextmanager

import numpy as np

from tcli.errors import UsageError

_BLOCK = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def parse_selection(spec: str) -> int | None:
    """``all`` -> None, ``last:K`` -> K (K >= 1); anything else is a usage error."""
    if spec == "all":
        return None
    m = re.fullmatch(r"last:(\d+)", spec)
    if not m or int(m.group(1)) < 1:
        raise UsageError(f"parameter selection must be all or last:K (K >= 1), got {spec!r}")
    return int(m.group(1))


def select_parameters(model, spec: str = "all") -> list[tuple[str, object]]:
    """(name, parameter) pairs, in the model's order, of the trainable parameters ``spec`` names.

    ``last:K``: the last K decoder blocks (``layers.N.``), the final norm and the output head, but
    not the input embedding, nor a head tied to it: that weight's gradient also flows in at the
    bottom of the model, so it would need the backward through every block."""
    last = parse_selection(spec)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if last is None:
        return named
    blocks = [int(m.group(1)) for n, _ in named if (m := _BLOCK.search(n))]
    if not blocks:
        raise UsageError(f"parameter selection {spec}: the model has no numbered blocks "
                         "(layers.N.); use all")
    first = max(blocks) - last + 1
    emb = model.get_input_embeddings()
    emb_ids = {id(emb.weight)} if emb is not None else set()
    out = []
    for n, p in named:
        m = _BLOCK.search(n)
        if (m and int(m.group(1)) >= first) or (not m and id(p) not in emb_ids):
            out.append((n, p))
    return out


@contextmanager
def only_grad(model, params):
    """Within: only ``params`` require gradients (the others are restored on exit)."""
    keep = {id(p) for p in params}
    off = [p for p in model.parameters() if p.requires_grad and id(p) not in keep]
    for p in off:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in off:
            p.requires_grad_(True)


def flat_gradient(params) -> np.ndarray:
    """The ``.grad`` of ``params`` as one float64 vector (zeros where a gradient is None)."""
    parts = []
    for p in params:
        g = p.grad
        parts.append(np.zeros(p.numel()) if g is None
                     else g.detach().to("cpu").double().reshape(-1).numpy())
    return np.concatenate(parts) if parts else np.zeros(0)
