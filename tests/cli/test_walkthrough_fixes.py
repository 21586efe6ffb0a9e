"""The less-travelled paths of the loop and its neighbours, as a first-time user meets them:
the ``[prompts]`` mapping and eval data in the standard schema, eval data that is the train data."""

from __future__ import annotations

import os

import orjson

from conftest import LOOP_PROMPTS, run_tcli
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


def _loop(d, model, tmp_path, eval_data):
    toml = tmp_path / "run.toml"
    toml.write_text(f'model = "{model}"\ntrain_data = "{d / "prompts.jsonl"}"\n'
                    f'eval_data = "{eval_data}"\nrun_dir = "{tmp_path / "run"}"\nsteps = 1\n'
                    'prompts_per_step = 2\n[sample]\nn = 2\nmax_new_tokens = 2\n'
                    'prompt_template = "plain"\n[eval]\nevery = 1\nlimit = 2\n')
    return run_tcli(["loop", "--config", toml])


def test_loop_warns_once_when_eval_data_is_the_train_file(tmp_path, loop_model):
    d, model = loop_model
    link = tmp_path / "held_out.jsonl"  # another name for the same file
    os.symlink(d / "prompts.jsonl", link)
    r = _loop(d, model, tmp_path, link)
    assert r.returncode == 0, r.stderr
    err = r.stderr.decode()
    assert err.count("eval_data is the same file as train_data") == 1, err
    other = _jsonl(tmp_path / "other.jsonl", LOOP_PROMPTS)
    (tmp_path / "b").mkdir()
    r = _loop(d, model, tmp_path / "b", other)
    assert r.returncode == 0, r.stderr
    assert b"same file as train_data" not in r.stderr
