"""The CPU stream commands through the real CLI: build-tree, advantages, show-tree.

Each test runs the command through ``run_tcli`` (stdin, stdout and stderr are files on fds 0-2, as
a process has them: files, Arrow, stdin), so exit codes, stderr and what lands on disk are the real
ones. Pipes between processes, a terminal on stdin and start-up imports are in tests/process.
"""

from __future__ import annotations

import io
import os

import numpy as np
import orjson
import pyarrow as pa
import pytest

from conftest import example_records, jsonl, oracle_records, parse, run_tcli
from conftest import stderr_one_line as one_error_line, stream_input

# ----------------------------------------------------------------------------- happy paths

def test_files_arrow_and_jsonl_agree(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_bytes(stream_input())
    # JSONL files
    r = run_tcli(["build-tree", src, "-o", tmp_path / "tree.jsonl"])
    assert r.returncode == 0 and r.stdout == b"", r.stderr
    r = run_tcli(["advantages", tmp_path / "tree.jsonl", "-o", tmp_path / "adv.jsonl"])
    assert r.returncode == 0, r.stderr
    want = (tmp_path / "adv.jsonl").read_bytes()
    # Arrow by suffix, then Arrow on stdin (detected), back to JSONL on stdout
    r = run_tcli(["build-tree", src, "-o", tmp_path / "tree.arrow"])
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "tree.arrow").read_bytes()[:4] == b"\xff\xff\xff\xff"
    r = run_tcli(["advantages", "-"], input=(tmp_path / "tree.arrow").read_bytes())
    assert r.returncode == 0, r.stderr
    assert [orjson.dumps(x, option=orjson.OPT_SORT_KEYS) for x in parse(r.stdout)] == \
        [orjson.dumps(x, option=orjson.OPT_SORT_KEYS) for x in parse(want)]
    # --format arrow on stdout, and --input-format forcing
    r = run_tcli(["build-tree", "--format", "arrow"], input=stream_input())
    assert r.returncode == 0 and r.stdout[:4] == b"\xff\xff\xff\xff"
    r2 = run_tcli(["advantages", "--input-format", "arrow"], input=r.stdout)
    assert r2.returncode == 0, r2.stderr
    assert [orjson.dumps(x, option=orjson.OPT_SORT_KEYS) for x in parse(r2.stdout)] == \
        [orjson.dumps(x, option=orjson.OPT_SORT_KEYS) for x in parse(want)]
    bad = run_tcli(["advantages", "--input-format", "jsonl"], input=r.stdout)
    assert bad.returncode == 65, bad.stderr
    one_error_line(bad.stderr)


def test_arrow_file_format_on_stdin(tmp_path):
    table = pa.Table.from_pylist(oracle_records())
    sink = io.BytesIO()
    with pa.ipc.new_file(sink, table.schema) as w:
        w.write_table(table)
    r = run_tcli(["advantages", "-e", "grpo"], input=sink.getvalue())
    assert r.returncode == 0, r.stderr
    np.testing.assert_allclose([x["advantages"][0] for x in parse(r.stdout)],
                               [0.866025, -0.866025, 0.866025, -0.866025], atol=1e-5)


def test_advantages_options(tmp_path):
    src = jsonl(oracle_records())
    first = {}
    for args in (["-e", "grpo"], ["-e", "grpo", "--std", "population"], ["-e", "tempo", "--td-coef", "0"],
                 ["-e", "tempo", "--td-coef", "2"]):
        r = run_tcli(["advantages", *args], input=src)
        assert r.returncode == 0, r.stderr
        first[" ".join(args)] = [x["advantages"] for x in parse(r.stdout)]
    assert first["-e grpo"][0][0] == pytest.approx(0.866025, abs=1e-5)
    assert first["-e grpo --std population"][0][0] == pytest.approx(1.0, abs=1e-5)
    assert first["-e tempo --td-coef 0"] == first["-e grpo"]
    s = np.sqrt(1 / 3) + 1e-6
    np.testing.assert_allclose(first["-e tempo --td-coef 2"][0],
                               [(0.5 + 2 * d) / s for d in (1 / 6, -1 / 6, 0.5, 0.0)], atol=1e-9)


