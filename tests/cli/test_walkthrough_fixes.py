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


def test_init_critic_from_a_lora_adapter_takes_the_merged_backbone(tmp_path, tiny_model):
    import torch

    from tcli.models.critic import load_critic
    from tcli.models.load import load_model, load_tokenizer
    from tcli.train import lora

    pm = lora.load_trainable(tiny_model, 4, 8, "all-linear")
    with torch.no_grad():  # an adapter that changes the weights (a fresh one is the identity)
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn_like(p) * 0.1)
    adapter = str(tmp_path / "adapter")
    lora.save_adapter(adapter, pm, load_tokenizer(tiny_model), base=tiny_model, state={"step": 1})
    r = run_tcli(["init-critic", "--from", adapter, tmp_path / "critic", "-q"])
    assert r.returncode == 0, r.stderr
    critic = load_critic(str(tmp_path / "critic")).base_model.state_dict()
    merged = load_model(adapter).base_model.state_dict()
    base = load_model(tiny_model).base_model.state_dict()
    assert critic.keys() == merged.keys()
    assert all(torch.equal(critic[k], merged[k]) for k in merged)
    assert not all(torch.equal(base[k], merged[k]) for k in merged)


def test_eval_refuses_a_second_data_instead_of_dropping_the_first(tiny_model):
    r = run_tcli(["eval", "-m", tiny_model, "--data", "gsm8k", "--data", "math500", "--limit", "1"])
    assert r.returncode == 2 and not r.stdout
    err = r.stderr.decode()
    assert "--data was given twice (gsm8k, math500): give it once" in err and "Traceback" not in err


def test_plot_draws_a_one_step_run_as_a_point(tmp_path, monkeypatch):
    """A run with one train step is a single point: without a marker its line is invisible."""
    from matplotlib.axes import Axes

    from tcli.plot import plot_runs

    drawn = []
    plot = Axes.plot

    def recording(self, *args, **kw):
        lines = plot(self, *args, **kw)
        drawn.extend((len(line.get_xdata()), line.get_marker()) for line in lines)
        return lines

    monkeypatch.setattr(Axes, "plot", recording)
    runs = []
    for name in ("a", "b"):
        d = tmp_path / name
        d.mkdir()
        (d / "metrics.jsonl").write_bytes(orjson.dumps({"kind": "train", "step": 1,
                                                       "reward_mean": 0.5, "wall_time": 1.0})
                                          + b"\n")
        runs.append(str(d))
    assert plot_runs(runs, str(tmp_path / "one.png")) == 4  # two runs in two panels
    assert plot_runs(runs, str(tmp_path / "mean.png"), groups={"both": runs}) == 2
    assert drawn and all(m not in (None, "None", "") for n, m in drawn if n == 1), drawn


def test_an_advantage_setting_the_estimator_never_reads_is_refused(tmp_path):
    from tcli.errors import UsageError

    r = run_tcli(["advantages", "-e", "tempo", "--lam", "0.9"], input=b"")
    assert r.returncode == 2 and not r.stdout
    assert '--lam (advantages.lam) is set, but --estimator (advantages.estimator) "tempo" does ' \
           "not read it (only gae, ppo do)" in r.stderr.decode()
    r = run_tcli(["advantages", "-e", "rloo", "--std", "population"], input=b"")
    assert r.returncode == 2 and b"--std" in r.stderr
    r = run_tcli(["advantages", "-e", "grpo", "--std", "population"], input=b"")  # grpo reads it
    assert r.returncode == 0, r.stderr
    toml = tmp_path / "run.toml"
    toml.write_text('[advantages]\nestimator = "grpo"\ntd_coef = 0.5\n')
    try:
        load_config(str(toml))
    except UsageError as e:
        assert "--td-coef (advantages.td_coef) is set" in str(e)
    else:
        raise AssertionError("td_coef under grpo was accepted")
    load_config(str(toml), {"estimator": "tempo"})  # tempo reads it


def test_refill_limits_without_refill_are_refused():
    from tcli.errors import UsageError

    for flag in ("refill_max_rounds", "refill_max_tokens"):
        try:
            load_config(None, {flag: 2})
        except UsageError as e:
            assert "is set, but --refill (refill) is off" in str(e)
        else:
            raise AssertionError(f"{flag} without refill was accepted")
    assert load_config(None, {"refill": True, "refill_max_rounds": 2}).run.refill_max_rounds == 2


def test_train_settings_of_something_turned_off_are_refused(tmp_path, tiny_model):
    from tcli.config.stages import TrainOptions
    from tcli.errors import UsageError

    for flag, value in (("--lora-alpha", "8"), ("--lora-targets", "q_proj"),
                        ("--kl-estimator", "k2"), ("--min-lr-ratio", "0.1")):
        r = run_tcli(["train-step", "-", "-m", tiny_model, "-o", tmp_path / "out", flag, value],
                     input=b"")
        assert r.returncode == 2, r.stderr
        assert f"{flag} (train.{flag[2:].replace('-', '_')}) is set, but --" in r.stderr.decode()
        assert not (tmp_path / "out").exists()
    TrainOptions(lora_rank=4, lora_alpha=8.0, lora_targets="q_proj").check_used()
    TrainOptions(kl_coef=0.1, kl_estimator="k2", ref_model="m").check_used()
    TrainOptions(lr_schedule="linear", schedule_steps=3, min_lr_ratio=0.1).check_used()
    try:
        load_config(None, {"lora_alpha": 8.0})
    except UsageError as e:
        assert "--lora-rank (train.lora_rank) is 0" in str(e)
    else:
        raise AssertionError("lora_alpha without a rank was accepted")
