"""Verify without the round-trip tax: bounded verifiers run in the caller's process, everything
else travels to workers in chunks sized by measured work; the per-answer timeout still holds."""

from __future__ import annotations

import random
import sys
import time

import pytest

from conftest import ADVERSARIAL, children, count_pool_messages, work
from tcli.stages import verify as stage
from tcli.stages.verify import start_pool, verify_records
from tcli.verifiers.pool import DeadlinePool, Failure

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="fork, /proc")

# inputs built to make regexes and number parsing work hard (besides conftest.ADVERSARIAL)
CRAFTED = {
    "answer tags": "<answer>" * 2000, "open tags": "<answer>x" * 2000, "commas": "1,111" * 4000,
    "exponents": "1e" * 8000, "dots": "1." * 8000, "minus": "-" * 16000 + "1",
    "answer is": "answer is " * 2000, "dollars": "$\\" * 8000, "fracs": "\\frac{" * 3000,
    "boxed space": "\\boxed " * 3000, "hashes": "####" * 4000, "brackets": "\\[" * 8000,
    "mixed": "answer is \\[ $$ " * 1000, "newlines": "\n" * 16000, "text": "\\text{" * 3000,
}


def records(texts, answer="18", source="tcli-arith"):
    return [(i + 1, {"text": t, "answer": answer, "meta": {"source": source}, "i": i})
            for i, t in enumerate(texts)]


def verdicts(out):
    return [(r["reward"], r["verdict"]) for r in out]


def _arith_texts(n, seed=0):
    rng = random.Random(seed)
    return [f"3+{k}={3 + k}\n#### {3 + k + rng.choice([0, 0, 1])}" for k in range(n)]


@pytest.mark.parametrize("task", sorted(stage.INLINE_TASKS))
def test_inline_verifiers_are_bounded(task):
    """What may run inline must finish fast on every adversarial text (measured worst ~40 ms;
    the bound leaves room for a loaded machine). A slow verifier added to INLINE_TASKS fails here."""
    from tcli.verifiers import get_verifier

    fn = get_verifier(task)
    worst = (0.0, "")
    for name, text in {**ADVERSARIAL, **CRAFTED}.items():
        t0 = time.process_time()
        reward, verdict = fn(text, "18", {})
        dt = time.process_time() - t0
        worst = max(worst, (dt, name))
        assert reward in (0.0, 1.0) and isinstance(verdict, dict)
    assert worst[0] < 0.5, worst


def test_bounded_tasks_run_here_with_the_same_results(monkeypatch):
    """arith and gsm8k records fork no worker, and score exactly as in workers."""
    texts = _arith_texts(200) + list(ADVERSARIAL.values())[:4]
    for task in sorted(stage.INLINE_TASKS):
        before, seen, inline = children(), [], []
        for rec in verify_records(iter(records(texts)), "<t>", task=task, workers=2):
            seen.append(children() - before)
            inline.append((rec["reward"], rec["verdict"]))
        assert not any(seen), "a worker started for inline records"
        monkeypatch.setattr(stage, "INLINE_TASKS", frozenset())
        pooled = verdicts(verify_records(iter(records(texts)), "<t>", task=task, workers=2))
        monkeypatch.undo()
        assert inline == pooled


def test_auto_mixes_inline_and_pooled_records_in_order():
    """--task auto: arith/gsm8k records run here, choice and math in workers; order kept."""
    recs = []
    for i in range(60):
        kind = i % 4
        if kind == 0:
            recs.append({"text": f"#### {i}", "answer": str(i), "meta": {"source": "tcli-arith"}})
        elif kind == 1:
            recs.append({"text": f"So {i} eggs.", "answer": str(i),
                         "meta": {"source": "openai/grade-school-math"}})
        elif kind == 2:
            recs.append({"text": "The answer is (B)", "answer": "B", "choices": {"A": "x", "B": "y"}})
        else:
            recs.append({"text": f"\\boxed{{{i}/2}}", "answer": f"\\frac{{{i}}}{{2}}"})
    here = verdicts(verify_records(iter(enumerate([dict(r) for r in recs], 1)), "<t>",
                                   task="auto", workers=0))
    mixed = verdicts(verify_records(iter(enumerate([dict(r) for r in recs], 1)), "<t>",
                                    task="auto", workers=2))
    assert mixed == here
    assert [v["task"] for _, v in mixed[:4]] == ["arith", "gsm8k", "choice", "math"]
    assert all(r == 1.0 for r, _ in mixed)


def test_inline_overrun_is_a_timeout():
    """Nothing inline can hang, but the per-answer limit still decides the score: an answer that
    took longer than --timeout scores 0 with verdict.error = 'timeout'."""
    out = list(verify_records(iter(records(_arith_texts(20))), "<t>", task="arith",
                              timeout=1e-9, workers=1))
    assert all(r["reward"] == 0.0 and r["verdict"]["error"] == "timeout" for r in out)
    assert [r["i"] for r in out] == list(range(20))


