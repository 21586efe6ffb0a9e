"""Benchmarks shipped inside the package, so that a clone or a wheel can train and evaluate on
real data without downloading anything.

Wherever prompt records are read (``tcli eval --data``, ``tcli sample-tree INPUT``, the loop's
``train_data`` / ``eval_data``) the value goes through :func:`resolve_data`: an existing path is
read as given, otherwise a name below picks the shipped file. When a value is both, the path
wins if it can hold records: a file, or a saved Hugging Face dataset directory, called ``gsm8k``
is read instead of the shipped test split (pass the shipped file's path, printed by
``tcli eval --list-benchmarks``, to pick that one); any other directory of that name (such as
``examples/gsm8k`` seen from ``examples/``) does not hide the benchmark. A path that hides a
benchmark is said once on stderr, since a stray file of that name would otherwise be scored as if it
were the benchmark. Provenance and licences:
``tcli/benchmarks/README.md``.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

from tcli.errors import UsageError
from tcli.io.datasets import is_saved_dataset

BENCHMARK_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                             "benchmarks")


@dataclass(frozen=True)
class Benchmark:
    """One shipped file: JSONL records with id, prompt, answer (choices when multiple choice)."""

    file: str          # file name in BENCHMARK_DIR
    rows: int          # records in the file
    task: str          # the verifier `--task auto` picks for every record of it
    description: str

    @property
    def path(self) -> str:
        return os.path.join(BENCHMARK_DIR, self.file)

    @property
    def multiple_choice(self) -> bool:
        return self.task == "choice"


BENCHMARKS: dict[str, Benchmark] = {
    "gsm8k": Benchmark("gsm8k_test.jsonl", 1319, "gsm8k",
                       "GSM8K test split: grade-school math word problems, integer answers"),
    "gsm8k_train": Benchmark("gsm8k_train.jsonl", 7473, "gsm8k",
                             "GSM8K train split (training prompts, same format as gsm8k)"),
    "math500": Benchmark("math500.jsonl", 500, "math",
                         "MATH-500: competition math, LaTeX answers checked symbolically"),
    "gsm_hard": Benchmark("gsm_hard.jsonl", 1319, "gsm8k",
                          "GSM-Hard: GSM8K test with large numbers; answers may be negative or "
                          "non-integer"),
    "amc23": Benchmark("amc23.jsonl", 40, "math", "AMC 12 2023 (12A and 12B), integer answers"),
    "aime24": Benchmark("aime24.jsonl", 30, "math", "AIME 2024 (I and II), integer answers 0-999"),
    "medqa": Benchmark("medqa_usmle4_test.jsonl", 1273, "choice",
                       "MedQA USMLE test split (English), 4 options A-D"),
    "medmcqa": Benchmark("medmcqa_dev.jsonl", 4183, "choice",
                         "MedMCQA dev split (its labelled evaluation split), 4 options A-D"),
    "mmlu_med": Benchmark("mmlu_med_test.jsonl", 1089, "choice",
                          "MMLU test, six medical subjects, 4 options A-D"),
}


def benchmark_names() -> str:
    return ", ".join(BENCHMARKS)


def resolve_data(spec: str) -> str:
    """The path to open for a prompt-data value: ``-`` (stdin) or an existing path as given,
    else the shipped file of that name; neither is a usage error that lists the names."""
    bench = BENCHMARKS.get(spec)
    if bench is None:
        if spec == "-" or os.path.exists(spec):
            return spec
        raise UsageError(f"prompt data {spec!r} is neither an existing file nor a shipped "
                         f"benchmark (one of: {benchmark_names()})")
    if os.path.isfile(spec) or is_saved_dataset(spec):  # a readable path wins over the name
        if spec not in _SAID_SHADOWED:  # said once: the same name read twice is one choice
            _SAID_SHADOWED.add(spec)
            sys.stderr.write(f"tcli: warning: reading {os.path.abspath(spec)}, not the shipped "
                             f"benchmark {spec!r} of that name\n")
        return spec
    return bench.path


_SAID_SHADOWED: set[str] = set()


def _size(path: str) -> str:
    n = os.path.getsize(path)
    return f"{n / 1e6:.1f} MB" if n >= 1e5 else f"{n / 1e3:.0f} KB"


def benchmark_table() -> str:
    """The shipped benchmarks as aligned text: name, rows, size, task, file, description."""
    head = ("name", "rows", "size", "task", "file", "description")
    rows = [head] + [(name, str(b.rows), _size(b.path), b.task, b.file, b.description)
                     for name, b in BENCHMARKS.items()]
    widths = [max(len(r[i]) for r in rows) for i in range(len(head) - 1)]
    right = {1, 2}  # numbers align right
    lines = ["  ".join([c.rjust(w) if i in right else c.ljust(w)
                        for i, (c, w) in enumerate(zip(r, widths))] + [r[-1]]) for r in rows]
    lines.append(f"files in {BENCHMARK_DIR} (provenance and licences: README.md there)")
    return "\n".join(lines) + "\n"
