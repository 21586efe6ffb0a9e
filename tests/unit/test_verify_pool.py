"""The generic deadline pool (tcli.verifiers.pool): chunks, per-item deadlines, kill-and-requeue,
in-order results, misbehaving functions, reuse and cleanup. Nothing here knows about records."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

from conftest import children, count_pool_messages, work
from tcli.verifiers import pool as pool_mod
from tcli.verifiers.pool import DeadlinePool, Failure

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="fork, /proc")


def run(items, workers=2, timeout=5.0, window=256, **kw):
    with DeadlinePool(work, workers, timeout, **kw) as pool:
        return list(pool.imap(((p, 1) for p in items), window))


def test_results_in_order_and_workers_gone():
    before = children()
    out = run([("ok", i) for i in range(500)], workers=2)
    assert out == [2 * i for i in range(500)]
    assert children() == before


def test_items_travel_in_chunks(monkeypatch):
    sent = count_pool_messages(monkeypatch)
    out = run([("ok", i) for i in range(256)], workers=2)
    assert out == [2 * i for i in range(256)]
    chunks = [n for n in sent if n]
    assert sum(chunks) == 256 and len(chunks) <= 40, chunks  # not one message per item
    assert max(chunks) <= pool_mod.MAX_CHUNK


def test_deadline_restarts_for_each_item():
    """Five 0.4 s items in one chunk of one worker, timeout 1 s: 2 s in all, none times out."""
    with DeadlinePool(work, 1, 1.0, max_chunk=8) as pool:
        out = list(pool.imap(((("sleep", 0.4), 1) for _ in range(5)), 256))
    assert out == ["slept"] * 5


def test_overrun_kills_and_requeues_the_rest_of_the_chunk():
    items = [("ok", 1), ("spin", 0), ("ok", 2), ("ok", 3), ("sleep", 30), ("ok", 4)] + \
            [("ok", i) for i in range(5, 40)]
    t0 = time.monotonic()
    with DeadlinePool(work, 2, 1.0, max_chunk=64) as pool:
        out = list(pool.imap(((p, 1) for p in items), 256))
    assert time.monotonic() - t0 < 8
    assert out[1] == Failure("timeout", "over 1 s") and out[4] == Failure("timeout", "over 1 s")
    assert [x for i, x in enumerate(out) if i not in (1, 4)] == [2 * v for k, v in items if k == "ok"]


def test_results_written_before_a_kill_count():
    """One worker, one chunk: the items before the hung one are not run again or lost."""
    with DeadlinePool(work, 1, 1.0, max_chunk=64) as pool:
        items = [("pid", 0)] * 5 + [("spin", 0)] + [("pid", 0)] * 5
        out = list(pool.imap(((p, 1) for p in items), 256))
    first, after = set(out[:5]), set(out[6:])
    assert len(first) == 1 and len(after) == 1 and first != after  # killed, then a fresh worker
    assert out[5].kind == "timeout"


def test_a_dying_worker_fails_only_its_item():
    items = [("ok", 1), ("exit", 3), ("ok", 2), ("exit", 0), ("ok", 3), ("sysexit", 4),
             ("kbint", 0), ("raise", 5), ("ok", 4)]
    out = run(items, workers=2)
    assert out[0] == 2 and out[2] == 4 and out[4] == 6 and out[8] == 8
    assert out[1] == Failure("died", "exit code 3") and out[3] == Failure("died", "exit code 0")
    assert out[5] == Failure("error", "SystemExit: 4")
    assert out[6] == Failure("error", "KeyboardInterrupt")
    assert out[7] == Failure("error", "ValueError: bad 5")


def test_large_and_unpicklable_results():
    out = run([("big", 3 << 20), ("unpicklable", 0), ("big", 10), ("ok", 1)], workers=1)
    assert out[0] == "x" * (3 << 20) and out[2] == "x" * 10 and out[3] == 2
    assert out[1].kind == "error" and "could not be sent back" in out[1].detail


def test_workers_ignore_sigint_and_are_named():
    with DeadlinePool(work, 1, 5.0) as pool:
        out = list(pool.imap([(("sigint_self", 0), 1), (("pid", 0), 1)], 8))
        assert out[0] == "survived"
        pid = out[1]
        assert Path(f"/proc/{pid}/comm").read_text().strip() == "tcli-verify"
    assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text()


def test_reading_is_lazy_and_bounded():
    read = []

    def items():
        for i in range(10_000):
            read.append(i)
            yield ("ok", i), 1

    with DeadlinePool(work, 2, 5.0) as pool:
        it = pool.imap(items(), window=50)
        assert [next(it) for _ in range(10)] == [2 * i for i in range(10)]
        assert len(read) <= 10 + 50
        it.close()


def test_window_cost_bounds_what_is_held():
    read = []

    def items():
        for i in range(100):
            read.append(i)
            yield ("ok", i), 1000

    with DeadlinePool(work, 1, 5.0) as pool:
        it = pool.imap(items(), window=1000, window_cost=5000)
        assert next(it) == 0
        assert len(read) <= 6
        it.close()


def test_one_pool_many_maps_and_an_abandoned_map():
    before = children()
    with DeadlinePool(work, 2, 5.0) as pool:
        pool.start()
        pids = {w.proc.pid for w in pool.workers}
        for k in range(5):
            assert list(pool.imap(((("ok", i), 1) for i in range(100)), 64)) == [2 * i for i in range(100)]
        assert {w.proc.pid for w in pool.workers} == pids  # the same warm workers every time
        it = pool.imap(((("sleep", 0.2), 1) for _ in range(50)), 64)
        assert next(it) == "slept"
        it.close()  # the busy workers hold stale items: killed, not reused
        assert list(pool.imap([(("ok", 21), 1)], 8)) == [42]
    assert children() == before


def test_an_exception_in_the_caller_kills_busy_workers():
    before = children()
    with pytest.raises(RuntimeError):
        with DeadlinePool(work, 2, 60.0) as pool:
            it = pool.imap([(("ok", 1), 1)] + [(("spin", 0), 1)] * 4, 8)
            assert next(it) == 2  # the others now spin on both workers
            assert len(children() - before) == 2
            raise RuntimeError("caller failed")
    assert children() == before


def test_payload_reader_errors_propagate():
    def items():
        yield ("ok", 1), 1
        raise LookupError("bad input line")

    before = children()
    with pytest.raises(LookupError):
        run_items = DeadlinePool(work, 2, 5.0)
        with run_items as pool:
            list(pool.imap(items(), 8))
    assert children() == before


def test_bad_arguments():
    with pytest.raises(ValueError):
        DeadlinePool(work, 0, 1.0)
    with pytest.raises(ValueError):
        DeadlinePool(work, 1, 0)


@pytest.mark.parametrize("seed", [int(s) for s in os.environ.get("POOL_SEEDS", "0,1").split(",")])
def test_random_mix_of_behaviours(seed):
    """Every item gets exactly its own outcome, in order, whatever its neighbours do
    (POOL_SEEDS=0,1,...,99 for a longer soak)."""
    import random

    rng = random.Random(seed)
    kinds = ["ok"] * 40 + ["sleep", "spin", "exit", "sysexit", "raise", "kbint"]
    items = []
    for i in range(300):
        k = rng.choice(kinds)
        items.append((k, {"sleep": 0.01, "exit": 9}.get(k, i)))
    before = children()
    with DeadlinePool(work, rng.choice([1, 2, 3]), 0.5, max_chunk=rng.choice([1, 7, 64])) as pool:
        out = list(pool.imap(((p, 1) for p in items), rng.choice([5, 64, 1000])))
    expected = {"sleep": "slept", "spin": Failure("timeout", "over 0.5 s"),
                "exit": Failure("died", "exit code 9"), "sysexit": None, "raise": None,
                "kbint": Failure("error", "KeyboardInterrupt")}
    for (k, v), got in zip(items, out, strict=True):
        if k == "ok":
            assert got == 2 * v
        elif k == "sysexit":
            assert got == Failure("error", f"SystemExit: {v}")
        elif k == "raise":
            assert got == Failure("error", f"ValueError: bad {v}")
        else:
            assert got == expected[k], (k, got)
    assert children() == before
