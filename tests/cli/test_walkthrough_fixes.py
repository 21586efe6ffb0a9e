"""The less-travelled paths of the loop and its neighbours, as a first-time user meets them:
the ``[prompts]`` mapping and eval data in the standard schema, eval data that is the train data."""

from __future__ import annotations

import orjson

from tcli.config.loop import load_config
from tcli.errors import DataError
from tcli.loop.inputs import loop_prompts


def _jsonl(path, recs):
    path.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in recs))
    return str(path)


def _mapped(tmp_path, evals: list[dict]):
    train = _jsonl(tmp_path / "train.jsonl", [{"qid": "t1", "question": "1+1=", "answer": "2"}])
    test = _jsonl(tmp_path / "test.jsonl", evals)
    toml = tmp_path / "run.toml"
    toml.write_text(f'model = "m"\ntrain_data = "{train}"\neval_data = "{test}"\n'
                    f'run_dir = "{tmp_path / "run"}"\n[prompts]\nid_field = "qid"\n'
                    'prompt_field = "question"\n')
    return load_config(str(toml))


def test_prompts_mapping_is_the_train_datas_and_eval_data_may_use_the_standard_names(tmp_path):
    cfg = _mapped(tmp_path, [{"id": "e1", "prompt": "2+2=", "answer": "4"},
                             {"qid": "e2", "question": "3+3=", "answer": "6"}])
    assert loop_prompts(cfg, "train_data") == [{"id": "t1", "prompt": "1+1=", "answer": "2"}]
    # a benchmark in the standard schema, and records in the train data's own, both read
    assert loop_prompts(cfg, "eval_data") == [{"id": "e1", "prompt": "2+2=", "answer": "4"},
                                              {"id": "e2", "prompt": "3+3=", "answer": "6"}]


def test_eval_record_with_neither_name_still_names_the_mapped_field(tmp_path):
    cfg = _mapped(tmp_path, [{"id": "e1", "text": "2+2=", "answer": "4"}])
    try:
        loop_prompts(cfg, "eval_data")
    except DataError as e:
        assert (e.line, e.field) == (1, "question") and "prompt_field" in e.message
    else:
        raise AssertionError("an eval record without a prompt was read")

