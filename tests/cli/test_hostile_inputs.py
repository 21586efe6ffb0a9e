"""Hostile data for the newer inputs and stages: Parquet and saved-dataset files, chat messages,
corrupt Arrow bytes, PPO's critic values and returns, and extreme rewards through every
advantage estimator.

Each case runs the real command (``run_tcli``) and checks what a user sees (DESIGN §2.5, §8.1):
the documented exit code, one line on stderr naming the file, the record and the field, no
traceback, and no output file after a failure. The model commands use one tiny model per module.
"""

from __future__ import annotations

import io
import json
import shutil
import struct

import orjson
import pytest

from conftest import failed, jsonl, run_python, run_tcli



@pytest.fixture(scope="module")
def chat_model(tiny, tmp_path_factory):
    """The tiny model with a chat template, so that conversations reach the template."""
    path = tmp_path_factory.mktemp("chat") / "m"
    shutil.copytree(tiny, path)
    cfg_path = path / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["chat_template"] = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n"
                            "{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}")
    cfg_path.write_text(json.dumps(cfg))
    return str(path)


def sample(src, model, tmp_path):
    """sample-tree into tmp_path/out.jsonl; a failure must leave that file as it was."""
    out = tmp_path / "out.jsonl"
    before = out.read_bytes() if out.exists() else None
    r = run_tcli(["sample-tree", src, "-m", model, "--n", "1", "--max-new-tokens", "2", "-o", out])
    if r.returncode:
        assert (out.read_bytes() if out.exists() else None) == before, "output changed"
        assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("out")) == \
            (["out.jsonl"] if before is not None else [])
    return r


# ----------------------------------------------------------------------------- Parquet

def _parquet(path, columns: dict) -> str:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table(columns), str(path))
    return str(path)


@pytest.mark.parametrize("columns, line, field, words", [
    ({"id": ["a", "b"], "prompt": [1, 2]}, 1, "prompt", "must be a string"),
    ({"id": ["a"], "messages": [["hi", "there"]]}, 1, "messages", "message 0"),
    ({"id": ["a"], "messages": [[{"role": "user", "content": 5}]]}, 1, "messages", "string values"),
    ({"id": ["a", "b"], "messages": [[{"role": "user", "content": "x"}],
                                     [{"role": None, "content": "x"}]]},
     2, "messages", "message 0"),
], ids=["int prompt", "messages of strings", "int content", "null role"])
def test_parquet_with_wrong_column_types(columns, line, field, words, chat_model, tmp_path):
    src = _parquet(tmp_path / "p.parquet", columns)
    failed(sample(src, chat_model, tmp_path), 65, f"{src}:{line}: field '{field}'", words)


