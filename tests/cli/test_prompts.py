"""Prompt files from other schemas: field mapping, chat-format prompts, errors that name the
user's own field."""

from __future__ import annotations

import orjson
import pytest

from conftest import failed, run_tcli
from tcli.config.stages import PromptOptions
from tcli.errors import DataError, UsageError
from tcli.prompts import read_prompts

TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}<assistant>{% endif %}")


def _jsonl(path, recs):
    path.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in recs))
    return path


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    """A tiny model whose tokenizer has a chat template."""
    from transformers import AutoTokenizer

    from tcli.models.tiny import init_tiny_model

    d = str(tmp_path_factory.mktemp("chat") / "m")
    init_tiny_model(d, seed=0, hidden=32, layers=1, heads=2, kv_heads=1, intermediate=64)
    tok = AutoTokenizer.from_pretrained(d)
    tok.chat_template = TEMPLATE
    tok.save_pretrained(d)
    return d


def test_field_mapping(tmp_path):
    f = _jsonl(tmp_path / "q.jsonl", [{"qid": 7, "question": "2+2?", "gold": "4", "x": 1}])
    [rec] = read_prompts(str(f), fields=PromptOptions(id_field="qid", prompt_field="question",
                                                      answer_field="gold"))
    assert rec == {"id": 7, "prompt": "2+2?", "answer": "4", "x": 1}


def test_errors_name_the_users_field(tmp_path):
    f = _jsonl(tmp_path / "q.jsonl", [{"qid": 7, "gold": "4"}])
    with pytest.raises(DataError) as e:
        read_prompts(str(f), fields=PromptOptions(id_field="qid", prompt_field="question",
                                                  answer_field="gold"))
    assert e.value.field == "question" and e.value.line == 1


def test_a_named_field_the_record_lacks_is_an_error_not_the_default(tmp_path):
    """A misspelt --answer-field must not grade against ``answer``: the named field is missing."""
    f = _jsonl(tmp_path / "q.jsonl", [{"id": "a", "prompt": "2+2=?", "answer": "4 because",
                                       "gold": "4"}])
    for name in ("id_field", "prompt_field", "answer_field"):
        with pytest.raises(DataError) as e:
            read_prompts(str(f), fields=PromptOptions(**{name: "golf"}))
        assert (e.value.file, e.value.line, e.value.field) == (str(f), 1, "golf"), name
        assert f"--{name.replace('_', '-')}" in e.value.message
    [rec] = read_prompts(str(f), fields=PromptOptions(answer_field="gold"))
    assert rec["answer"] == "4" and "gold" not in rec
    # the defaults name no field: a chat record without `prompt` is used as is, even when
    # --prompt-field is given, as is a sample-tree record without an answer
    msgs = [{"role": "user", "content": "Hi?"}]
    chat = _jsonl(tmp_path / "c.jsonl", [{"qid": "b", "messages": msgs, "answer": "x"}])
    [rec] = read_prompts(str(chat), fields=PromptOptions(id_field="qid", prompt_field="question"))
    assert rec == {"id": "b", "messages": msgs, "answer": "x"}


def test_misspelt_field_flags_exit_65_in_eval_sample_tree_and_loop(tmp_path, chat_model, loop_model):
    f = _jsonl(tmp_path / "q.jsonl", [{"id": "a", "prompt": "2+2=?", "answer": "4 because",
                                       "gold": "4"}])
    r = run_tcli(["eval", "-m", chat_model, "--data", f, "--answer-field", "golf", "-q"])
    failed(r, 65, f"{f}:1: field 'golf': missing", "--answer-field")
    r = run_tcli(["sample-tree", f, "-m", chat_model, "-n", "1", "--max-new-tokens", "2",
                  "--id-field", "qid", "-q"])
    failed(r, 65, f"{f}:1: field 'qid': missing", "--id-field")
    assert not r.stdout
    d, model = loop_model
    toml = tmp_path / "run.toml"
    toml.write_text(f'model = "{model}"\ntrain_data = "{d / "prompts.jsonl"}"\n'
                    f'run_dir = "{tmp_path / "run"}"\nsteps = 1\n[prompts]\nid_field = "pid"\n')
    r = run_tcli(["loop", "--config", toml, "-q"])
    failed(r, 65, "prompts.jsonl:1: field 'pid': missing")
    assert not (tmp_path / "run").exists()


