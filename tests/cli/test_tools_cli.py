"""`sample-tree --tools`, `eval` and the loop with the real tools (tcli.tools): records carry the
mask and the calls, the prompt opens with the tools' instructions, bad settings and names exit 2
(docs/design.md §5.8). Engine-level behaviour is tests/unit/test_sample_turns.py's."""

from __future__ import annotations

import os
import re

import orjson
import pytest

from conftest import failed, jsonl, loop_config, prompts, read_metrics, run_tcli

SAMPLE = ["--n", "2", "--max-new-tokens", "12", "--prompt-template", "plain", "--limit", "2",
          "--tool-format", "tags", "-q"]


def test_tool_settings_are_refused_before_the_model_loads(tmp_path):
    model = tmp_path / "no-model"
    r = run_tcli(["sample-tree", "-m", model, "--tools", "calc", "--mode", "tree"],
                 input=jsonl(prompts()))
    failed(r, 2, "--branch (sample.branch) tool")
    r = run_tcli(["sample-tree", "-m", model, "--max-turns", "0"], input=jsonl(prompts()))
    failed(r, 2, "--max-turns (sample.max_turns) must be >= 1")
    assert not os.listdir(tmp_path)


def test_sample_tree_with_calc_writes_multi_turn_records(tiny, tmp_path):
    pytest.importorskip("tcli.tools")
    from tcli.models.load import load_tokenizer
    from tcli.tools.toolset import Toolset

    r = run_tcli(["sample-tree", "-m", tiny, "--tools", "calc", "--max-turns", "2", *SAMPLE],
                 input=jsonl(prompts()))
    assert r.returncode == 0, r.stderr.decode()
    recs = [orjson.loads(x) for x in r.stdout.splitlines()]
    tok = load_tokenizer(tiny, required=True)
    head = Toolset(["calc"], "tags", tok).system_text()
    assert len(recs) == 4
    for rec in recs:
        assert len(rec["loss_mask"]) == len(rec["token_ids"]) == len(rec["logprobs"])
        assert rec["tool_calls"] == len(rec["turns"]) <= 2 and rec["tool_errors"] >= 0
        assert tok.decode(rec["prompt_token_ids"]).startswith(head)


def test_an_unknown_tool_exits_2_naming_it(tiny):
    pytest.importorskip("tcli.tools")
    r = run_tcli(["sample-tree", "-m", tiny, "--tools", "calc,nosuchtool", *SAMPLE],
                 input=jsonl(prompts()))
    failed(r, 2, "nosuchtool")
    assert r.stdout == b""


def test_eval_and_the_loop_sample_with_tools(loop_model, tmp_path):
    pytest.importorskip("tcli.tools")
    from tcli.loop import run_loop

    cfg = loop_config(loop_model, tmp_path / "run", engine="hf", tools=["calc"],
                      tool_format="tags", steps=1, max_new_tokens=8)
    run_loop(cfg, log=lambda s: None)
    metrics = read_metrics(tmp_path / "run")
    train = next(m for m in metrics if m["kind"] == "train")
    assert train["tool_calls_mean"] >= 0.0 and 0.0 <= train["tool_error_share"] <= 1.0
    assert any(m["kind"] == "eval" for m in metrics)
    evals = {}
    for name, model, extra in (("given", loop_model[1], ["--tools", "calc", "--tool-format",
                                                          "tags", "--max-new-tokens", "8"]),
                               ("recorded", tmp_path / "run/checkpoints/step_1", []),
                               ("off", tmp_path / "run/checkpoints/step_1", ["--tools", ""])):
        r = run_tcli(["eval", "-m", model, "--data", loop_model[0] / "prompts.jsonl", *extra,
                      "--prompt-template", "plain", "--task", "arith", "-o", tmp_path / "ev"])
        assert r.returncode == 0, r.stderr.decode()
        evals[name] = ([orjson.loads(x) for x in (tmp_path / "ev").read_bytes().splitlines()],
                       r.stderr.decode())
    for name in ("given", "recorded"):   # the checkpoint trained with tools is sampled with them
        recs, _ = evals[name]
        assert recs and all("loss_mask" in x and "turns" in x for x in recs)
    assert "tools=calc" in evals["recorded"][1] and "--tools" in evals["recorded"][1]
    assert not any("loss_mask" in x for x in evals["off"][0])