def test_truncated_and_corrupt_parquet(tiny, tmp_path):
    src = _parquet(tmp_path / "ok.parquet", {"id": ["a", "b"], "prompt": ["1+1=", "2+2="]})
    data = open(src, "rb").read()
    bad = tmp_path / "bad.parquet"
    for cut in (data[: len(data) // 2], data[:-5], data[:4]):
        bad.write_bytes(cut)
        failed(sample(bad, tiny, tmp_path), 65, f"{bad}:1:", "not a readable Parquet file")
    # a column name that is not UTF-8 (pyarrow raised UnicodeDecodeError: exit 1 with a type name)
    named = _parquet(tmp_path / "n.parquet", {"id": ["a"], "prompt": ["x"], "été": ["y"]})
    bad.write_bytes(open(named, "rb").read().replace("été".encode(), b"\xff\xfe\xfd\xfc\xfb"))
    failed(sample(bad, tiny, tmp_path), 65, f"{bad}:1:", "Parquet")


# ----------------------------------------------------------------------------- saved datasets

def _saved_dataset(d, files: int = 2) -> list:
    """The ``save_to_disk`` layout by hand: data-*.arrow streams, state.json, dataset_info.json."""
    import pyarrow as pa

    d.mkdir()
    names = [f"data-{i:05d}-of-{files:05d}.arrow" for i in range(files)]
    for i, name in enumerate(names):
        t = pa.table({"id": [f"q{i}a", f"q{i}b"], "prompt": ["1+1=", "2+2="]})
        with pa.ipc.new_stream(str(d / name), t.schema) as w:
            w.write_table(t)
    (d / "dataset_info.json").write_text("{}")
    (d / "state.json").write_text(json.dumps({"_data_files": [{"filename": n} for n in names],
                                              "_fingerprint": "x", "_split": None}))
    return [d / n for n in names]


def _break_dataset(d, kind: str, files: list) -> str:
    """Damage a saved dataset; returns the path the error must name."""
    import pyarrow.parquet as pq
    import pyarrow as pa

    if kind == "missing arrow file":
        files[1].unlink()
    elif kind == "arrow file is a directory":
        files[1].unlink()
        files[1].mkdir()
    elif kind == "Parquet in an arrow file":
        pq.write_table(pa.table({"id": ["z"], "prompt": ["x"]}), str(files[1]))
    elif kind == "truncated arrow file":  # records are numbered across the files
        files[1].write_bytes(files[1].read_bytes()[:40])
        return f"{d}:3: not a readable Arrow stream"
    else:
        state = {"state.json not JSON": "{not json", "state.json a list": "[1, 2]",
                 "filename not a string": '{"_data_files": [{"filename": 3}]}',
                 "filename '.'": '{"_data_files": [{"filename": "."}]}',
                 "filename outside": '{"_data_files": [{"filename": "../x.arrow"}]}'}[kind]
        (d / "state.json").write_text(state)
        return str(d / "state.json")
    return str(files[1])


@pytest.mark.parametrize("kind", [
    "missing arrow file", "arrow file is a directory", "Parquet in an arrow file",
    "truncated arrow file", "state.json not JSON", "state.json a list", "filename not a string",
    "filename '.'", "filename outside"])
def test_broken_saved_dataset(kind, tiny, tmp_path):
    """Before: a non-string file name was a TypeError and '.' or a directory an OSError (exit 1
    without the file); Parquet bytes in a data file were blamed on record 1 of the directory."""
    d = tmp_path / "ds"
    files = _saved_dataset(d)
    assert sample(d, tiny, tmp_path).returncode == 0  # the intact layout reads
    named = _break_dataset(d, kind, files)
    line = failed(sample(d, tiny, tmp_path), 65, named)
    if "arrow" in kind:
        assert files[1].name in line, line


# ----------------------------------------------------------------------------- chat messages

@pytest.mark.parametrize("messages, words", [
    ([{"content": "hi"}], "message 0 must be a {role, content} object"),
    ([{"role": "user", "content": "a"}, {"role": "wizard", "content": "b"}],
     "message 1 has unknown role 'wizard'"),
    ([{"role": "usr", "content": "a"}], "unknown role 'usr'"),
    ([{"role": "user", "content": 5}], "string values"),
    ([{"role": "user", "content": [{"type": "text", "text": "a"}]}], "string values"),
    ([], "non-empty list"),
    ("hi", "non-empty list"),
    ([{"role": "system", "content": "be brief"}], "no user turn"),
], ids=["missing role", "unknown role", "misspelt user", "int content", "content parts",
        "empty list", "a string", "no user turn"])
def test_bad_chat_messages(messages, words, chat_model, tmp_path):
    """A chat template renders an unknown role (or none) without complaint: before, 'wizard',
    'usr' and a system-only conversation were sampled silently."""
    src = tmp_path / "q.jsonl"
    src.write_bytes(jsonl([{"id": "a", "prompt": "1+1="}, {"id": "b", "messages": messages}]))
    failed(sample(src, chat_model, tmp_path), 65, f"{src}:2: field 'messages'", words)


def test_good_chat_messages_still_sample(chat_model, tmp_path):
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "1+1="},
            {"role": "assistant", "content": "2"}, {"role": "user", "content": "and 2+2?"}]
    src = tmp_path / "q.jsonl"
    src.write_bytes(jsonl([{"id": "b", "messages": msgs}]))
    r = sample(src, chat_model, tmp_path)
    assert r.returncode == 0, r.stderr.decode()
    first = orjson.loads((tmp_path / "out.jsonl").read_bytes().splitlines()[0])
    assert first["prompt"] == "and 2+2?"  # the last user turn


# ----------------------------------------------------------------------------- corrupt Arrow bytes