def test_long_gold_answers_go_to_a_worker():
    """gsm8k's exact rationals are quadratic in the gold's digits: a long gold runs in a worker
    (under the hard timeout); short ones never start one."""
    with start_pool("gsm8k", 5.0, 1) as pool:
        assert pool.workers == []
        out = list(verify_records(iter(records(["#### 7"] * 50, "7", "gsm")), "<t>",
                                  task="gsm8k", pool=pool))
        assert [r["reward"] for r in out] == [1.0] * 50 and pool.workers == []
        big = "1" * (stage.INLINE_ANSWER_CHARS + 1)
        out = list(verify_records(iter(records(["#### 7", f"#### {big}"], big, "gsm")), "<t>",
                                  task="gsm8k", pool=pool))
        assert [r["reward"] for r in out] == [0.0, 1.0] and len(pool.workers) == 1


def test_one_worker_gets_a_step_in_two_messages(monkeypatch):
    sent = count_pool_messages(monkeypatch)
    with DeadlinePool(work, 1, 5.0) as pool:
        for _ in range(3):
            sent.clear()
            assert list(pool.imap(((("ok", i), 1) for i in range(128)), 256)) == \
                [2 * i for i in range(128)]
            assert [n for n in sent if n] == [64, 64]


def test_cheap_items_are_not_chopped_small(monkeypatch):
    """Several workers: once item times are known, a chunk holds >= CHUNK_SECONDS of work, so
    the guided tail of 1-item messages is gone for cheap items; slow items still spread out."""
    sent = count_pool_messages(monkeypatch)
    with DeadlinePool(work, 2, 5.0) as pool:
        list(pool.imap(((("ok", i), 1) for i in range(64)), 256))  # learn the item time
        sent.clear()
        assert list(pool.imap(((("ok", i), 1) for i in range(256)), 256)) == \
            [2 * i for i in range(256)]
        chunks = [n for n in sent if n]
        # guided alone: 16, 12, 9, 7, ..., 1; sized by time: >= 16 each but the remainder at the end
        assert len(chunks) <= 8 and min(chunks[:-1]) >= 16, chunks
        sent.clear()  # slow items now, the estimate still says cheap: both workers get a share
        out = list(pool.imap(((("sleep", 0.05), 1) for _ in range(16)), 256))
        assert out == ["slept"] * 16
        assert len([n for n in sent if n]) >= 2 and max(sent) <= 8, sent
        sent.clear()  # the estimate has caught up: guided chunks again
        out = list(pool.imap(((("sleep", 0.05), 1) for _ in range(16)), 256))
        assert len([n for n in sent if n]) >= 4, sent


def test_big_chunks_never_block_on_a_stuck_worker():
    """Payloads of 200 KB: the next chunk is sent ahead only when the command pipe holds both,
    so a worker spinning on its first item is still killed on time."""
    blob = "x" * (200 << 10)
    items = [("spin", 0)] + [("ok", blob)] * 30
    t0 = time.monotonic()
    with DeadlinePool(work, 1, 1.0) as pool:
        out = list(pool.imap(((p, 1) for p in items), 256))
    assert time.monotonic() - t0 < 10
    assert out[0] == Failure("timeout", "over 1 s") and out[1:] == [blob * 2] * 30


def test_workers_are_watched_between_local_items():
    """A worker's item that hangs is killed on time even while the parent runs local items."""
    seen, before = [], children()  # other children of this process, if any

    def local(payload):
        time.sleep(payload[1])
        seen.append((time.monotonic(), len(children() - before)))
        return "here"

    items = [("spin", 0)] + [("sleep", 0.05)] * 40
    t0 = time.monotonic()
    with DeadlinePool(work, 1, 0.5, local_fn=local) as pool:
        out = list(pool.imap(((p, 1) for p in items), 256, here=lambda p: p[0] == "sleep"))
    assert out == [Failure("timeout", "over 0.5 s")] + ["here"] * 40
    late = [n for t, n in seen if t - t0 > 1.2]
    assert late and all(n == 0 for n in late), seen  # killed and reaped long before the end


def test_local_exceptions_fail_the_item_and_interrupts_go_on():
    def local(payload):
        if payload == "raise":
            raise ValueError("bad")
        if payload == "ctrl-c":
            raise KeyboardInterrupt
        return payload

    with DeadlinePool(work, 1, 5.0, local_fn=local) as pool:
        assert list(pool.imap([("a", 1), ("raise", 1)], 8, here=lambda p: True)) == \
            ["a", Failure("error", "ValueError: bad")]
        with pytest.raises(KeyboardInterrupt):
            list(pool.imap([("ctrl-c", 1)], 8, here=lambda p: True))