def test_a_checkpoint_records_the_tools_it_was_trained_with(tmp_path):
    from tcli.config.stages import SampleOptions
    from tcli.models.recorded import notice, sampling_state, with_recorded

    state = sampling_state(SampleOptions(tools="calc,python", max_turns=2))
    assert state["tools"] == ("calc", "python") and state["max_turns"] == 2
    (tmp_path / "tcli_state.json").write_bytes(orjson.dumps({"sampling": {**state,
                                                                          "tools": ["calc"]}}))
    opts, changed = with_recorded(SampleOptions.given({}), str(tmp_path))
    assert opts.tools == ("calc",) and opts.max_turns == 2 and opts.tool_format == "auto"
    assert changed == {"tools": ("calc",), "max_turns": 2}   # tool_format: the same as before
    assert "tools=calc, max_turns=2" in notice(changed, opts)
    off, changed = with_recorded(SampleOptions.given({"tools": ()}), str(tmp_path))
    assert off.tools == () and "tools" not in changed


def test_tools_turned_off_take_none_of_the_recorded_tool_settings(tmp_path):
    """`--tools ""` on a checkpoint trained with tools: its max_turns and tool_format would be
    read by nobody, so neither is taken nor announced."""
    from tcli.config.stages import SampleOptions
    from tcli.models.recorded import notice, with_recorded

    (tmp_path / "tcli_state.json").write_bytes(orjson.dumps({"sampling": {
        "tools": ["calc"], "max_turns": 2, "tool_format": "tags", "max_new_tokens": 9}}))
    off, changed = with_recorded(SampleOptions.given({"tools": ()}), str(tmp_path))
    assert (off.tools, off.max_turns, off.tool_format) == ((), 4, "auto")
    assert changed == {"max_new_tokens": 9} and "max_turns" not in notice(changed, off)


@pytest.mark.parametrize("given, words", [
    ({"max_turns": 2}, "--max-turns (sample.max_turns) is read only with --tools (sample.tools)"),
    ({"max_turns": 2, "tool_format": "tags"},
     "--max-turns (sample.max_turns), --tool-format (sample.tool_format) are read only")])
def test_tool_settings_without_any_tool_are_refused(tmp_path, given, words):
    """They would be ignored without a word; the checkpoint's recorded tools count as named."""
    from tcli.config.stages import SampleOptions
    from tcli.errors import UsageError
    from tcli.models.recorded import with_recorded

    with pytest.raises(UsageError, match=re.escape(words) + ".*no tool is named \\(nor recorded"):
        with_recorded(SampleOptions.given(given), str(tmp_path))
    with pytest.raises(UsageError, match="no tool is named: name the tools"):   # tools off
        with_recorded(SampleOptions.given({**given, "tools": ()}), str(tmp_path))
    (tmp_path / "tcli_state.json").write_bytes(orjson.dumps({"sampling": {"tools": ["calc"]}}))
    opts, _ = with_recorded(SampleOptions.given(given), str(tmp_path))
    assert opts.tools == ("calc",) and opts.max_turns == 2