def _stream(batch) -> bytes:
    import pyarrow as pa

    sink = io.BytesIO()
    with pa.ipc.new_stream(sink, batch.schema) as w:
        w.write_batch(batch)
    return sink.getvalue()


def _rollout_batch():
    import pyarrow as pa

    return pa.record_batch([pa.array(["p", "p"]), pa.array([0, 1]),
                            pa.array(["abcdefg", "hijklmnopqrst"])],
                           names=["prompt_id", "sample_id", "text"])


def _corrupt_arrow(kind: str) -> bytes:
    import pyarrow as pa

    data = _stream(_rollout_batch())
    if kind == "string offsets past the data":  # the conversion to Python crashed (SIGSEGV)
        return data.replace(struct.pack("<3i", 0, 7, 20), struct.pack("<3i", 0, 7, 1 << 30))
    if kind == "body length of a petabyte":  # pyarrow tried to allocate it (out of memory)
        reader = pa.ipc.MessageReader.open_stream(pa.BufferReader(data))
        reader.read_next_message()
        size = struct.pack("<q", reader.read_next_message().body.size)
        assert data.count(size) == 1
        return data.replace(size, struct.pack("<q", 1 << 50))
    return data.replace(b"text", b"\xff\xfe\xfd\xfc")  # a column name that is not UTF-8


@pytest.mark.parametrize("kind", ["string offsets past the data", "body length of a petabyte",
                                  "column name not UTF-8"])
@pytest.mark.parametrize("via", ["file", "stdin"])
def test_corrupt_arrow_stream_is_bad_data(kind, via, tmp_path):
    src = tmp_path / "bad.arrow"
    src.write_bytes(_corrupt_arrow(kind))
    if via == "file":
        r = run_tcli(["build-tree", src, "-o", tmp_path / "out.jsonl"])
        failed(r, 65, f"{src}:1:")
    else:  # a redirected file is mapped too; only a pipe cannot be
        r = run_python("import sys, runpy; sys.stdin = open(sys.argv[1]); sys.argv = ['tcli', "
                       "'build-tree', '-o', sys.argv[2]]; runpy.run_module('tcli', "
                       "run_name='__main__')", [src, tmp_path / "out.jsonl"])
        failed(r, 65, "<stdin>:1:")
    assert not (tmp_path / "out.jsonl").exists()


def test_mutated_arrow_and_parquet_never_crash(tmp_path):
    """Fixed-seed byte mutations of a rollout stream and a Parquet file: every read ends in
    records or a DataError, never a crash or another exception (in a child: a SIGSEGV there
    fails this test instead of killing the runner)."""
    code = """if True:
        import random, sys, pyarrow as pa, pyarrow.parquet as pq
        from tcli.io import RecordReader, RecordWriter
        from tcli.errors import DataError
        d = sys.argv[1]
        with RecordWriter(d + "/r.arrow") as w:
            w.write_all([{"prompt_id": "p", "sample_id": i, "token_ids": [1, 2, i], "reward": 1.0,
                          "text": "x" * i, "meta": {"a": [i]}} for i in range(3)])
        msgs = [[{"role": "user", "content": "x"}]] * 2
        pq.write_table(pa.table({"id": ["a", "b"], "messages": msgs, "n": [[1, 2], []]}),
                       d + "/p.parquet")
        rng, bad = random.Random(7), []
        for name in ("r.arrow", "p.parquet"):
            data = open(d + "/" + name, "rb").read()
            for _ in range(400):
                b = bytearray(data)
                for _ in range(rng.choice([1, 2, 4, 8])):
                    b[rng.randrange(4, len(b) - 4)] = rng.randrange(256)
                if rng.random() < 0.3:
                    b = b[:rng.randrange(4, len(b))]
                open(d + "/m", "wb").write(bytes(b))
                try:
                    list(RecordReader(d + "/m"))
                except DataError:
                    pass
                except Exception as e:
                    bad.append(f"{name}: {type(e).__name__}: {e}"[:200])
        print("\\n".join(bad))
    """
    r = run_python(code, [tmp_path], timeout=120)
    assert r.returncode == 0, r.stderr.decode()[-2000:]
    assert r.stdout.decode().strip() == ""
