"""Write the tools task's prompt files: ``train.jsonl`` and ``test.jsonl`` (id, prompt, answer,
meta), multi-digit products and sums that the ``calc`` tool solves.

    python -m examples.tools.make_data --out runs/tools/data --n-train 2000 --n-test 200 --seed 0
"""

from __future__ import annotations

import os
import sys

if __package__ in (None, ""):  # run as a script: make `examples.tools` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from examples.arith.make_data import main as arith_main  # noqa: E402
from examples.tools.task import make_prompts  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    """arith's command line (the same flags and files) over this task's prompts."""
    return arith_main(argv, make_prompts, __doc__)


if __name__ == "__main__":
    sys.exit(main())