def test_eval_and_the_loop_refuse_max_turns_without_tools_before_any_work(tiny, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_bytes(jsonl(prompts()))
    r = run_tcli(["eval", "--data", data, "-m", tiny, "--max-turns", "2", "-o", tmp_path / "o"])
    failed(r, 2, "--max-turns (sample.max_turns) is read only with --tools")
    assert not (tmp_path / "o").exists()
    run = tmp_path / "run"
    r = run_tcli(["loop", "--model", tiny, "--train-data", data, "--run-dir", run, "--max-turns", "2"])
    failed(r, 2, "is read only with --tools")
    assert not run.exists()


@pytest.mark.parametrize("fmt, text", [
    ("tags", "<calc>2*3</calc>"),
    ("hermes", '<tool_call>{"name": "calc", "arguments": {"expression": "2*3"}}</tool_call>')])
def test_a_calc_call_runs_and_its_result_is_fed_as_environment_tokens(tiny, monkeypatch, fmt,
                                                                       text):
    """The policy's draws are scripted to write a calc call, then EOS; the real toolset runs it
    and its observation enters the trajectory as environment tokens."""
    pytest.importorskip("tcli.tools")
    import numpy as np
    import torch

    from tcli.engines.hf import HFEngine
    from tcli.engines.sampling import SamplingConfig, ToolPlan
    from tcli.tools.toolset import Toolset

    engine = HFEngine(tiny)
    tok = engine.tokenizer
    tools = Toolset(["calc"], fmt, tok)
    call = tok(text, add_special_tokens=False)["input_ids"]

    def scripted(logits, keys, step, cfg, u=None):
        t = torch.tensor([call[s] if s < len(call) else tok.eos_token_id
                          for s in np.atleast_1d(step)])
        return t, torch.log_softmax(logits, -1).gather(1, t[:, None])[:, 0]

    monkeypatch.setattr(engine, "_sample", scripted)
    (leaf,), = engine.sample_with_tools([tok("x")["input_ids"]], ToolPlan(tools, 2, 1, 1),
                                        SamplingConfig(max_new_tokens=256))
    assert len(leaf.turns) == 1 and "6" in leaf.turns[0]["result"] and leaf.tool_errors == 0
    m = len(leaf.token_ids) - len(call) - 1
    assert leaf.loss_mask == [1] * len(call) + [0] * m + [1] and leaf.finish_reason == "stop"
    assert leaf.token_ids[:len(call)] == call and leaf.token_ids[-1] == tok.eos_token_id
    obs = tok.decode(leaf.token_ids[len(call):-1])
    assert obs == tools.observation(tools.step(text)) and "6" in obs


def test_recorded_tools_that_clash_with_given_settings_are_a_usage_error(tmp_path):
    from tcli.config.stages import SampleOptions
    from tcli.errors import DataError, UsageError
    from tcli.models.recorded import with_recorded

    state = tmp_path / "tcli_state.json"
    state.write_bytes(orjson.dumps({"sampling": {"tools": ["calc"]}}))
    with pytest.raises(UsageError, match=r"needs --branch .* records tools=calc \(give --tools"):
        with_recorded(SampleOptions.given({"mode": "tree"}), str(tmp_path))
    state.write_bytes(orjson.dumps({"sampling": {"max_turns": 0}}))   # wrong on its own: the file's
    with pytest.raises(DataError, match="not usable"):
        with_recorded(SampleOptions.given({"mode": "tree"}), str(tmp_path))


def test_the_loop_resumes_mid_run_with_tool_rollouts(tiny, tmp_path, monkeypatch):
    """Every response opens with a calc call (the first draws are forced; the rest is sampled):
    a run stopped after step 1 and resumed equals the uninterrupted run — rollouts with their
    turns and masks, metrics and weights."""
    pytest.importorskip("tcli.tools")
    import shutil

    import numpy as np
    import torch
    from safetensors.numpy import load_file
    from transformers import AutoTokenizer

    from tcli.engines.hf import HFEngine
    from tcli.io import RecordReader
    from tcli.loop import resume_config, run_loop

    call = AutoTokenizer.from_pretrained(tiny)("<calc>2*3</calc>", add_special_tokens=False)["input_ids"]
    real = HFEngine._sample

    def forced(self, logits, keys, step, cfg, u=None):
        tok, lp = real(self, logits, keys, step, cfg, u)
        pos = np.broadcast_to(np.asarray(step), (len(tok),))
        for i, s in enumerate(pos):
            if s < len(call):
                tok[i] = call[s]
                lp[i] = torch.log_softmax(logits[i].float(), -1)[call[s]]
        return tok, lp

    monkeypatch.setattr(HFEngine, "_sample", forced)
    (tmp_path / "prompts.jsonl").write_bytes(jsonl(prompts()))
    flags = dict(engine="hf", tools=["calc"], tool_format="tags", steps=3, max_new_tokens=24,
                 prompts_per_step=2, eval_every=0, keep_last=5, seed=3)

    def run(name, resume=False):
        cfg = (resume_config(str(tmp_path / name), {}) if resume
               else loop_config((tmp_path, tiny), tmp_path / name, **flags))
        run_loop(cfg, resume=resume, log=lambda s: None)
        return [{k: v for k, v in m.items() if not (k.startswith("seconds_") or "time" in k
                                                     or "per_s" in k)}
                for m in read_metrics(tmp_path / name) if m["kind"] == "train"]

    def rollouts(name, step):
        path = tmp_path / name / "rollouts" / f"step_{step}.arrow"
        return [{**r, "model": "", "turns": [{**t, "seconds": 0} for t in r["turns"]]}
                for _, r in RecordReader(str(path))]  # a call's wall time is the one difference

    ref = run("ref")
    run("run")
    for step in (2, 3):  # as if killed before the checkpoint of step 2 was written
        shutil.rmtree(tmp_path / "run" / "checkpoints" / f"step_{step}")
    got = run("run", resume=True)
    assert [m["step"] for m in got] == [1, 2, 3] and got == ref
    recs = rollouts("ref", 2)
    assert all(r["turns"] and r["turns"][0]["result"] == "6" and 0 in r["loss_mask"] for r in recs)
    for step in (2, 3):
        assert rollouts("run", step) == rollouts("ref", step)
    wa, wb = (load_file(str(tmp_path / d / "checkpoints" / "step_3" / "model.safetensors"))
              for d in ("ref", "run"))
    assert all((wa[k] == wb[k]).all() for k in wa)
