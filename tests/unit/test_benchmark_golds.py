"""Every shipped benchmark is scored right on the default `tcli eval` path (`--task auto`, the
`auto` prompt template): each row's gold answer, given as the prompt asks for it, scores 1, and
another row's gold scores 0. A verifier that misreads a benchmark's golds would report a number
that looks like a model's accuracy and is not."""

from __future__ import annotations

import re

import orjson
import pytest

from tcli.io.benchmarks import BENCHMARKS
from tcli.prompts import template_name
from tcli.stages.verify import verify_records

_NAMED = re.compile(r"^[a-z]\s*=\s*")  # `x=5` is the gold 5 by another name


def _same(a, b) -> bool:
    return _NAMED.sub("", str(a).replace(" ", "")) == _NAMED.sub("", str(b).replace(" ", ""))


def _answered(row: dict, gold, sample_id: int, template: str) -> dict:
    """A rollout of ``row`` whose response gives ``gold`` as the template asks for it (plain:
    the way a model trained on plain prompts states it)."""
    if row.get("choices"):
        text = f"<answer>{gold}</answer>"
    elif template == "plain":
        text = f"Step by step. So the final answer is ${gold}$."
    else:
        text = f"So it is \\boxed{{{gold}}}."
    rec = {k: v for k, v in row.items() if k != "id"}
    rec.update(prompt_id=row["id"], sample_id=sample_id, text=text,
               prompt_template=template_name(row, template))
    return rec


@pytest.mark.parametrize("template", ["auto", "plain"])
@pytest.mark.parametrize("name", list(BENCHMARKS))
def test_gold_scores_1_and_another_rows_gold_scores_0(name, template):
    """auto: what eval asks for by default; plain: what a checkpoint trained on plain prompts
    records and eval then asks for (where `--task auto` sends numeric golds to gsm8k)."""
    bench = BENCHMARKS[name]
    if template == "plain" and bench.multiple_choice:
        pytest.skip("a plain prompt would not show the options (refused when sampling)")
    with open(bench.path, "rb") as f:
        rows = [orjson.loads(line) for line in f]
    assert len(rows) == bench.rows
    recs = []
    for i, row in enumerate(rows):
        recs.append(_answered(row, row["answer"], 0, template))
        other = rows[(i + 1) % len(rows)]["answer"]
        if not _same(other, row["answer"]):
            recs.append(_answered(row, other, 1, template))
    assert len(recs) > 1.5 * len(rows)  # most rows are checked both ways
    tasks = {bench.task, "gsm8k"} if template == "plain" else {bench.task}
    wrong = [(r["prompt_id"], r["sample_id"], r["answer"], r["verdict"])
             for r in verify_records(enumerate(recs, 1), name, task="auto")
             if r["reward"] != (1.0 if r["sample_id"] == 0 else 0.0)
             or r["verdict"]["task"] not in tasks]
    assert not wrong, f"{len(wrong)} misscored, first: {wrong[:3]}"


def test_limit_keeps_rows_spread_over_the_file(tmp_path):
    """`--limit N` (eval, the loop's eval.limit): N evenly spaced rows, the first always, each
    named by its own line for later errors; every row is still read and checked."""
    from tcli.errors import DataError
    from tcli.prompts import read_prompts, spread

    assert spread(10, 3) == [0, 3, 6] and spread(10, 1) == [0] and spread(3, 5) == [0, 1, 2]
    assert spread(1089, 6) == [0, 181, 363, 544, 726, 907] and spread(4, None) == [0, 1, 2, 3]
    for n, k in ((7, 7), (1000, 999), (5, 2)):
        rows = spread(n, k)
        assert len(set(rows)) == len(rows) == min(n, k) and rows == sorted(rows) and rows[-1] < n
    path = tmp_path / "p.jsonl"
    path.write_bytes(b"".join(orjson.dumps({"id": i, "prompt": "q", "answer": str(i)}) + b"\n"
                              for i in range(10)))
    origin: dict = {}
    kept = read_prompts(str(path), 3, origin=origin)
    assert [r["id"] for r in kept] == [0, 3, 6]
    assert [origin[id(r)] for r in kept] == [(str(path), 1), (str(path), 4), (str(path), 7)]
    subjects = {r["meta"]["subject"] for r in read_prompts("mmlu_med", 8)}
    assert len(subjects) == 6  # the first 8 rows are all anatomy
    with open(path, "ab") as f:
        f.write(b'{"id": 99, "prompt": "q"}\n')  # no answer, after every kept row
    with pytest.raises(DataError, match="answer"):
        read_prompts(str(path), 1)