def test_treerpo_cli_norm_and_prune():
    recs = []
    for i, (path, r) in enumerate([([0, 0], 1.0), ([0, 1], 0.9), ([1, 0], 1.0), ([1, 1], 0.0)]):
        recs.append({"prompt_id": "t", "sample_id": i, "token_ids": [path[0], 10 + i], "reward": r,
                     "node_path": path, "segment_ends": [1, 2]})
    r = run_tcli(["advantages", "-e", "treerpo", "--norm", "mean"], input=jsonl(recs))
    assert r.returncode == 0, r.stderr
    a = [x["advantages"] for x in parse(r.stdout)]
    assert a[0] == pytest.approx([0.225, 0.05]) and a[3] == pytest.approx([-0.225, -0.5])
    r = run_tcli(["advantages", "-e", "treerpo", "--prune-std", "0.2"], input=jsonl(recs))
    a = [x["advantages"] for x in parse(r.stdout)]
    assert a[0][1] == 0.0 and a[1][1] == 0.0 and a[2][1] != 0.0
    r = run_tcli(["advantages", "-e", "treerpo"], input=jsonl(oracle_records()))
    assert r.returncode == 65 and "node_path" in one_error_line(r.stderr)


def test_stats_on_stderr_and_determinism():
    src = stream_input()
    r1 = run_tcli(["advantages", "--stats"], input=src)
    r2 = run_tcli(["advantages", "-q"], input=src)
    assert r1.returncode == 0 and r1.stdout == r2.stdout
    assert r2.stderr == b""
    err = r1.stderr.decode()
    for key in ("groups", "zero_variance_share", "branch_token_share", "mean_abs_advantage"):
        assert key in err
    assert "│ groups              │ 4" in err


def test_show_tree():
    src = jsonl(oracle_records("first") + [dict(r, prompt_id="second") for r in example_records()[:4]])
    r = run_tcli(["show-tree"], input=src)
    assert r.returncode == 0, r.stderr
    out = r.stdout.decode()
    assert out.startswith("first  G=4  V(root)=mean r=0.500")
    assert "branch" in out and "V=0.667" in out and "δ=+0.167" in out and "r=1" in out
    assert out.count("■ leaf") == 4
    r = run_tcli(["show-tree", "--group", "second", "--bytes"], input=src)
    assert r.returncode == 0, r.stderr
    assert "She has 16 - 3" in r.stdout.decode()
    r = run_tcli(["show-tree", "--group", "nope"], input=src)
    assert r.returncode == 2 and "nope" in one_error_line(r.stderr)
    r = run_tcli(["show-tree"], input=with_line2("reward", drop=True))
    assert r.returncode == 65 and "<stdin>:2: field 'reward'" in one_error_line(r.stderr)


# ----------------------------------------------------------------------------- bad input

def good():
    return [{"prompt_id": "a", "token_ids": [1, 2], "reward": 1.0},
            {"prompt_id": "a", "token_ids": [1, 3], "reward": 0.0},
            {"prompt_id": "b", "token_ids": [4], "reward": 1.0}]


def with_line2(field, value=None, drop=False):
    recs = good()
    if drop:
        del recs[1][field]
    else:
        recs[1][field] = value
    return jsonl(recs)


