"""`tcli expand-tree` in the pipeline and in the loop, on a tiny model: sample-tree | verify |
expand-tree | verify | build-tree | advantages | train-step, bad input (exit 65 naming file, line
and field), no budget (exit 2), the loop's [expand] table and its metrics."""

from __future__ import annotations

import orjson
import pytest

from conftest import failed, jsonl, parse, prompts, read_metrics, run_tcli
from tcli.io import RecordReader

pytest.importorskip("torch")

PARITY = '''
def reward(text, answer, record):
    """Mixed rewards from a random model: the parity of the response's length."""
    return float(len(text) % 2), {"even": len(text) % 2 == 0}
'''
TREE = ["--mode", "tree", "--width", "2", "--depth", "2", "--segment-tokens", "3",
        "--max-new-tokens", "8", "--prompt-template", "plain"]


@pytest.fixture(scope="module")
def verified(tiny, tmp_path_factory):
    """(directory with parity.py and the prompts, the verified tree rollouts as JSONL)."""
    d = tmp_path_factory.mktemp("expand")
    (d / "parity.py").write_text(PARITY)
    (d / "prompts.jsonl").write_bytes(jsonl(prompts()))
    s = run_tcli(["sample-tree", d / "prompts.jsonl", "-m", tiny, *TREE, "--record-entropy",
                  "-q", "--seed", "2"], env={"OMP_NUM_THREADS": "1"})
    assert s.returncode == 0, s.stderr.decode()
    v = run_tcli(["verify", "-t", "python:parity:reward", "-j", "0", "-q"], input=s.stdout,
                 env={"PYTHONPATH": str(d)})
    assert v.returncode == 0, v.stderr.decode()
    return d, v.stdout


def test_pipeline_end_to_end(tiny, verified, tmp_path):
    d, rollouts = verified
    env = {"PYTHONPATH": str(d), "OMP_NUM_THREADS": "1"}
    e = run_tcli(["expand-tree", "-m", tiny, "--expand-tokens", "20", "--expand-width", "2",
                  "--expand-rounds", "2", "--seed", "3"], input=rollouts, env=env)
    assert e.returncode == 0, e.stderr.decode()
    assert "of 60 tokens requested" in e.stderr.decode()  # 3 prompts x 20
    old, out = parse(rollouts), parse(e.stdout)
    new = [r for r in out if "expand_round" in r]
    assert new and [r for r in out if "expand_round" not in r] == old
    assert all("reward" not in r and "verdict" not in r for r in new)
    steps = [("verify", "-t", "python:parity:reward", "-j", "0", "-q"), ("build-tree",),
             ("advantages", "-e", "treerpo")]
    data = e.stdout
    for args in steps:
        r = run_tcli(list(args), input=data, env=env)
        assert r.returncode == 0, (args, r.stderr.decode())
        data = r.stdout
    final = parse(data)
    assert len(final) == len(out) and all("reward" in r and "advantages" in r for r in final)
    assert [r["reward"] for r in final[:len(old)]] == [r["reward"] for r in old]
    (tmp_path / "adv.jsonl").write_bytes(data)
    t = run_tcli(["train-step", tmp_path / "adv.jsonl", "-m", tiny, "-o", tmp_path / "ckpt",
                  "--lr", "1e-4", "--device", "cpu"], env=env)
    assert t.returncode == 0, t.stderr.decode()
    assert orjson.loads(t.stdout.splitlines()[-1])["num_sequences"] == len(final)


def test_bad_input_and_no_budget(tiny, verified, tmp_path):
    _, rollouts = verified
    recs = parse(rollouts)
    del recs[1]["reward"]
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(jsonl(recs))
    args = ["expand-tree", "-m", tiny, "--expand-tokens", "8"]
    failed(run_tcli([*args, bad, "-o", tmp_path / "out.jsonl"]), 65, "bad.jsonl:2:",
           "field 'reward'")
    assert not (tmp_path / "out.jsonl").exists()
    recs = parse(rollouts)  # in the last group: found while streaming, after the model loaded
    recs[-1]["segment_ends"] = recs[-1]["segment_ends"][:-1]
    bad.write_bytes(jsonl(recs))
    failed(run_tcli([*args, bad, "-o", tmp_path / "out.jsonl"]), 65, f"bad.jsonl:{len(recs)}:",
           "field 'segment_ends'")
    assert not (tmp_path / "out.jsonl").exists()
    flat = [{**r, "node_path": [], "segment_ends": []} for r in parse(rollouts)]
    (tmp_path / "flat.jsonl").write_bytes(jsonl(flat))
    failed(run_tcli([*args, tmp_path / "flat.jsonl"]), 65, "flat.jsonl:1:", "field 'node_path'",
           "--mode tree")
    failed(run_tcli(["expand-tree", "-m", tiny], input=rollouts), 2, "--expand-tokens")
    empty = run_tcli(args, input=b"")
    assert empty.returncode == 0 and empty.stdout == b""


def test_loop_expands_after_sampling(tiny, verified, tmp_path):
    d, _ = verified
    cfg = tmp_path / "run.toml"
    cfg.write_text(f'model = "{tiny}"\ntrain_data = "{d / "prompts.jsonl"}"\n'
                   f'run_dir = "{tmp_path / "run"}"\nsteps = 1\nprompts_per_step = 3\n'
                   '[sample]\nmode = "tree"\nwidth = 2\ndepth = 2\nsegment_tokens = 3\n'
                   'max_new_tokens = 8\nprompt_template = "plain"\n'
                   '[verify]\ntask = "python:parity:reward"\nworkers = 0\n'
                   '[expand]\ntokens = 16\n[advantages]\nestimator = "treerpo"\n'
                   '[train]\nlr = 1e-4\ndevice = "cpu"\n')
    r = run_tcli(["loop", "--config", cfg], env={"PYTHONPATH": str(d), "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr.decode()
    m = read_metrics(tmp_path / "run")[0]
    assert m["expand_leaves"] > 0 and 0 < m["expand_tokens"] <= 3 * 16
    rolled = [x for _, x in RecordReader(str(tmp_path / "run" / "rollouts" / "step_1.arrow"))]
    assert sum("expand_round" in x for x in rolled) == m["expand_leaves"]
    assert all(isinstance(x["reward"], float) for x in rolled)  # the new leaves verified too
    bad = tmp_path / "bad.toml"
    bad.write_text(cfg.read_text().replace('mode = "tree"', 'mode = "independent"')
                   .replace('"treerpo"', '"grpo"').replace(f'{tmp_path / "run"}"', f'{tmp_path / "run2"}"'))
    failed(run_tcli(["loop", "--config", bad]), 2, "--expand-tokens (expand.tokens)", "tree")
    assert not (tmp_path / "run2").exists()
