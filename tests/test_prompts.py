"""Prompt files from other schemas: field mapping, chat-format prompts, errors that name the
user's own field."""

from __future__ import annotations

import orjson
import pytest

from conftest import run_tcli
from tcli.config.stages import PromptOptions
from tcli.errors import DataError
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