def test_sample_tree_with_mapped_fields_and_chat_messages(tmp_path, chat_model):
    from transformers import AutoTokenizer

    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"}]
    f = _jsonl(tmp_path / "q.jsonl", [{"qid": "a", "question": "2+2?", "gold": "4"},
                                      {"qid": "b", "messages": msgs, "gold": "x"}])
    r = run_tcli(["sample-tree", f, "-m", chat_model, "--n", "2", "--max-new-tokens", "4",
                  "--id-field", "qid", "--prompt-field", "question", "--answer-field", "gold",
                  "--prompt-template", "plain"])
    assert r.returncode == 0, r.stderr
    recs = [orjson.loads(x) for x in r.stdout.splitlines()]
    assert [x["prompt_id"] for x in recs] == ["a", "a", "b", "b"]
    assert [x["answer"] for x in recs] == ["4", "4", "x", "x"]
    tok = AutoTokenizer.from_pretrained(chat_model)
    want = tok(tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False),
               add_special_tokens=False)["input_ids"]
    assert recs[2]["prompt_token_ids"] == want  # the conversation, as is, once
    assert recs[2]["prompt"] == "Hi?"
    one = tok(tok.apply_chat_template([{"role": "user", "content": "2+2?"}],
                                      add_generation_prompt=True, tokenize=False),
              add_special_tokens=False)["input_ids"]
    assert recs[0]["prompt_token_ids"] == one


def test_messages_without_a_chat_template_is_a_data_error(tmp_path, chat_model):
    f = _jsonl(tmp_path / "q.jsonl", [{"id": 1, "messages": [
        {"role": "system", "content": "x"}, {"role": "user", "content": "y"}]}])
    r = run_tcli(["sample-tree", f, "-m", chat_model, "--no-chat-template", "--n", "1",
                  "--max-new-tokens", "2"])
    assert r.returncode == 65 and "field 'messages'" in r.stderr.decode()
    bad = _jsonl(tmp_path / "b.jsonl", [{"id": 1, "messages": [{"role": "user"}]}])
    r = run_tcli(["sample-tree", bad, "-m", chat_model, "--n", "1", "--max-new-tokens", "2"])
    assert r.returncode == 65 and "b.jsonl:1: field 'messages'" in r.stderr.decode()


GOOD = {"id": "g", "prompt": "1+1=?", "answer": "A", "choices": {"A": "2", "B": "3"}}
SYSTEM_AND_USER = [{"role": "system", "content": "x"}, {"role": "user", "content": "y"}]


@pytest.mark.parametrize("bad, flags, field, words", [
    ({"choices": "x, y"}, [], "choices", "must be an object mapping letters"),
    ({"messages": SYSTEM_AND_USER, "prompt": None, "choices": None}, ["--no-chat-template"],
     "messages", "needs a chat template"),
    ({"choices": None}, ["--prompt-template", "choice"], "choices",
     "missing: the template shows {choices}"),
    ({"answer": "C"}, [], "answer", "'C' is not one of the options (A, B)"),
], ids=["choices a string", "messages without a chat template", "choice template without choices",
        "gold not among the choices"])
def test_eval_names_the_data_file_and_line_of_a_bad_record(tmp_path, chat_model, bad, flags,
                                                           field, words):
    """Records that pass reading but fail while sampling or verifying are named where they were
    read (the blank line counts), not as <input> or as the n-th sample of <eval>."""
    rec = {k: v for k, v in {**GOOD, "id": "b", **bad}.items() if v is not None}
    f = tmp_path / "q.jsonl"
    f.write_bytes(orjson.dumps(GOOD) + b"\n\n" + orjson.dumps(rec) + b"\n")
    out = tmp_path / "samples.jsonl"
    r = run_tcli(["eval", "-m", chat_model, "--data", f, "--max-new-tokens", "2", "--workers",
                  "0", "-o", out, "-q", *flags])
    failed(r, 65, f"{f}:3: field '{field}'", words)
    assert not out.exists()


def test_a_list_of_choices_is_lettered_alike_for_the_prompt_and_the_verifier():
    """choices ["x", "y"] are options A and B both where the prompt shows them and where the
    choice verifier reads an answer, so a list is as good as {"A": "x", "B": "y"}."""
    from tcli.prompts import PROMPT_TEMPLATES, check_choices_shown, render_prompt
    from tcli.stages.verify import _choices

    as_list = {"id": "l", "prompt": "Pick", "choices": ["x", "y"]}
    as_dict = {**as_list, "choices": {"A": "x", "B": "y"}}
    shown = render_prompt(as_list, PROMPT_TEMPLATES["choice"])
    assert "A. x\nB. y" in shown and shown == render_prompt(as_dict, PROMPT_TEMPLATES["choice"])
    assert _choices(as_list["choices"], "f", 1) == as_dict["choices"]
    with pytest.raises(UsageError, match="does not show them"):
        check_choices_shown(as_list, PROMPT_TEMPLATES["boxed"])
    check_choices_shown({**as_list, "prompt": "Pick x or y"}, PROMPT_TEMPLATES["boxed"])


