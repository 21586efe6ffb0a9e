"""The benchmarks shipped in the package: the registry matches the files, names resolve wherever
prompt data is read (eval, sample-tree, loop), paths keep working, unknown names are usage
errors, and `tcli eval --list-benchmarks` works without a model or torch."""

from __future__ import annotations

import orjson
import pytest

from conftest import benchmark, run_python, run_tcli
from tcli.errors import UsageError
from tcli.io.benchmarks import BENCHMARK_DIR, BENCHMARKS, resolve_data

NAMES = ["gsm8k", "gsm8k_train", "math500", "gsm_hard", "amc23", "aime24", "medqa", "medmcqa",
         "mmlu_med"]


def _rows(name: str) -> list[dict]:
    with open(benchmark(name), "rb") as f:  # JSONL lines end at b"\n" only (not at U+2028)
        return [orjson.loads(line) for line in f]


def test_registry_names_are_the_documented_ones():
    assert list(BENCHMARKS) == NAMES
    readme = (benchmark("gsm8k").parent / "README.md").read_text("utf-8")
    for name, b in BENCHMARKS.items():
        assert f"| `{name}` | `{b.file}` | {b.rows} | {b.task} |" in readme, name


@pytest.mark.parametrize("name", NAMES)
def test_every_name_resolves_to_a_file_with_its_rows_and_fields(name):
    from tcli.verifiers import pick_task

    b = BENCHMARKS[name]
    assert resolve_data(name) == b.path and b.path.startswith(BENCHMARK_DIR)
    rows = _rows(name)
    assert len(rows) == b.rows
    assert len({r["id"] for r in rows}) == b.rows
    for r in rows:
        assert all(isinstance(r[k], str) and r[k] for k in ("id", "prompt", "answer")), r["id"]
        if b.multiple_choice:
            assert sorted(r["choices"]) == ["A", "B", "C", "D"] and r["answer"] in r["choices"]
        else:
            assert "choices" not in r
    assert {pick_task(r) for r in rows} == {b.task}  # the task the table documents


def test_list_benchmarks_without_model(tmp_path):
    p = run_tcli(["eval", "--list-benchmarks"])
    assert p.returncode == 0, p.stderr.decode()
    lines = p.stdout.decode().splitlines()
    assert lines[0].split()[:4] == ["name", "rows", "size", "task"]
    for name, b in BENCHMARKS.items():
        row = next(ln.split() for ln in lines if ln.split()[:1] == [name])
        assert row[1] == str(b.rows) and row[4] == b.task and row[5] == b.file, row
    assert "MB" in p.stdout.decode() and "KB" in p.stdout.decode()


def test_list_benchmarks_does_not_import_torch():
    code = ("import atexit, sys; atexit.register(lambda: print('torch' in sys.modules)); "
            "sys.argv = ['tcli', *sys.argv[1:]]; from tcli.cli import main; main()")
    p = run_python(code, ["eval", "--list-benchmarks"], fresh=True)
    assert p.returncode == 0, p.stderr.decode()
    assert p.stdout.decode().splitlines()[-1] == "False"


@pytest.mark.parametrize("cmd", [["eval", "--model", "m", "--data", "gsm9k"],
                                 ["sample-tree", "gsm9k", "--model", "m"]])
def test_unknown_name_exits_2_listing_the_names(cmd):
    p = run_tcli(cmd)
    assert p.returncode == 2
    err = p.stderr.decode()
    assert err.count("\n") == 1 and "'gsm9k'" in err
    assert all(name in err for name in NAMES)


def test_existing_path_wins_over_a_name(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    own = tmp_path / "prompts.jsonl"
    own.write_text('{"id": 1, "prompt": "p", "answer": "1"}\n')
    assert resolve_data(str(own)) == str(own) and resolve_data("-") == "-"
    (tmp_path / "gsm8k").mkdir()  # a directory of that name that holds no data set
    assert resolve_data("gsm8k") == BENCHMARKS["gsm8k"].path
    (tmp_path / "gsm8k" / "state.json").write_text("{}")  # a saved dataset wins
    assert resolve_data("gsm8k") == "gsm8k"
    (tmp_path / "math500").write_text("")  # so does a file
    assert resolve_data("math500") == "math500"
    said = capsys.readouterr().err  # each is said once, naming the file read
    assert said.count(f"warning: reading {tmp_path / 'math500'}, not the shipped benchmark 'math500'") == 1
    assert said.count("not the shipped benchmark 'gsm8k'") == 1
    with pytest.raises(UsageError, match="neither an existing file nor a shipped benchmark"):
        resolve_data(str(tmp_path / "missing.jsonl"))


def test_loop_reads_shipped_train_and_eval_data(tmp_path):
    """train_data/eval_data names pass validation and are read; nothing is written yet."""
    from tcli.config.loop import load_config
    from tcli.loop.loop import Loop

    toml = tmp_path / "run.toml"
    toml.write_text(f'model = "{tmp_path}"\ntrain_data = "gsm8k_train"\neval_data = "amc23"\n'
                    f'run_dir = "{tmp_path / "run"}"\n')
    cfg = load_config(str(toml))
    assert (cfg.run.train_data, cfg.run.eval_data) == ("gsm8k_train", "amc23")
    loop = Loop(cfg)
    assert len(loop.train_prompts) == 7473 and len(loop.eval_prompts) == 40
    assert loop.record_no[id(loop.eval_prompts[2])] == (BENCHMARKS["amc23"].path, 3)
    assert not (tmp_path / "run").exists()
    with pytest.raises(UsageError, match="'amc22' is neither .*gsm8k_train"):
        Loop(load_config(None, {"model": str(tmp_path), "train_data": "gsm8k",
                                "eval_data": "amc22", "run_dir": str(tmp_path / "run")}))
    assert not (tmp_path / "run").exists()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from tcli.models.tiny import init_tiny_model

    return init_tiny_model(str(tmp_path_factory.mktemp("tiny") / "m"), seed=0, hidden=32,
                           layers=1, heads=2, kv_heads=1, intermediate=64)


def test_eval_on_a_shipped_name(tiny, tmp_path):
    out = tmp_path / "samples.jsonl"
    p = run_tcli(["eval", "--model", tiny, "--data", "medqa", "--limit", "2", "--max-new-tokens",
                  "4", "--workers", "1", "--no-chat-template", "-o", out, "-q"],
                 env={"OMP_NUM_THREADS": "1"}, timeout=300)
    assert p.returncode == 0, p.stderr.decode()
    summary = orjson.loads(p.stdout)
    assert summary["data"] == "medqa" and summary["prompts"] == 2
    recs = [orjson.loads(x) for x in out.read_bytes().splitlines()]
    rows = _rows("medqa")  # --limit 2: the first row and the middle one (spread over the file)
    assert [r["prompt_id"] for r in recs] == [rows[0]["id"], rows[len(rows) // 2]["id"]]
    assert {r["verdict"]["task"] for r in recs} == {"choice"}


def test_sample_tree_on_a_shipped_name(tiny):
    p = run_tcli(["sample-tree", "gsm_hard", "--model", tiny, "--limit", "1", "--n", "2",
                  "--max-new-tokens", "4", "--no-chat-template", "-q"],
                 env={"OMP_NUM_THREADS": "1"}, timeout=300)
    assert p.returncode == 0, p.stderr.decode()
    recs = [orjson.loads(x) for x in p.stdout.splitlines()]
    first = _rows("gsm_hard")[0]
    assert [(r["prompt_id"], r["prompt"]) for r in recs] == [(first["id"], first["prompt"])] * 2
