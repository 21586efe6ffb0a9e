"""Plots from metrics.jsonl: reward and eval accuracy vs step and vs wall time (matplotlib, Agg)."""

from __future__ import annotations

import io
import math
import os
from typing import Callable, Sequence

import orjson

from tcli.io import write_atomic_bytes


def read_metrics(run_dir: str, warn: Callable[[str], None] = lambda s: None) -> list[dict]:
    """The well-formed records of ``run_dir/metrics.jsonl``. A torn last line (a kill during an
    append) is dropped quietly; a corrupt line elsewhere is skipped with a warning, and the valid
    lines after it are kept."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path, "rb") as f:
        lines = f.read().split(b"\n")
    out = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rec = orjson.loads(line)
        except orjson.JSONDecodeError:
            rec = None
        if isinstance(rec, dict):
            out.append(rec)
        elif i < len(lines) - 1:
            warn(f"{path}:{i + 1}: skipping a corrupt metrics line")
    return out


FORMATS = (".png", ".pdf", ".svg")


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _series(metrics: list[dict], kind: str, key: str, x: str) -> tuple[list, list]:
    pts = [(m[x], m[key]) for m in metrics
           if m.get("kind") == kind and _number(m.get(key)) and _number(m.get(x))]
    return [p[0] for p in pts], [p[1] for p in pts]


def run_labels(run_dirs: Sequence[str]) -> list[str]:
    """One distinct legend label per run: the last path component, or as many of the last ones
    as it takes to tell the runs apart (runs/demo/tempo and runs/tools/tempo are demo/tempo and
    tools/tempo, not one "tempo" drawn over the other)."""
    parts = [os.path.normpath(os.path.abspath(d)).split(os.sep) for d in run_dirs]
    distinct = {tuple(p) for p in parts}
    k = 1
    while len({p[-k:] for p in distinct}) < len(distinct):
        k += 1
    return _numbered(["/".join(p[-k:]) for p in parts])  # numbered: one directory given twice


def _numbered(names: Sequence[str]) -> list[str]:
    """``names`` with a repeat numbered (a, a (2), ...), so no curve replaces another."""
    seen: dict[str, int] = {}
    out = []
    for n in names:
        seen[n] = seen.get(n, 0) + 1
        out.append(n if seen[n] == 1 else f"{n} ({seen[n]})")
    return out


def _legend(fig, axes) -> None:
    """One legend entry per curve drawn in any panel (a run with eval records alone too)."""
    legend: dict = {}
    for ax in axes.ravel():
        for handle, name in zip(*ax.get_legend_handles_labels()):
            legend.setdefault(name, handle)
    if legend:
        fig.legend(list(legend.values()), list(legend), loc="upper center",
                   ncol=min(len(legend), 4))


def plot_runs(run_dirs: Sequence[str], out_png: str, labels: Sequence[str] | None = None,
              groups: dict[str, list[str]] | None = None,
              warn: Callable[[str], None] = lambda s: None) -> int:
    """One line per run, or with ``groups`` (label -> run dirs) the mean with a min-max band;
    the figure's format follows the suffix (png, pdf or svg) and is written as any output file
    (§2.4: complete or not at all, through a symlink, never over a directory). Returns the
    number of curves drawn (records whose value or x is not a finite number are left out)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    panels = [("train", "reward_mean", "step"), ("train", "reward_mean", "wall_time"),
              ("eval", "accuracy", "step"), ("eval", "accuracy", "wall_time")]
    if groups is None:
        groups = dict(zip(run_labels(run_dirs) if not labels else _numbered(labels),
                          ([d] for d in run_dirs)))
    metrics = {d: read_metrics(d, warn) for dirs in groups.values() for d in dirs}
    color = {label: f"C{i % 10}" for i, label in enumerate(groups)}  # one per run in every panel
    drawn = 0
    for ax, (kind, key, x) in zip(axes.ravel(), panels):
        for label, dirs in groups.items():
            curves = [_series(metrics[d], kind, key, x) for d in dirs]
            curves = [c for c in curves if c[0]]
            if not curves:
                continue
            drawn += 1
            if len(curves) == 1:
                xs, ys = curves[0]  # a single point is drawn only as a marker
                ax.plot(xs, ys, marker="." if kind == "eval" or len(xs) == 1 else None,
                        label=label, color=color[label])
                continue
            # common grid, mean and spread across seeds
            lo = max(c[0][0] for c in curves)
            hi = min(c[0][-1] for c in curves)
            grid = np.linspace(lo, hi, 50) if hi > lo else np.array([lo])
            ys = np.array([np.interp(grid, c[0], c[1]) for c in curves])
            line, = ax.plot(grid, ys.mean(0), marker="." if len(grid) == 1 else None,
                            label=f"{label} (n={len(curves)})", color=color[label])
            ax.fill_between(grid, ys.min(0), ys.max(0), alpha=0.2, color=line.get_color())
        ax.set_xlabel("step" if x == "step" else "wall time (s)")
        ax.set_ylabel("train reward (mean)" if key == "reward_mean" else "eval accuracy")
        ax.grid(alpha=0.3)
    _legend(fig, axes)
    fig.tight_layout(rect=(0, 0, 1, 0.94))
    if not drawn:  # nothing to show: no file at all rather than four empty panels
        plt.close(fig)
        return 0
    ext = os.path.splitext(out_png)[1].lower()
    buf = io.BytesIO()  # drawn in memory, then written as every output is (tcli.io.target)
    fig.savefig(buf, format=ext[1:] if ext in FORMATS else "png", dpi=90)
    plt.close(fig)
    write_atomic_bytes(out_png, buf.getvalue())
    return drawn