def test_a_loop_eval_names_the_data_file_and_line(tmp_path, loop_model):
    d, model = loop_model
    ev = tmp_path / "eval.jsonl"
    ev.write_bytes(orjson.dumps({"id": "p1", "prompt": "1+1=?", "answer": "2"}) + b"\n" +
                   orjson.dumps({"id": "c", "prompt": "1 2?", "answer": "9",
                                 "choices": {"A": "1", "B": "2"}}) + b"\n")
    r = run_tcli(["loop", "--model", model, "--train-data", d / "prompts.jsonl", "--eval-data", ev,
                  "--run-dir", tmp_path / "run", "--steps", "1", "--prompts-per-step", "1",
                  "--n", "1", "--max-new-tokens", "2", "--prompt-template", "plain",
                  "--workers", "0", "-q"])
    failed(r, 65, f"{ev}:2: field 'answer'", "'9' is not one of the options")


def _table():
    import pyarrow as pa

    return pa.table({"qid": ["a", "b"], "question": ["1+1=?", "2+2=?"], "gold": ["2", "4"]})


def _saved_dataset(root, splits=None):
    """The layout `datasets.Dataset.save_to_disk` writes: state.json + Arrow IPC stream files."""
    import json

    import pyarrow as pa

    root.mkdir()
    t = _table()
    for i, part in enumerate((t.slice(0, 1), t.slice(1))):
        with pa.OSFile(str(root / f"data-0000{i}-of-00002.arrow"), "wb") as sink:
            w = pa.ipc.new_stream(sink, t.schema)
            w.write_table(part)
            w.close()
    (root / "state.json").write_text(json.dumps({"_data_files": [
        {"filename": "data-00000-of-00002.arrow"}, {"filename": "data-00001-of-00002.arrow"}]}))
    return root


FIELDS = PromptOptions(id_field="qid", prompt_field="question", answer_field="gold")
WANT = [{"id": "a", "prompt": "1+1=?", "answer": "2"}, {"id": "b", "prompt": "2+2=?", "answer": "4"}]


def test_parquet_and_saved_datasets_are_prompt_files(tmp_path):
    import pyarrow.parquet as pq

    pq.write_table(_table(), str(tmp_path / "q.parquet"))
    assert read_prompts(str(tmp_path / "q.parquet"), fields=FIELDS) == WANT
    ds = _saved_dataset(tmp_path / "ds")
    assert read_prompts(str(ds), fields=FIELDS) == WANT
    # a DatasetDict needs a split; other directories are not inputs
    dd = tmp_path / "dd"
    dd.mkdir()
    (dd / "dataset_dict.json").write_text('{"splits": ["train", "test"]}')
    r = run_tcli(["build-tree", dd])
    assert r.returncode == 2 and "give one split" in r.stderr.decode() and "train" in r.stderr.decode()
    r = run_tcli(["build-tree", tmp_path])
    assert r.returncode == 2 and "not a saved Hugging Face dataset" in r.stderr.decode()


def test_real_datasets_save_to_disk_if_installed(tmp_path):
    datasets = pytest.importorskip("datasets")
    d = datasets.Dataset.from_dict({"qid": ["a", "b"], "question": ["1+1=?", "2+2=?"],
                                    "gold": ["2", "4"]})
    d.save_to_disk(str(tmp_path / "hf"))
    assert read_prompts(str(tmp_path / "hf"), fields=FIELDS) == WANT


def test_sample_tree_reads_a_saved_dataset(tmp_path, chat_model):
    ds = _saved_dataset(tmp_path / "ds")
    r = run_tcli(["sample-tree", ds, "-m", chat_model, "--n", "1", "--max-new-tokens", "2",
                  "--id-field", "qid", "--prompt-field", "question", "--answer-field", "gold"])
    assert r.returncode == 0, r.stderr
    assert [orjson.loads(x)["prompt_id"] for x in r.stdout.splitlines()] == ["a", "b"]