GOOD_BYTES = jsonl(good())
BAD = {
    "malformed JSON": GOOD_BYTES.replace(b'"reward":0.0}', b'"reward":0.0,}'),
    "missing token_ids": with_line2("token_ids", drop=True),
    "missing reward": with_line2("reward", drop=True),
    "string token ids": with_line2("token_ids", ["1", "3"]),
    "float token ids": with_line2("token_ids", [1.0, 3.0]),
    "bool token ids": with_line2("token_ids", [1, True]),
    "negative token id": with_line2("token_ids", [1, -3]),
    "string reward": with_line2("reward", "0.0"),
    "NaN reward": GOOD_BYTES.replace(b'"reward":0.0}', b'"reward":NaN}'),
    "inf reward": GOOD_BYTES.replace(b'"reward":0.0}', b'"reward":-Infinity}'),
    "huge reward": GOOD_BYTES.replace(b'"reward":0.0}', b'"reward":1e400}'),
    "newer schema": with_line2("schema", "tcli.rollout/2"),
    "missing prompt_id": with_line2("prompt_id", drop=True),
}
EXPECT = {  # (line, field) the error must name
    "malformed JSON": (2, None), "missing token_ids": (2, "token_ids"), "missing reward": (2, "reward"),
    "string token ids": (2, "token_ids"), "float token ids": (2, "token_ids"),
    "bool token ids": (2, "token_ids"), "negative token id": (2, "token_ids"),
    "string reward": (2, "reward"), "NaN reward": (2, "reward"), "inf reward": (2, "reward"),
    "huge reward": (2, "reward"), "newer schema": (2, "schema"), "missing prompt_id": (2, "prompt_id"),
}


BAD_RUNS = [("advantages", c) for c in BAD] + [
    ("build-tree", "malformed JSON"), ("build-tree", "missing reward"), ("build-tree", "float token ids")]


@pytest.fixture(scope="module")
def bad_results(tmp_path_factory):
    """Run every bad-input case once (each is a separate tcli run, in this process: one at a time)."""
    def run(job):
        command, case = job
        d = tmp_path_factory.mktemp("bad")
        src = d / "bad.jsonl"
        src.write_bytes(BAD[case])
        return job, (d, src, run_tcli([command, src, "-o", d / "out.jsonl"]))

    return dict(map(run, BAD_RUNS))


@pytest.mark.parametrize("command, case", BAD_RUNS)
def test_bad_input_exit_65(bad_results, command, case):
    d, src, r = bad_results[(command, case)]
    assert r.returncode == 65, (case, r.stderr)
    msg = one_error_line(r.stderr)
    line, field = EXPECT[case]
    assert f"{src}:{line}:" in msg, msg
    if field:
        assert f"field '{field}'" in msg, msg
    assert os.listdir(d) == ["bad.jsonl"]  # no output file, no temporary file


def test_group_split_across_the_stream(tmp_path):
    src = tmp_path / "split.jsonl"
    src.write_bytes(jsonl(good() + [{"prompt_id": "a", "token_ids": [9], "reward": 1.0}]))
    r = run_tcli(["advantages", src, "-o", tmp_path / "out.arrow"])
    assert r.returncode == 65
    msg = one_error_line(r.stderr)
    assert f"{src}:4: field 'prompt_id'" in msg and "consecutive" in msg
    assert os.listdir(tmp_path) == ["split.jsonl"]


def test_bad_record_on_stdin_is_named_stdin():
    r = run_tcli(["advantages"], input=with_line2("reward", "x"))
    assert r.returncode == 65 and "<stdin>:2: field 'reward'" in one_error_line(r.stderr)


@pytest.mark.parametrize("args", [["-e", "nope"], ["--std", "sample"], ["--norm", "max"],
                                  ["--format", "csv"], ["--input-format", "xml"], ["--td-coef", "nan"]])
def test_usage_errors_exit_2(tmp_path, args):
    src = tmp_path / "in.jsonl"
    src.write_bytes(jsonl(good()))
    r = run_tcli(["advantages", src, *args, "-o", tmp_path / "out.jsonl"])
    assert r.returncode == 2, r.stderr
    assert b"Traceback" not in r.stderr
    assert os.listdir(tmp_path) == ["in.jsonl"]
    if args[0] == "-e":
        assert "grpo" in one_error_line(r.stderr) and "treerpo" in r.stderr.decode()


def test_missing_input_file_is_usage_error(tmp_path):
    r = run_tcli(["build-tree", tmp_path / "nope.jsonl"])
    assert r.returncode == 2 and "nope.jsonl" in one_error_line(r.stderr)
